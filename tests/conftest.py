"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, and MRPC.

The tiny model is built from a config, never downloaded, so most tests take seconds. Tests that need
real weights use the embedded SmolLM2-135M-Instruct (converted once by `make setup`).
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# `make test` runs pytest-xdist workers (-n 2): each gets its share of the cores as torch threads (set before torch
# is imported; subprocesses inherit it), so that two workers on two cores do not run four spinning OpenMP threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Under xdist (--dist loadgroup) a group's files run on one worker, one at a time: those that share the session's
# launched sweep (the tiny_sweep fixture, ~100 s: built once, not once per worker). Tests that launch several
# processes need no group: each launch binds a free port of its own (accelerate_launch below).
XDIST_GROUPS = {"tiny-sweep": {"test_sweep.py", "test_sweep_parallel.py", "test_report.py", "test_report_methods.py"}}
# Two CPU processes on one machine, through `accelerate launch` (gloo).
TWO_PROCESSES = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no")

# Absolute: some tests run the entry points as subprocesses in another working directory.
MRPC = str(Path(os.environ.get("QLORA_TEST_DATASET", REPO.parent / "shared" / "data" / "glue")).resolve())
# The instruction records and WikiText-2 of the generative tests (../shared/data, beside the checkout).
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of more than a few seconds (`make test-quick` leaves them out)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; deselected unless -m names gpu (`make gpu-check`)")
    config.addinivalue_line("markers", "slurm: needs a local Slurm and munge as root; deselected unless -m names "
                                       "slurm (`make test-slurm` installs them and runs these)")
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_XdistDeselected(), "xdist-deselected-count")
    # No silent skips: gpu and slurm tests are deselected (counted as such), never skipped, unless -m asks for them.
    for marker in ("gpu", "slurm"):
        expr = config.option.markexpr
        if marker not in expr:
            config.option.markexpr = f"({expr}) and not {marker}" if expr else f"not {marker}"


def pytest_deselected(items):
    """Under xdist the workers deselect; their count goes back to the controller (``pytest_testnodedown``) so
    that the summary line shows the deselected gpu/slurm tests as a one-process run does."""
    config = items[0].config if items else None
    if config is not None and hasattr(config, "workeroutput"):
        config.workeroutput["deselected"] = config.workeroutput.get("deselected", 0) + len(items)


class _XdistDeselected:
    """On the xdist controller (a plugin, so that ``-p no:xdist`` does not meet an unknown hook)."""

    def pytest_testnodedown(self, node, error):
        count = getattr(node, "workeroutput", {}).get("deselected", 0)
        reporter = node.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and count > len(reporter.stats.get("deselected", [])):  # each worker: the same tests
            reporter.stats["deselected"] = [None] * count


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks (otherwise it runs first)
def pytest_collection_modifyitems(config, items):
    for item in items:
        for group, files in XDIST_GROUPS.items():
            if item.path.name in files:
                item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item):
    """An xdist worker under --dist loadgroup marks a grouped test by a suffix of its node id, which pytest 9.2 no
    longer keeps (pytest-xdist#1386): the groups were silently ignored (two-process launches on one port at once,
    the tiny sweep built on both workers). Such a test fails here, in one line, instead."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail("pytest-xdist ignored the test groups (pytest-xdist#1386, pytest 9.2): install requirements.txt's "
                    "pytest pin (`make setup`), or run `make test TEST_WORKERS=0`", pytrace=False)


def pytest_collection_finish(session):
    """Fail fast, in one line, when a selected test needs something this machine lacks (never skip it)."""
    import importlib.util
    items = session.items
    if any("mrpc" in item.fixturenames or getattr(getattr(item, "module", None), "MRPC", None) for item in items) \
            and not Path(MRPC).is_dir():
        pytest.exit(f"tests need GLUE MRPC in the hub layout at {MRPC} (missing): `make test-data` downloads it to "
                    f"../shared/data/glue, or set QLORA_TEST_DATASET=<folder>", returncode=2)
    if any(item.path.name in ("test_sft.py", "test_sft_data.py") for item in items) \
            and not (SHARED / "data" / "instructions").is_dir():
        pytest.exit(f"tests/test_sft*.py need the instruction records and WikiText-2 at {SHARED / 'data'} (missing): "
                    f"the ../shared folder beside the checkout", returncode=2)
    if any(item.path.name == "test_deepspeed.py" for item in items) and importlib.util.find_spec("deepspeed") is None:
        pytest.exit("tests/test_deepspeed.py needs deepspeed: `make setup` installs it (pip install "
                    "--no-build-isolation deepspeed==<requirements.txt pin>)", returncode=2)
    if any(item.get_closest_marker("gpu") for item in items):
        import torch
        if not torch.cuda.is_available():
            pytest.exit("tests marked gpu need a CUDA device (none here); `make gpu-check` runs them where one is",
                        returncode=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*flags: str) -> list[str]:
    """`accelerate launch` with a rendezvous port of its own: under xdist two tests may launch at once, and
    torch.distributed binds Accelerate's default port (29500) for every run of several processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *flags]


def tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer the tiny models use: QLORA_TEST_TOKENIZER (a folder; `make gpu-wheels` bundles one
    for a GPU machine without the embedded model), else the embedded model's."""
    if os.environ.get("QLORA_TEST_TOKENIZER"):
        return Path(os.environ["QLORA_TEST_TOKENIZER"])
    from qlora_cls.modeling import embedded_model_dir
    return embedded_model_dir()


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# Tiny random models of every architecture family the toolkit supports, saved as base models without a
# head (as real checkpoints are), each with the SmolLM2 tokenizer (vocab_size matches it).
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "bert", "roberta", "distilbert", "deberta-v2")


def build_tiny_architecture(arch: str, out: Path, seed: int = 0, causal_lm: bool = False) -> Path:
    """``causal_lm``: saved with its LM head (the generative objectives' base), else as a base model."""
    import torch
    import transformers as tf
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, **common)
    encoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=514, **common)
    config = {
        "llama": lambda: tf.LlamaConfig(**decoder),
        "mistral": lambda: tf.MistralConfig(**decoder, sliding_window=256),
        "qwen2": lambda: tf.Qwen2Config(**decoder),
        "gemma": lambda: tf.GemmaConfig(**decoder, head_dim=16),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, **common),
        "bert": lambda: tf.BertConfig(**encoder),
        "roberta": lambda: tf.RobertaConfig(**encoder),
        "distilbert": lambda: tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                                  max_position_embeddings=512, **common),
        # DeBERTa-v3's attention: relative positions with content-to-position and position-to-content terms.
        "deberta-v2": lambda: tf.DebertaV2Config(**encoder, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                 position_biased_input=False, max_relative_positions=-1,
                                                 position_buckets=64, norm_rel_ebd="layer_norm", share_att_key=True),
    }[arch]()
    torch.manual_seed(seed)
    (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def mrpc() -> str:
    return MRPC  # checked once for the whole session: pytest_collection_finish


def tiny_args(model: str, dataset: str, results: Path, *extra: str) -> list[str]:
    """ft.py flags for a few-second run on the tiny model."""
    return ["--model_dir", model, "--dataset", dataset, "--results_path", str(results),
            "--max_train_samples", "48", "--max_eval_samples", "37", "--max_steps", "4", "--log_every", "2",
            "--eval_batch_size", "16", *extra]


def sweep_flags(model: str, dataset: str) -> list[str]:
    """Fixed ft.py flags of the test sweeps: a few seconds per point on the tiny model."""
    return ["--model_dir", model, "--dataset", dataset, "--max_train_samples", "48", "--max_eval_samples", "37",
            "--max_steps", "6", "--log_every", "2", "--eval_batch_size", "16"]


@pytest.fixture(scope="session")
def tiny_sweep(tiny_model, mrpc, tmp_path_factory):
    """A 2 prompts x 2 seeds sweep through `accelerate launch`, stopped by SIGTERM while the second run
    trains (once it has logged step 2: tests/hooks/sitecustomize.py holds it there until the signal has
    reached it, so it is interrupted at step 2 on any machine), then resumed (plain python launcher).
    Shared by test_sweep.py and test_report.py."""
    import json
    import signal
    import subprocess
    import time

    import sweep

    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "prompts"
    args = ["--sweep_dir", str(sweep_dir), "--eval_prompts", "none", "perfect", "--prompt", "none", "perfect",
            "--seed", "1", "2", *sweep_flags(tiny_model, mrpc)]
    marker = root / "stop-now"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO / "tests" / "hooks"),
               QLORA_TEST_STOP_POINT="prompt=none,seed=2", QLORA_TEST_STOP_STEP="2", QLORA_TEST_STOP_MARKER=str(marker))
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), "--launcher", "accelerate", *args],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what a cluster sends before pre-emption; Ctrl-C works alike
        first_code = proc.wait(timeout=300)
    first_manifest = json.loads((sweep_dir / "sweep.json").read_text())
    first_mtimes = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}
    second_code = sweep.main(["--launcher", "python", *args])
    return {"dir": sweep_dir, "first_code": first_code, "first_manifest": first_manifest,
            "first_mtimes": first_mtimes, "second_code": second_code, "first_log": (root / "first.log").read_text()}


