"""--objective sft on the scale-out paths the classification runs take: two processes through `accelerate launch`
(gloo), kill -9 mid-run and --resume (the same losses and adapter as the uninterrupted run), DeepSpeed ZeRO-2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, SHARED, TWO_PROCESSES, accelerate_launch, build_tiny_architecture
from test_deepspeed import ds_env, launch
from test_resume import _run, _start_and_kill

pytestmark = pytest.mark.slow  # real multi-process and DeepSpeed runs (make test-quick leaves them out)

FT = str(REPO / "ft.py")
INSTRUCTIONS = Path(SHARED) / "data" / "instructions" / "instruction-data.json"


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-scale")
    model = build_tiny_architecture("llama", root / "model", causal_lm=True)
    (root / "train.json").write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:72]))
    return root, model


def _args(root: Path, model: Path, run: Path, *extra: str) -> list[str]:
    # 64 training records / (batch 4 x 2 processes) = 8 steps per epoch; checkpoints every 2 steps.
    return ["--model_dir", str(model), "--objective", "sft", "--train_file", str(root / "train.json"),
            "--eval_holdout", "8", "--generate_examples", "2", "--max_new_tokens", "6", "--max_length", "128",
            "--batch_size", "4", "--eval_batch_size", "4", "--max_steps", "10", "--checkpoint_every", "2",
            "--log_every", "1", "--lr", "3e-3", "--bnb_4bit_compute_dtype", "float32", "--results_path", str(run),
            *extra]


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_process_sft_killed_and_resumed_equals_the_uninterrupted_run(sft_setup, tmp_path):
    root, model = sft_setup
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run([*accelerate_launch(*TWO_PROCESSES), FT, *_args(root, model, ref)], tmp_path)
    assert json.loads((ref / "config.json").read_text())["environment"]["world_size"] == 2
    cmd = [*accelerate_launch(*TWO_PROCESSES), FT, *_args(root, model, run)]
    _start_and_kill(cmd, tmp_path, run, after_step=4)
    proc = _run(cmd + ["--resume"], tmp_path)
    assert "resumed from checkpoint-" in proc.stderr
    # every optimizer step logged once, with the uninterrupted run's loss; the same adapter at the end
    la, lb = _log(ref), _log(run)
    assert [e["step"] for e in lb] == [e["step"] for e in la] == list(range(1, 11))
    assert [e["loss"] for e in lb] == pytest.approx([e["loss"] for e in la], abs=1e-6)
    wa = load_file(ref / "adapter" / "adapter_model.safetensors")
    wb = load_file(run / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() <= 1e-6 for k in wa)
    ma, mb = json.loads((ref / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert ma["final"]["answer_perplexity"] == pytest.approx(mb["final"]["answer_perplexity"], rel=1e-5)
    # generation ran once (the main process): one line per generated prompt
    gens = (run / "generations_validation.jsonl").read_text().splitlines()
    assert len(gens) == 2 and all({"prompt", "reference", "generation", "stopped"} <= json.loads(g).keys()
                                  for g in gens)


def test_sft_under_deepspeed_zero2_trains_and_saves_the_adapter(sft_setup, tmp_path):
    import subprocess
    root, model = sft_setup
    run = tmp_path / "ds"
    proc = subprocess.run(launch("deepspeed_zero2.yaml") + _args(root, model, run, "--max_steps", "4"), cwd=REPO,
                          env=ds_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["resolved"]["distributed_type"].endswith("DEEPSPEED")
    assert [e["step"] for e in _log(run)] == [1, 2, 3, 4]
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["answer_perplexity"] > 1 and 0 <= final["stop_rate"] <= 1
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
