"""Finished generative runs (ft.py --objective sft | lm) on a tiny random causal Llama, made once per test session
and shared by tests/test_merge_generative.py and tests/test_eval_generative.py.

16-bit runs compute in float32 with the plain evaluation path (--fast_eval false), so a reload is the same
computation. The tiny model is build_tiny_architecture's Llama (untied LM head): its greedy answers vary from prompt
to prompt (the other tiny Llama answers newlines), and a few steps at a high learning rate change them, so equal
generations say something about the merged weights."""
from __future__ import annotations

import json
from pathlib import Path

import ft
from conftest import SHARED, build_tiny_architecture

INSTRUCTIONS = Path(SHARED) / "data" / "instructions" / "instruction-data.json"
WIKITEXT = Path(SHARED) / "data" / "wikitext-2" / "valid.txt"
MAX_NEW_TOKENS = 12
_made: dict = {}

RUNS = {  # name: ft.py flags beyond the common ones
    "lora-utterances": ["--objective", "sft", "--method", "lora", "--chat_template", "utterances"],
    "qlora": ["--objective", "sft", "--method", "qlora"],
    "lm": ["--objective", "lm", "--method", "lora", "--max_length", "64"],
}


def _root(tmp_path_factory) -> Path:
    if "root" not in _made:
        root = _made["root"] = tmp_path_factory.mktemp("generative-runs")
        build_tiny_architecture("llama", root / "model", causal_lm=True)
        (root / "train.json").write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:40]))
        lines = WIKITEXT.read_text(encoding="utf-8").splitlines()
        (root / "train.txt").write_text("\n".join(lines[:60]), encoding="utf-8")
        (root / "test.txt").write_text("\n".join(lines[60:90]), encoding="utf-8")
    return _made["root"]


def model_dir(tmp_path_factory) -> Path:
    return _root(tmp_path_factory) / "model"


def finished_run(tmp_path_factory, name: str) -> Path:
    """The run folder of RUNS[name], trained on first use."""
    if name not in _made:
        root = _root(tmp_path_factory)
        run = root / name
        data = (["--train_file", str(root / "train.txt"), "--validation_file", str(root / "test.txt")] if name == "lm"
                else ["--train_file", str(root / "train.json"), "--eval_holdout", "8", "--generate_examples", "4",
                      "--max_new_tokens", str(MAX_NEW_TOKENS), "--max_length", "128"])
        ft.main(["--model_dir", str(root / "model"), "--results_path", str(run), *data, "--max_steps", "2",
                 "--batch_size", "4", "--eval_batch_size", "4", "--log_every", "1", "--lr", "3e-3",
                 "--bnb_4bit_compute_dtype", "float32", "--fast_eval", "false", *RUNS[name]])
        _made[name] = run
    return _made[name]