# GLUE in the hub layout (parquet + a README.md whose YAML names configs and ClassLabel names), every task,
# a few rows each; only MRPC ships real data (../shared).
GLUE_FIXTURE = {  # task: (text columns, label names or None for regression, splits)
    "cola": (("sentence",), ["unacceptable", "acceptable"], ("train", "validation", "test")),
    "sst2": (("sentence",), ["negative", "positive"], ("train", "validation", "test")),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ("train", "validation", "test")),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ("train", "validation", "test")),
    "stsb": (("sentence1", "sentence2"), None, ("train", "validation", "test")),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"],
             ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ("train", "validation", "test")),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ("train", "validation", "test")),
    "wnli": (("sentence1", "sentence2"), ["not_entailment", "entailment"], ("train", "validation", "test")),
}


def build_glue_fixture(root: Path, rows: int = 24) -> Path:
    import random

    import yaml
    from datasets import ClassLabel, Dataset, Features, Value

    rng = random.Random(0)
    words = "the cat dog sat ran on a mat park quickly red blue house river old new film good bad".split()
    card = {"dataset_info": [], "configs": []}
    for task, (columns, names, splits) in GLUE_FIXTURE.items():
        label = Value("float32") if names is None else ClassLabel(names=names)
        features = Features({**{c: Value("string") for c in columns}, "label": label, "idx": Value("int32")})
        for split in splits:
            n = rows if split == "train" else rows // 2
            hidden = split.startswith("test")
            data = {c: [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(n)] for c in columns}
            data["label"] = [-1 if hidden and names else rng.uniform(0, 5) if names is None else i % len(names)
                             for i in range(n)]
            data["idx"] = list(range(n))
            (root / task).mkdir(parents=True, exist_ok=True)
            Dataset.from_dict(data, features=features).to_parquet(root / task / f"{split}-00000-of-00001.parquet")
        card["dataset_info"].append({"config_name": task, "features": [
            {"name": c, "dtype": "string"} for c in columns] + [
            {"name": "label", "dtype": "float32" if names is None else
             {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
            {"name": "idx", "dtype": "int32"}]})
        card["configs"].append({"config_name": task, "data_files": [
            {"split": s, "path": f"{task}/{s}-*"} for s in splits]})
    (root / "README.md").write_text("---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n\n# GLUE fixture\n")
    return root


@pytest.fixture(scope="session")
def glue_fixture(tmp_path_factory) -> str:
    return str(build_glue_fixture(tmp_path_factory.mktemp("glue")))


def tiny_lora_training_model(model_dir: str):
    """The tiny model in 4 bit (bf16 compute) with LoRA as ft.py adds it, lora_B made non-zero so gradients
    reach lora_A through the 4-bit layers; for the CPU repack-trap tests. Returns (model, tokenizer)."""
    import torch
    from qlora_cls.config import TrainConfig
    from qlora_cls.methods import add_trainable
    from qlora_cls.modeling import load_base_model, load_tokenizer
    cfg = TrainConfig(model_dir=model_dir, lora_dropout=0.0, gradient_checkpointing=False,
                      bnb_4bit_compute_dtype="bfloat16")
    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = add_trainable(load_base_model(cfg, model_dir, 2, tok.pad_token_id, {"": "cpu"}), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model, tok
