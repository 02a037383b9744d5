"""Two CPU processes through `accelerate launch` (gloo): one prediction per example, same adapter, rank 0 writes."""
import json
import os
import subprocess

import pytest

from conftest import REPO, TWO_PROCESSES, accelerate_launch, tiny_args

pytestmark = pytest.mark.slow  # real training runs of a minute or more (make test-quick skips them)


def test_two_process_run(tiny_model, mrpc, tmp_path):
    run = tmp_path / "run2"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RANK_DUMP_DIR=str(tmp_path))
    cmd = [*accelerate_launch(*TWO_PROCESSES), str(REPO / "tests" / "ft_rank_dump.py"),
           *tiny_args(tiny_model, mrpc, run, "--max_eval_samples", "37", "--max_steps", "3")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 0, "\n".join(errors[:5]) + proc.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["world_size"] == 2
    rows = (run / "predictions_validation.csv").read_text().splitlines()[1:]
    idx = [r.split(",")[0] for r in rows]
    assert len(idx) == 37 and len(set(idx)) == 37  # odd-sized split: exactly one prediction each
    # both ranks ended with the same adapter (DDP kept them in sync); rank files come from tests/ft_rank_dump.py
    from safetensors.torch import load_file
    a0 = load_file(tmp_path / "rank0.safetensors")
    a1 = load_file(tmp_path / "rank1.safetensors")
    assert a0.keys() == a1.keys() and all((a0[k] == a1[k]).all() for k in a0)
    # only rank 0 wrote into the run folder: one event-file writer, no stray files from rank 1
    events = [p.name for p in run.glob("events.out.tfevents.*")]
    assert sorted(p.name for p in run.iterdir()) == sorted([
        "adapter", "config.json", "lora_config.json", "metrics.json", "predictions_validation.csv", "prompt.txt",
        "quant_config.json", "train_log.jsonl", *events])
    assert len(events) == 1  # scalars + hparams, rank 0 only, in the run folder (TensorBoard names the run after it)


def test_two_process_label_words_run_scores_each_example_once_as_one_process_does(tiny_model, mrpc, tmp_path):
    """--classifier label_words on two processes (DDP: the training forward that projects only the label
    positions goes through the wrapper): one prediction per example, the same adapter on both ranks, and the
    two-process evaluation's probabilities equal one process's (eval.py, in this process) on the same adapter."""
    import csv

    import eval as eval_cli
    run = tmp_path / "lw2"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RANK_DUMP_DIR=str(tmp_path))
    cmd = [*accelerate_launch(*TWO_PROCESSES), str(REPO / "tests" / "ft_rank_dump.py"),
           *tiny_args(tiny_model, mrpc, run, "--max_eval_samples", "37", "--max_steps", "3", "--classifier", "label_words",
                      "--bnb_4bit_compute_dtype", "float32")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["environment"]["world_size"] == 2
    from safetensors.torch import load_file
    a0, a1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a0.keys() == a1.keys() and a0 and all((a0[k] == a1[k]).all() for k in a0)

    def read(path):
        with open(path, newline="") as fh:
            return {row["idx"]: row for row in csv.DictReader(fh)}
    two = read(run / "predictions_validation.csv")
    assert len(two) == 37
    eval_cli.main(["--results_path", str(run), "--output_dir", str(tmp_path / "one")])
    one = read(tmp_path / "one" / "predictions.csv")
    assert one.keys() == two.keys()
    for i in one:
        assert one[i]["prediction"] == two[i]["prediction"]
        assert abs(float(one[i]["prob_equivalent"]) - float(two[i]["prob_equivalent"])) <= 1e-4, i
