"""`make gpu-check`: verify on a CUDA machine what the defaults only do on a CPU (config.VERIFIED_FAST_PATHS).

    python scripts/gpu_check.py                      # the check; "gpu-check: no CUDA device" where there is none
    python scripts/gpu_check.py --wheels gpu-wheels  # `make gpu-wheels`: fill the folder for an offline GPU machine

The check, one PASS/FAIL line each, a summary, exit 1 on any failure (about 3-5 minutes on one H100):
  1. pytest -m gpu tests (tests/test_gpu.py: fast path = plain path, shared prefix = full step, on CUDA);
  2. a short real run (the embedded SmolLM2, else a tiny Llama built from a config with its tokenizer), MRPC,
     64 + 64 examples, 8 steps, LoRA dropout 0: --share_prefix true vs false, losses within bf16 tolerance;
  3. eval.py on that run with --fast_eval true vs false: argmax equal (bar near-ties), probabilities close;
  4. with two or more GPUs: accelerate launch --num_processes 2 with --fast_eval true;
  5. the reference experiment's --dry_run on the config-only Meta-Llama-3-8B folder.
When all pass, add "cuda" to config.VERIFIED_FAST_PATHS.

The GPU machine is assumed offline with torch and transformers installed. Whatever else requirements.txt
names that is missing there is installed from the folder `make gpu-wheels` filled (pip --no-index --no-deps);
the folder also carries the SmolLM2 tokenizer, GLUE MRPC and the reference model's config.json (../shared does
not travel). deepspeed has no wheel on PyPI (sdist only): it is not bundled and no check needs it.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BUNDLE = Path(os.environ.get("GPU_WHEELS", REPO / "gpu-wheels"))
PREINSTALLED = ("torch", "transformers")  # on the GPU machine; with everything they depend on
NO_WHEEL = ("deepspeed",)  # sdist only on PyPI
RUN_FLAGS = ["--task", "mrpc", "--max_train_samples", "64", "--max_eval_samples", "64", "--max_steps", "8",
             "--log_every", "1", "--latency_calls", "0", "--lora_dropout", "0", "--seed", "1", "--eval_batch_size", "16"]
LOSS_RTOL = 3e-2  # bf16 compute (the GPU default): the bound tests/test_prefix.py uses for bf16
PROB_TOL = 1e-2  # probabilities of fast vs plain evaluation; argmax compared where the margin exceeds 2x this


# -- requirements ------------------------------------------------------------------------------------------
def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def requirements() -> dict[str, str]:
    """requirements.txt's pins: name -> version."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_canon(name)] = version.strip()
    return pins


def _deps(name: str) -> list[str]:
    from packaging.requirements import Requirement
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return []
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(_canon(req.name))
    return out


def closure(names) -> set[str]:
    seen, todo = set(), [_canon(n) for n in names]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += _deps(n)
    return seen


def installed(name: str):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# -- make gpu-wheels -----------------------------------------------------------------------------------------
def fill_bundle(folder: Path, python_version: str, have: set[str], cuda_major: str) -> int:
    """Wheels (--no-deps, exact versions of this environment) for requirements.txt minus torch, transformers, what
    they need, NO_WHEEL and ``have`` (what the GPU machine already has); plus tokenizer, MRPC and the reference
    config. bitsandbytes keeps only its CUDA ``cuda_major`` libraries (the wheel holds one per CUDA version)."""
    pins = requirements()
    top = [n for n in pins if n not in PREINSTALLED + NO_WHEEL]
    names = sorted(closure(top) - closure(PREINSTALLED) - {_canon(h) for h in have})
    missing = [n for n in names if installed(n) is None]
    if missing:
        sys.exit(f"gpu-wheels: {', '.join(missing)} not installed here: run make setup first")
    specs = [f"{n}=={installed(n)}" for n in names]
    folder.mkdir(exist_ok=True)
    print(f"gpu-wheels: {len(specs)} wheels for Python {python_version}: {' '.join(specs)}")
    print(f"gpu-wheels: not bundled: {', '.join(NO_WHEEL)} (no wheel on PyPI, sdist only; no gpu-check needs it), "
          f"{', '.join(PREINSTALLED)} and their dependencies (preinstalled there), "
          f"{', '.join(sorted(have)) or 'nothing'} (GPU_HAVE)")
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                                             "manylinux2014_x86_64", "manylinux1_x86_64")]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation=cp",
           f"--python-version={python_version}", *platforms, "-d", str(folder), *specs]
    if subprocess.run(cmd).returncode:
        return 1
    for wheel in folder.glob("bitsandbytes-*.whl"):
        _slim_bitsandbytes(wheel, cuda_major)
    (folder / "requirements.txt").write_text("\n".join(specs) + "\n")
    _bundle_files(folder)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"gpu-wheels: {folder} holds {total / 2**20:.1f} MiB")
    return 0


