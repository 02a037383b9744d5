"""Run a grid of ft.py runs (a sweep), each in its own folder, then evaluate each under every prompt.

    python sweep.py --prompt none perfect conflicting insufficient --seed 1 2 3 [ft.py flags ...]
    python sweep.py --grid grid.yaml --sweep_dir results/prompts [ft.py flags ...]
    python report.py results/prompts

Any ft.py field given two or more values is swept; fields given one value (and every other ft.py
flag) are passed unchanged to every run. List fields sweep comma-joined combinations:
``--target_modules q_proj,v_proj q_proj,k_proj,v_proj,o_proj``. Each point is launched with
``accelerate launch`` (every configured device), into ``<sweep_dir>/<field>=<value>,...``.

Re-running the same command with the same --sweep_dir resumes the sweep: finished points (their
metrics.json exists) are skipped, unfinished ones continue from their last checkpoint, failed ones
are retried. A failing point is recorded (sweep.json, <point>/sweep_error.txt) and the others go on;
the exit status is non-zero if any point failed. Ctrl-C / SIGTERM checkpoints the running point and stops.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls import procs, sweeps
from qlora_cls.cli import OneLineArgumentParser, strict_bool
from qlora_cls.errors import UsageError
from qlora_cls.files import atomic_write_json, atomic_write_text, read_json
from qlora_cls.prompts import available_templates, load_template

REPO = Path(__file__).resolve().parent
log = logging.getLogger("sweep")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="sweep.py", description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="YAML/JSON file: field: [values] (swept) or field: value (fixed); "
                                  "command-line fields win")
    p.add_argument("--sweep_dir", help="folder of the sweep (default: results/sweep-<time>); "
                                       "an existing sweep there is resumed")
    p.add_argument("--eval_prompts", nargs="*", default=available_templates(), metavar="PROMPT",
                   help="templates every trained adapter (and the base model) is evaluated under, on the "
                        "run's eval split (default: all shipped: %(default)s); give the flag alone for none")
    p.add_argument("--base_eval", type=strict_bool, default=True, metavar="{true,false}",
                   help="also evaluate the un-tuned base model under each eval prompt, once per sweep (default: true)")
    p.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate",
                   help="accelerate = `accelerate launch` (uses every configured device); python = one plain "
                        "process (default: accelerate)")
    p.add_argument("--accelerate_config", help="accelerate config file passed to `accelerate launch --config_file`")
    p.add_argument("--dry_run", type=strict_bool, nargs="?", const=True, default=False, metavar="{true,false}",
                   help="validate the grid and list the points, run nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        code = run_sweep(argv)
    except UsageError as exc:
        sys.stderr.write(f"sweep.py: error: {exc}\n")
        raise SystemExit(2)
    if code:
        raise SystemExit(code)
    return 0


def run_sweep(argv: Optional[Sequence[str]]) -> int:
    opts, rest = build_parser().parse_known_args(argv)
    if opts.accelerate_config and not Path(opts.accelerate_config).is_file():
        raise UsageError(f"--accelerate_config {opts.accelerate_config}: no such file")
    grid = sweeps.make_grid(rest, opts.grid)
    pts = sweeps.points(grid)
    sweep_dir = Path(opts.sweep_dir or REPO / "results" / f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UsageError(f"--sweep_dir {sweep_dir} is a file")
    configs = sweeps.validate(grid, pts, sweep_dir)  # every point's ft.py command line parses, or nothing runs
    for cfg in configs:  # and every evaluation prompt exists for each point's task
        for name in opts.eval_prompts:
            load_template(name, cfg.glue_task)
    if opts.dry_run:
        for p in pts:
            print(f"{p.name}: ft.py {' '.join(p.argv(grid, sweep_dir / p.name))}")
        return 0
    manifest = sweeps.Manifest.open(sweep_dir, grid, pts, configs, opts.eval_prompts)
    with manifest.lock():
        manifest.check_orphans()
        return Sweep(manifest, grid, pts, opts).run()


class Sweep:
    def __init__(self, manifest, grid, pts, opts):
        self.manifest, self.grid, self.points, self.opts = manifest, grid, pts, opts
        self.dir = manifest.dir
        self.proc: Optional[subprocess.Popen] = None
        self.signum = 0

    # -- launching ---------------------------------------------------------------------------------
    def _command(self, script: str, args: list[str]) -> list[str]:
        if self.opts.launcher == "python":
            return [sys.executable, str(REPO / script), *args]
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.opts.accelerate_config:
            launch += ["--config_file", self.opts.accelerate_config]
        return [*launch, str(REPO / script), *args]

    def _on_signal(self, signum, frame):
        # ft.py checkpoints on SIGTERM and exits; a second signal kills the point outright.
        first = not self.signum
        self.signum = self.signum or signum
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if first else signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _launch(self, script: str, args: list[str], log_path: Path, point: Optional[str] = None) -> tuple[int, str]:
        """Run one child in its own process group (so Ctrl-C reaches it only through us); output to log_path."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as out:
            start = out.tell()
            out.write(f"\n### {datetime.now().isoformat(timespec='seconds')} {' '.join(self._command(script, args))}\n")
            out.flush()
            # The child (and, through the variable, ft.py under accelerate launch) gets SIGTERM if we die.
            env = dict(os.environ, PYTHONUNBUFFERED="1", **{procs.ENV: "1"})
            me = os.getpid()
            self.proc = subprocess.Popen(self._command(script, args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=lambda: procs.exit_with_parent(me))
            if point:  # lets a later sweep see that this point is still running if we get SIGKILLed
                self.manifest.update(point, process_group=self.proc.pid)
            code = self.proc.wait()
            _wait_for_group(self.proc.pid)  # launcher gone; its workers may still be writing a checkpoint
            self.proc = None
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            tail = "\n".join(f.read().splitlines()[-25:])
        return code, tail

    # -- the sweep ---------------------------------------------------------------------------------
    def run(self) -> int:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _run(self) -> int:
        m = self.manifest
        total = len(self.points)
        print(f"sweep: {total} runs in {self.dir} (logs in {self.dir / 'logs'})", flush=True)
        for i, p in enumerate(self.points, 1):
            if self.signum:
                break
            run_dir = self.dir / p.name
            status = m.point(p.name)
            if (run_dir / "metrics.json").is_file():
                if status.get("status") != "finished":
                    m.update(p.name, status="finished")
                print(f"[{i}/{total}] {p.name}: finished earlier, skipped", flush=True)
            else:
                self._train(i, total, p, run_dir)
            if self.signum:
                break
            if (run_dir / "metrics.json").is_file():
                self._evaluate(p, run_dir)
        if self.signum:
            m.save()
            print(f"sweep: interrupted (signal {self.signum}); run the same command again to resume", flush=True)
            return 128 + self.signum
        failed = m.failed()
        summary = m.counts()
        print(f"sweep: {summary}; manifest {m.path}\nreport: python report.py {self.dir}\n"
              f"tensorboard: tensorboard --logdir {self.dir}   (each point named after its folder)", flush=True)
        return 1 if failed else 0

    def _train(self, i: int, total: int, p, run_dir: Path) -> None:
        m = self.manifest
        sweeps.clear_sweep_files(run_dir)
        resume = (run_dir / "config.json").is_file()
        args = p.argv(self.grid, run_dir) + (["--resume"] if resume else [])
        print(f"[{i}/{total}] {p.name}: {'resuming' if resume else 'training'} ...", flush=True)
        m.update(p.name, status="running", started=_now())
        started = time.perf_counter()
        code, tail = self._launch("ft.py", args, self.dir / "logs" / f"{p.name}.log", point=p.name)
        seconds = round(time.perf_counter() - started, 1)
        if code == 0 and (run_dir / "metrics.json").is_file():
            final = read_json(run_dir / "metrics.json").get("final", {})
            shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items()
                              if isinstance(v, float) and not k.startswith("eval_") and k != "padding_efficiency")
            m.update(p.name, status="finished", seconds=seconds, error=None, returncode=0)
            print(f"[{i}/{total}] {p.name}: finished in {seconds:.0f} s  {shown}", flush=True)
        elif self.signum:
            m.update(p.name, status="interrupted", seconds=seconds, returncode=code)
            print(f"[{i}/{total}] {p.name}: interrupted; checkpointed for --resume", flush=True)
        else:
            error = f"exit code {code}\n{tail}"
            m.update(p.name, status="failed", seconds=seconds, returncode=code, error=error)
            if run_dir.is_dir():
                atomic_write_text(run_dir / sweeps.ERROR_FILE, error + "\n")
            last = _last_error_line(tail)
            print(f"[{i}/{total}] {p.name}: FAILED (exit code {code}): {last}", flush=True)

    def _evaluate(self, p, run_dir: Path) -> None:
        """The trained adapter under every eval prompt, plus (once per sweep) the base model under each.

        Same split and examples as the run's own evaluation; jobs whose metrics.json exists are skipped.
        All jobs of a point share one process (imports cost more than evaluating a small model).
        """
        records = read_json(run_dir / "config.json")
        split = records.get("resolved", {}).get("eval_split", "validation")
        common = ["--results_path", str(run_dir), "--split", split, "--overwrite"]  # overwrite: only leftovers
        if records["config"].get("max_eval_samples"):
            common += ["--max_eval_samples", str(records["config"]["max_eval_samples"])]
        jobs = []  # (label, out_dir, eval.py args, base key or None)
        for prompt in self.opts.eval_prompts:
            name = Path(prompt).stem
            out = run_dir / "evals" / f"{split}-{name}"
            jobs.append((name, out, [*common, "--prompt", prompt, "--output_dir", str(out)], None))
            if self.opts.base_eval:
                key = f"{sweeps.base_key(p, self.grid)}/{split}-{name}-base"
                out = self.dir / key
                jobs.append((f"base model under {name}", out,
                             [*common, "--prompt", prompt, "--output_dir", str(out), "--base_only"], key))
        jobs = [j for j in jobs if not (j[1] / "metrics.json").is_file()]
        if not jobs:
            return
        spec = self.dir / "logs" / f".{p.name}.evals.json"
        results = spec.with_suffix(".results.json")
        results.unlink(missing_ok=True)
        spec.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec, {"jobs": [j[2] for j in jobs], "results": str(results)})
        print(f"    evaluating {p.name}: {', '.join(j[0] for j in jobs)} ...", flush=True)
        code, tail = self._launch("qlora_cls/sweep_eval.py", [str(spec)], self.dir / "logs" / f"{p.name}.evals.log")
        if self.signum:
            return
        errors = read_json(results) if results.is_file() else [f"exit code {code}: {_last_error_line(tail)}"] * len(jobs)
        point_errors = {}
        for (label, out, _, key), error in zip(jobs, errors):
            if error is None and not (out / "metrics.json").is_file():
                error = "no metrics.json written"
            if key is not None:
                self.manifest.update_base(key, {"status": "failed" if error else "finished", "run": p.name,
                                                "error": error})
            elif error:
                point_errors[label] = error
            if error:
                print(f"    evaluation {label} of {p.name}: FAILED: {error}", flush=True)
        self.manifest.update(p.name, eval_errors=point_errors or None)


def _wait_for_group(pgid: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_error_line(tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
