"""The real entry points on a tiny 4-bit Llama: files written, reload equality, bad input, the CPU trap."""
import filecmp
import json
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import ft
from conftest import tiny_args


@pytest.fixture(scope="module")
def run(tiny_model, mrpc, tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    summary = ft.main(tiny_args(tiny_model, mrpc, path, "--epochs", "2", "--max_steps", "8"))
    return path, summary


def test_results_folder_layout(run):
    path, summary = run
    for name in ("config.json", "quant_config.json", "lora_config.json", "prompt.txt", "metrics.json",
                 "predictions_validation.csv", "train_log.jsonl", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (path / name).is_file(), name
    assert list(path.glob("events.out.tfevents.*"))  # TensorBoard events in the run folder: the run is named after it
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["config"]["r"] == 8 and cfg["environment"]["world_size"] == 1
    from qlora_cls.hardware import default_compute_dtype
    # auto resolved on CPU (bf16 with AMX-BF16, else float32), and saved resolved
    assert cfg["config"]["bnb_4bit_compute_dtype"] == default_compute_dtype("cpu")
    assert cfg["config"]["gradient_checkpointing"] is False  # auto: off on a CPU
    assert json.loads((path / "quant_config.json").read_text())["bnb_4bit_quant_type"] == "nf4"
    assert (path / "prompt.txt").read_text().startswith("Does sentence 1 mean the same")
    metrics = json.loads((path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1] and "accuracy" in metrics["final"]
    assert metrics["parameters"]["trainable"] > 0
    log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6, 8]
    # the head is saved with the adapter
    from safetensors.torch import load_file
    keys = load_file(path / "adapter/adapter_model.safetensors")
    assert any("score" in k for k in keys) and any("lora_A" in k for k in keys)
    rows = (path / "predictions_validation.csv").read_text().splitlines()
    assert rows[0] == "idx,label,prediction,prob_not_equivalent,prob_equivalent" and len(rows) == 38


def test_eval_reproduces_final_metrics_exactly(run):
    path, _ = run
    result = eval_cli.main(["--results_path", str(path), "--max_eval_samples", "37"])
    final = json.loads((path / "metrics.json").read_text())["final"]
    assert result["metrics"] == {k: final[k] for k in ("accuracy", "f1")}
    assert filecmp.cmp(path / "predictions_validation.csv", path / "evals/validation-perfect/predictions.csv",
                       shallow=False)


def test_eval_hidden_labels_and_no_overwrite(run, capsys):
    path, _ = run
    # MRPC test in this copy carries the public labels; a split of all -1 is built from a CSV below.
    out = eval_cli.main(["--results_path", str(path), "--split", "test", "--max_eval_samples", "20",
                         "--prompt", "none"])
    assert set(out["metrics"]) == {"accuracy", "f1"}
    target = path / "evals/test-none/metrics.json"
    before = target.read_bytes()
    with pytest.raises(SystemExit):
        eval_cli.main(["--results_path", str(path), "--split", "test", "--prompt", "none"])
    assert "--overwrite" in capsys.readouterr().err and target.read_bytes() == before


def test_base_only_differs_from_tuned(run):
    path, _ = run
    out = eval_cli.main(["--results_path", str(path), "--base_only", "--max_eval_samples", "37"])
    assert out["base_only"] and (path / "evals/validation-perfect-base/predictions.csv").is_file()
    tuned = (path / "predictions_validation.csv").read_text()
    assert (path / "evals/validation-perfect-base/predictions.csv").read_text() != tuned


def test_second_run_into_same_path_refused_and_old_untouched(run, tiny_model, mrpc, capsys):
    path, _ = run
    snapshot = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        ft.main(tiny_args(tiny_model, mrpc, path))
    assert exc.value.code == 2 and "never overwritten" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == snapshot


def _ft_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        ft.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("ft.py: error:")
    return err[-1]


def test_bad_inputs_fail_fast_with_one_line(tiny_model, mrpc, tmp_path, capsys):
    r = tmp_path / "r"
    assert "no such folder" in _ft_error(tiny_args(str(tmp_path / "nope"), mrpc, r), capsys)
    assert "unknown prompt" in _ft_error(tiny_args(tiny_model, mrpc, r, "--prompt", "nope"), capsys)
    assert "q_proj" in _ft_error(tiny_args(tiny_model, mrpc, r, "--target_modules", "query"), capsys)
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _ft_error(tiny_args(tiny_model, mrpc, f), capsys)
    assert "no such folder" in _ft_error(tiny_args(tiny_model, str(tmp_path / "nodata"), r), capsys)
    assert not r.exists()  # nothing was created by failed runs


def test_unreachable_hub_is_one_line(tiny_model, mrpc, tmp_path, capsys, monkeypatch):
    from qlora_cls import hub
    monkeypatch.setattr(hub, "_reachable", False)
    err = _ft_error(tiny_args("someorg/somemodel", mrpc, tmp_path / "r"), capsys)
    assert "unreachable" in err


def _csv(path: Path, rows):
    path.write_text("text,label\n" + "".join(f"\"{t}\",{l}\n" for t, l in rows))
    return str(path)


def test_local_files_errors_and_run(tiny_model, tmp_path, capsys):
    texts = [(f"example number {i} " + "word " * (i % 7), i % 2) for i in range(40)]
    train = _csv(tmp_path / "train.csv", texts)
    val = _csv(tmp_path / "val.csv", texts[:11])
    tpl = tmp_path / "plain.txt"
    tpl.write_text("{text}\n")
    def args(out, train_file=train, val_file=val, *extra):
        return ["--model_dir", tiny_model, "--train_file", train_file, "--validation_file", val_file,
                "--text_columns", "text", "--prompt", str(tpl), "--max_steps", "2", "--eval_batch_size", "4",
                "--results_path", str(tmp_path / out), *extra]

    bad = _csv(tmp_path / "bad.csv", texts[:5] + [("oops", 7)])
    assert "outside the label set" in _ft_error(args("a", train, bad, "--label_names", "neg", "pos"), capsys)
    assert "lacks column" in _ft_error(args("b", train, val, "--label_column", "gold"), capsys)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert "has a header (text, label) but no rows" in _ft_error(args("c", train, str(empty)), capsys)
    summary = ft.main(args("ok"))
    assert summary["final"]["split"] == "validation" and "accuracy" in summary["final"]


def test_trap_eval_between_train_steps_keeps_lora_gradients(tiny_model):
    """train -> eval -> train gives the same LoRA gradients as train -> train (DEVELOPERS.md trap)."""
    from conftest import tiny_lora_training_model
    model, tok = tiny_lora_training_model(tiny_model)
    enc = tok(["a short one", "a much longer sentence about cats and dogs"], padding=True, return_tensors="pt")
    batch = dict(enc, labels=torch.tensor([0, 1]))

    def grads():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    first = grads()
    model.eval()
    with torch.inference_mode():
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    second = grads()
    lora_a = [n for n in first if "lora_A" in n]
    assert lora_a and all(first[n].abs().sum() > 0 for n in lora_a)
    for n in first:
        torch.testing.assert_close(second[n], first[n], rtol=1e-4, atol=1e-6)