def _slim_bitsandbytes(wheel: Path, cuda_major: str) -> None:
    """Drop the native libraries for other CUDA versions, ROCm and XPU (RECORD updated; pip re-hashes on install)."""
    def keep(name: str) -> bool:
        lib = Path(name).name
        if not lib.startswith("libbitsandbytes_") or lib == "libbitsandbytes_cpu.so":
            return True
        return lib.startswith(f"libbitsandbytes_cuda{cuda_major}")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(True) if keep(line.split(",")[0])).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def _bundle_files(folder: Path) -> None:
    """What the GPU machine lacks besides packages: the tokenizer of the tiny models, MRPC, the reference config."""
    try:
        from transformers import AutoTokenizer

        from qlora_cls.modeling import embedded_model_dir
        AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(folder / "tokenizer")
    except Exception as exc:  # noqa: BLE001 - reported, the wheels are still useful
        print(f"gpu-wheels: no tokenizer bundled ({exc})")
    shared = REPO.parent / "shared"
    for rel in ("data/glue/README.md", "data/glue/mrpc", "models/Meta-Llama-3-8B/config.json"):
        src, dst = shared / rel, folder / "shared" / rel
        if not src.exists():
            print(f"gpu-wheels: {src} not found, not bundled")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, dirs_exist_ok=True) if src.is_dir() else shutil.copyfile(src, dst)
        if dst.is_dir():
            for p in [dst, *dst.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)  # ../shared is read-only; the bundle must stay removable
        else:
            dst.chmod(0o644)


# -- make gpu-check -----------------------------------------------------------------------------------------
class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def report(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.passed += ok
        self.failed += not ok
        return ok


def ensure_packages(checks: Checks) -> bool:
    """Install from the bundle what requirements.txt names and this machine lacks (torch/transformers excepted)."""
    listed = BUNDLE / "requirements.txt"  # what `make gpu-wheels` bundled: the pins and what they need
    wanted = {n: f"{n}=={v}" for n, v in requirements().items() if n not in PREINSTALLED + NO_WHEEL}
    if listed.is_file():
        wanted.update({line.split("==")[0]: line.strip() for line in listed.read_text().splitlines() if line.strip()})
    missing = [spec for name, spec in wanted.items() if installed(name) is None]
    if not missing:
        return True
    if not any(BUNDLE.glob("*.whl")):
        return checks.report("packages", False, f"missing {' '.join(missing)} and no wheels in {BUNDLE}: run "
                                                f"`make gpu-wheels` where pip can download, and bring that folder")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", str(BUNDLE), *missing]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return checks.report("packages", proc.returncode == 0,
                         f"installed {' '.join(missing)} from {BUNDLE}" if proc.returncode == 0 else
                         f"pip install from {BUNDLE} failed: {proc.stderr.strip().splitlines()[-1:]}")


