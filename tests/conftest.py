"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, and MRPC.

The tiny model is built from a config, never downloaded, so most tests take seconds. Tests that need
real weights use the embedded SmolLM2-135M-Instruct (converted once by `make setup`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Absolute: some tests run the entry points as subprocesses in another working directory.
MRPC = str(Path(os.environ.get("QLORA_TEST_DATASET", REPO.parent / "shared" / "data" / "glue")).resolve())


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_cls.modeling import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def mrpc() -> str:
    if not Path(MRPC).is_dir():
        pytest.skip(f"local MRPC not found at {MRPC} (set QLORA_TEST_DATASET)")
    return MRPC


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
    trains (after its first log line), then resumed (plain python launcher). Shared by test_sweep.py
    and test_report.py."""
    import json
    import signal
    import subprocess
    import time

    import sweep

    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "prompts"
    args = ["--sweep_dir", str(sweep_dir), "--eval_prompts", "none", "perfect", "--prompt", "none", "perfect",
            "--seed", "1", "2", *sweep_flags(tiny_model, mrpc)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), "--launcher", "accelerate", *args],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        second = sweep_dir / "prompt=none,seed=2"
        deadline = time.monotonic() + 300
        while proc.poll() is None and not (second / "train_log.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what a cluster sends before pre-emption; Ctrl-C works alike
        first_code = proc.wait(timeout=300)
    first_manifest = json.loads((sweep_dir / "sweep.json").read_text())
    first_mtimes = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}
    second_code = sweep.main(["--launcher", "python", *args])
    return {"dir": sweep_dir, "first_code": first_code, "first_manifest": first_manifest,
            "first_mtimes": first_mtimes, "second_code": second_code, "first_log": (root / "first.log").read_text()}
