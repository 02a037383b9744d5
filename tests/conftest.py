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