def run(cmd: list[str], timeout: int, env: dict, log: Path) -> tuple[bool, str]:
    """Run a command, its output to ``log``; (ok, the last line of its output or why it failed)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout} s (log: {log})"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if "Exit:" in line), lines[-1] if lines else "").strip()
    took = f"{time.perf_counter() - start:.0f} s"
    return code == 0, (f"{last} ({took})" if code == 0 else f"exit {code} after {took}: {last} (log: {log})")


def model_and_env(work: Path, env: dict) -> tuple[str, str]:
    """The model of the real runs: the embedded SmolLM2 if installed, else a tiny Llama from a config."""
    from qlora_cls.errors import UsageError
    from qlora_cls.modeling import embedded_model_dir
    try:
        return str(embedded_model_dir()), "the embedded SmolLM2-135M"
    except UsageError:
        pass
    tokenizer = Path(env.get("QLORA_TEST_TOKENIZER") or BUNDLE / "tokenizer")
    os.environ["QLORA_TEST_TOKENIZER"] = env["QLORA_TEST_TOKENIZER"] = str(tokenizer)  # conftest reads it
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model
    return str(build_tiny_model(work / "tiny-llama")), f"a tiny Llama built from a config ({tokenizer} tokenizer)"


def _first_existing(*paths) -> Path:
    return next((Path(p) for p in paths if p and Path(p).exists()), Path(paths[-1]))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _predictions(folder: Path):
    import numpy as np
    rows = (folder / "predictions.csv").read_text().splitlines()[1:]
    table = np.array([[float(x) for x in r.split(",")[2:]] for r in rows])
    return table[:, 0].astype(int), table[:, 1:]


def gpu_check() -> int:
    try:
        import torch
    except ImportError:
        print("gpu-check: no CUDA device (torch is not importable)")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device")
        return 0
    start = time.perf_counter()
    checks = Checks()
    if not ensure_packages(checks):
        print(f"gpu-check: {checks.passed} passed, {checks.failed} failed")
        return 1
    import transformers  # noqa: F401 - preinstalled: fail here, not in a check, when it is not
    versions = " ".join(f"{n} {installed(n)}" for n in ("transformers", "bitsandbytes", "peft", "accelerate"))
    print(f"gpu-check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), {versions}", flush=True)
    del transformers
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    dataset = _first_existing(os.environ.get("QLORA_TEST_DATASET"), REPO.parent / "shared" / "data" / "glue",
                              BUNDLE / "shared" / "data" / "glue")
    reference = _first_existing(REPO.parent / "shared" / "models" / "Meta-Llama-3-8B",
                                BUNDLE / "shared" / "models" / "Meta-Llama-3-8B")
    env["QLORA_TEST_DATASET"] = str(dataset.resolve())
    model, model_text = model_and_env(work, env)
    py = sys.executable

    # 1. the tests marked gpu
    ok, detail = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], 300, env,
                     work / "pytest.log")
    checks.report("pytest -m gpu", ok, detail)

    # 2. shared prefix on vs off: same losses within bf16 tolerance
    base = [py, "ft.py", "--model_dir", model, "--dataset", str(dataset), *RUN_FLAGS]
    runs = {}
    for share in ("true", "false"):
        runs[share] = work / f"share-{share}"
        ok, detail = run([*base, "--results_path", str(runs[share]), "--share_prefix", share, "--fast_eval", "false"],
                         180, env, work / f"share-{share}.log")
        if not ok:
            checks.report(f"train --share_prefix {share}", False, detail)
    if all((r / "train_log.jsonl").is_file() for r in runs.values()):
        on, off = _losses(runs["true"]), _losses(runs["false"])
        tokens = json.loads((runs["true"] / "config.json").read_text())["resolved"]["train_prefix_tokens"]
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(on, off)) if on and len(on) == len(off) else 1.0
        checks.report("shared prefix vs full pass", tokens > 0 and worst <= LOSS_RTOL,
                      f"{model_text}, {len(on)} steps, {tokens} prefix tokens shared, largest relative loss "
                      f"difference {worst:.1e} (tolerance {LOSS_RTOL:g})")

    # 3. fast vs plain evaluation of the trained adapter
    if (runs["false"] / "adapter").is_dir():
        preds = {}
        for fast in ("true", "false"):
            out = work / f"eval-fast-{fast}"
            ok, detail = run([py, "eval.py", "--results_path", str(runs["false"]), "--fast_eval", fast,
                              "--output_dir", str(out)], 150, env, work / f"eval-{fast}.log")
            if ok:
                preds[fast] = _predictions(out)
            else:
                checks.report(f"eval.py --fast_eval {fast}", False, detail)
        if len(preds) == 2:
            (fast_arg, fast_p), (plain_arg, plain_p) = preds["true"], preds["false"]
            diff = float(abs(fast_p - plain_p).max())
            margin = abs(plain_p.max(1) - plain_p.min(1))
            decided = margin > 2 * PROB_TOL
            flips, real = int((fast_arg != plain_arg).sum()), int(((fast_arg != plain_arg) & decided).sum())
            checks.report("fast vs plain evaluation", real == 0 and diff <= PROB_TOL,
                          f"{len(plain_arg)} examples, argmax differs on {flips} ({real} with a probability margin "
                          f"over {2 * PROB_TOL:g}), max probability difference {diff:.1e} (tolerance {PROB_TOL:g})")

    # 4. two processes
    if torch.cuda.device_count() >= 2:
        two = work / "two-processes"
        ok, detail = run([py, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "ft.py", "--model_dir", model, "--dataset", str(dataset), *RUN_FLAGS,
                          "--fast_eval", "true", "--results_path", str(two)], 240, env, work / "two.log")
        if ok:
            epochs = json.loads((two / "metrics.json").read_text())["epochs"]
            ok = bool(epochs) and epochs[-1].get("eval_fast_path") is True
            detail = f"accelerate launch --num_processes 2, --fast_eval true: {len(epochs)} evaluation(s), {detail}"
        checks.report("two processes", ok, detail)
    else:
        print(f"gpu-check: two processes not checked: {torch.cuda.device_count()} CUDA device (needs 2)")

    # 5. the reference experiment's dry run (config-only model folder: no tokenizer, lengths = --max_length)
    ok, detail = run([py, "ft.py", "--dry_run", "--model_dir", str(reference), "--dataset", str(dataset),
                      "--task", "mrpc", "--prompt", "perfect", "--r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
                      "--lr", "3e-4", "--batch_size", "8", "--epochs", "2"], 150, env, work / "dry-run.log")
    text = (work / "dry-run.log").read_text()
    checks.report("reference dry run", ok and "per process, training" in text,
                  f"{reference}: " + next((line.strip() for line in text.splitlines()
                                           if "per process, training" in line), detail))

    print(f"gpu-check: {checks.passed} passed, {checks.failed} failed in {time.perf_counter() - start:.0f} s"
          + (f" (logs: {work})" if checks.failed else ""))
    if not checks.failed:
        shutil.rmtree(work, ignore_errors=True)
        print('gpu-check: all passed: "cuda" may go into config.VERIFIED_FAST_PATHS')
    return 1 if checks.failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", metavar="DIR", help="fill DIR for an offline GPU machine instead of checking")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (wheels' tags)")
    parser.add_argument("--have", default="", help="packages the GPU machine already has (space-separated)")
    parser.add_argument("--cuda", default="13", help="the GPU machine's CUDA major version (bitsandbytes libraries)")
    args = parser.parse_args(argv)
    if args.wheels:
        return fill_bundle(Path(args.wheels), args.python_version, set(args.have.split()), args.cuda)
    return gpu_check()


if __name__ == "__main__":
    sys.exit(main())
