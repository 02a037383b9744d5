"""merge.py: a standalone transformers folder whose predictions are the adapter's.

Oracles: the run's own predictions_validation.csv (written by ft.py with the 4-bit adapter), the
adapter's logits recomputed through PEFT on the 4-bit base, and a plain transformers reload of the
merged folder (no qlora_cls code in the loop). A high learning rate makes the LoRA deltas large, and
each test checks the merge moved the logits away from the bare de-quantized base by far more than the
tolerance, so an adapter silently dropped in the merge would fail.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ft
import merge
from conftest import MRPC, build_tiny_architecture, tiny_args

LOGIT_TOL = 1e-4  # measured: max |merged - adapter| <= 3e-7 on the tiny models, 1.2e-5 on SmolLM2 (float32)
# A run that computed in bf16: the merged model (float32) is the more exact of the two; the adapter's bf16
# rounding is the difference (measured 4.6e-4 on the tiny Llama, logits ~0.3).
BF16_LOGIT_TOL = 5e-3


def _run(tmp_path_factory, arch: str, mrpc: str, compute_dtype: str = "float32") -> Path:
    root = tmp_path_factory.mktemp(f"merge-{arch}-{compute_dtype}")
    model = build_tiny_architecture(arch, root / "model", seed=1)
    run = root / "run"
    # The compute dtype is pinned: auto picks whichever the CPU runs faster, and the exactness bounds here
    # are float32's (a bf16 run has its own test).
    ft.main(tiny_args(str(model), mrpc, run, "--lr", "1e-2", "--seed", "3", "--bnb_4bit_compute_dtype", compute_dtype))
    return run


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, mrpc):
    return _run(tmp_path_factory, "llama", mrpc)


@pytest.fixture(scope="module")
def roberta_run(tmp_path_factory, mrpc):
    return _run(tmp_path_factory, "roberta", mrpc)


def test_a_bf16_run_merges_to_the_same_predictions_within_bf16_rounding(tmp_path_factory, mrpc, tmp_path):
    run = _run(tmp_path_factory, "llama", mrpc, "bfloat16")
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    rows = _examples(run)
    merged, adapter = plain_logits(out, rows), adapter_logits(run, run / "adapter", rows)
    diff = np.abs(merged - adapter).max()
    assert diff <= BF16_LOGIT_TOL and (merged.argmax(1) == adapter.argmax(1)).all()
    # the merge is of the trained adapter, not of the bare base: that is over 10x further away
    assert np.abs(adapter_logits(run, run / "adapter", rows, bare=True) - adapter).max() > 10 * diff


def _examples(run: Path, n: int = 37) -> list[dict]:
    import datasets
    return list(datasets.load_dataset(MRPC, "mrpc")["validation"].select(range(n)))


def plain_logits(folder: Path, rows: list[dict]) -> np.ndarray:
    """The merged folder through plain transformers only, as its model card says to use it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = (folder / "prompt.txt").read_text().rstrip("\n")
    batch = tokenizer([template.format(**{c: r[c] for c in ("sentence1", "sentence2")}) for r in rows],
                      padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def run_probabilities(run: Path) -> np.ndarray:
    rows = list(csv.DictReader(open(run / "predictions_validation.csv")))
    return np.array([[float(r["prob_not_equivalent"]), float(r["prob_equivalent"])] for r in rows])


def adapter_logits(run: Path, adapter_dir: Path, rows: list[dict], bare: bool = False) -> np.ndarray:
    """The adapter on its 4-bit base, through PEFT (bare=True: the de-quantized base alone, no adapter)."""
    from peft import PeftModel

    from qlora_cls.runs import load_run_config
    from qlora_cls.modeling import load_base_model, load_tokenizer
    cfg, records = load_run_config(run)
    tokenizer = load_tokenizer(cfg.model_dir)
    torch.manual_seed(0)
    model = load_base_model(cfg, cfg.model_dir, 2, tokenizer.pad_token_id, {"": "cpu"})
    if bare:
        model = model.dequantize(dtype=torch.float32).float()
        # the trained head, without the LoRA weights
        from safetensors.torch import load_file
        state = load_file(adapter_dir / "adapter_model.safetensors")
        head = {k.split("base_model.model.", 1)[1].replace(".modules_to_save.default", ""): v
                for k, v in state.items() if "lora_" not in k and "ia3_" not in k}
        missing = model.load_state_dict(head, strict=False)
        assert not missing.unexpected_keys
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    template = (run / "prompt.txt").read_text().rstrip("\n")
    batch = tokenizer([template.format(sentence1=r["sentence1"], sentence2=r["sentence2"]) for r in rows],
                      padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().numpy()


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("which", ["llama", "roberta"])
def test_merged_predictions_equal_the_adapters(which, llama_run, roberta_run, tmp_path):
    run = {"llama": llama_run, "roberta": roberta_run}[which]
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    assert {p.name for p in out.iterdir()} >= {"README.md", "config.json", "model.safetensors", "prompt.txt",
                                                "qlora_cls.json", "tokenizer.json", "tokenizer_config.json"}
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(out)
    kinds = {type(m).__module__.split(".")[0] for m in model.modules()}
    assert "peft" not in kinds and "bitsandbytes" not in kinds, kinds
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    assert model.config.label2id == {"not_equivalent": 0, "equivalent": 1}
    assert model.config.problem_type == "single_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id == model.config.pad_token_id is not None

    rows = _examples(run)
    merged = plain_logits(out, rows)
    adapter = adapter_logits(run, run / "adapter", rows)
    assert np.abs(merged - adapter).max() <= LOGIT_TOL
    assert (merged.argmax(1) == adapter.argmax(1)).all()
    probs = run_probabilities(run)  # ft.py's own predictions of the final adapter (6 decimals)
    assert (softmax(merged).argmax(1) == probs.argmax(1)).all()
    assert np.abs(softmax(merged) - probs).max() <= 1e-5
    # the adapter really is in there: without its LoRA weights the logits move 100x further than the merge's error
    bare = adapter_logits(run, run / "adapter", rows, bare=True)
    assert np.abs(bare - adapter).max() > 100 * max(np.abs(merged - adapter).max(), 1e-7)


@pytest.mark.slow
def test_card_and_info_describe_the_run(llama_run, tmp_path):
    out = merge.main(["--results_path", str(llama_run), "--output_dir", str(tmp_path / "m")])
    info = json.loads((out / "qlora_cls.json").read_text())
    records = json.loads((llama_run / "config.json").read_text())
    summary = json.loads((llama_run / "metrics.json").read_text())
    assert info["format"] == "qlora-cls-merged/1"
    assert info["source_run"] == str(llama_run.resolve())
    assert info["task"] == "mrpc" and info["label_names"] == ["not_equivalent", "equivalent"]
    assert info["text_columns"] == ["sentence1", "sentence2"] and info["prompt_name"] == "perfect"
    assert info["max_length"] == 512 and info["num_labels"] == 2 and info["main_metric"] == "accuracy"
    assert info["metrics"] == {"accuracy": summary["final"]["accuracy"], "f1": summary["final"]["f1"]}
    assert info["baseline"] == summary["baseline"]
    assert info["merged_into"] == "dequantized-4bit" and info["dtype"] == "float32"
    assert info["base_model"] == records["resolved"]["model_path"]
    assert (out / "prompt.txt").read_text() == (llama_run / "prompt.txt").read_text()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "de-quantized" in card and "original-16bit" in card
    assert f"| this model | {summary['final']['accuracy']:.4f} | {summary['final']['f1']:.4f} |" in card
    b = summary["baseline"]["metrics"]
    assert f"| trivial baseline (always 'equivalent') | {b['accuracy']:.4f} | {b['f1']:.4f} |" in card
    # the card's snippet, run as written (real rows in place of "..."), predicts what the folder predicts
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    rows = _examples(llama_run, 5)
    code = re.sub(r"rows = \[.*\]", "rows = " + repr([{"sentence1": r["sentence1"], "sentence2": r["sentence2"]}
                                                     for r in rows]), code)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = ["not_equivalent", "equivalent"]
    expected = [names[i] for i in plain_logits(out, rows).argmax(1)]
    assert proc.stdout.strip().splitlines()[-1] == repr(expected)


def test_existing_output_dir_is_refused_and_left_alone(llama_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        merge.main(["--results_path", str(llama_run), "--output_dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merge.py: error: --output_dir") and "already exists" in err[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


def test_failure_leaves_no_half_written_folder(llama_run, tmp_path, monkeypatch):
    from qlora_cls import merging

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(merging, "model_card", broken)
    with pytest.raises(OSError):
        merge.main(["--results_path", str(llama_run), "--output_dir", str(tmp_path / "m")])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_non_peft_weights_are_refused(llama_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    (run / "adapter" / "adapter_config.json").unlink()  # what a bottleneck-adapter / full run leaves
    records = json.loads((run / "config.json").read_text())
    records["config"]["method"] = "adapter"
    (run / "config.json").write_text(json.dumps(records))
    with pytest.raises(SystemExit) as exc:
        merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "method 'adapter'" in err[0] and "PEFT adapter" in err[0]
    assert not (tmp_path / "m").exists()


def test_a_full_fine_tuning_run_exports_its_trained_weights(tmp_path_factory, mrpc, tmp_path):
    """--method full has nothing to merge: the folder holds the trained weights, and predicts what ft.py did."""
    root = tmp_path_factory.mktemp("merge-full")
    model_dir = build_tiny_architecture("llama", root / "model", seed=1)
    run = root / "run"
    ft.main(tiny_args(str(model_dir), mrpc, run, "--method", "full", "--lr", "1e-3", "--seed", "3",
                      "--bnb_4bit_compute_dtype", "float32"))
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert {type(m).__module__.split(".")[0] for m in model.modules()} <= {"transformers", "torch"}
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    rows = _examples(run)
    merged = softmax(plain_logits(out, rows))
    probs = run_probabilities(run)  # ft.py's predictions with the weights it had just trained, in memory
    assert (merged.argmax(1) == probs.argmax(1)).all() and np.abs(merged - probs).max() <= 1e-5
    # the trained weights, not the base's: the untouched base (with a head) predicts something else
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    trained = dict(model.named_parameters())
    moved = [n for n, p in base.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert len(moved) > 10, moved
    info = json.loads((out / "qlora_cls.json").read_text())
    assert info["method"] == "full" and info["peft_type"] is None
    card = (out / "README.md").read_text()
    assert "full fine-tuning" in card and "fine-tuned" in card.splitlines()[card.splitlines().index("---", 1) + 2]


def _peft_adapter(run: Path, dest: Path, kind: str) -> None:
    """A DoRA or IA3 adapter (random, non-trivial weights) built with PEFT on the run's own 4-bit base."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    from qlora_cls.runs import load_run_config
    from qlora_cls.modeling import load_base_model
    cfg, records = load_run_config(run)
    torch.manual_seed(5)
    model = load_base_model(cfg, cfg.model_dir, 2, records["resolved"]["pad_token_id"], {"": "cpu"})
    if kind == "dora":
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            use_dora=True, init_lora_weights=False, modules_to_save=["score"])
    else:
        config = IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"], init_ia3_weights=False, modules_to_save=["score"])
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model.save_pretrained(dest)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_dora_and_ia3_adapters_merge_exactly(kind, llama_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    shutil.rmtree(run / "adapter")
    _peft_adapter(run, run / "adapter", kind)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == (
        "LORA" if kind == "dora" else "IA3")
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "m")])
    rows = _examples(run, 16)
    merged, adapter = plain_logits(out, rows), adapter_logits(run, run / "adapter", rows)
    assert np.abs(merged - adapter).max() <= LOGIT_TOL and (merged.argmax(1) == adapter.argmax(1)).all()
    bare = adapter_logits(run, run / "adapter", rows, bare=True)
    assert np.abs(bare - adapter).max() > 100 * max(np.abs(merged - adapter).max(), 1e-7)
    assert json.loads((out / "qlora_cls.json").read_text())["peft_type"] == ("LORA" if kind == "dora" else "IA3")


def test_merge_into_original_16bit_weights(llama_run, tmp_path):
    """The documented option: the original weights + the adapter, equal to PEFT's unmerged forward on them."""
    from peft import PeftModel

    from qlora_cls.runs import load_run_config
    from qlora_cls.modeling import load_base_model
    out = merge.main(["--results_path", str(llama_run), "--output_dir", str(tmp_path / "m"),
                      "--merge_into", "original-16bit"])
    info = json.loads((out / "qlora_cls.json").read_text())
    assert info["merged_into"] == "original-16bit"
    assert "trained against the 4-bit quantized base, so predictions" in (out / "README.md").read_text()
    rows = _examples(llama_run, 16)
    merged = plain_logits(out, rows)
    cfg, records = load_run_config(llama_run)
    import dataclasses
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    base = load_base_model(dataclasses.replace(cfg, method="lora", load_in_4bit=False, bnb_4bit_compute_dtype="float32"),
                           cfg.model_dir, 2, records["resolved"]["pad_token_id"], {"": "cpu"})
    oracle = PeftModel.from_pretrained(base, str(llama_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(out)
    template = (out / "prompt.txt").read_text().rstrip("\n")
    batch = tok([template.format(sentence1=r["sentence1"], sentence2=r["sentence2"]) for r in rows],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = oracle(**batch).logits.float().numpy()
    assert np.abs(merged - expected).max() <= LOGIT_TOL
    # and it is not the de-quantized merge: the quantization error shows in the logits
    assert np.abs(merged - adapter_logits(llama_run, llama_run / "adapter", rows)).max() > LOGIT_TOL


def test_bad_flags_are_one_line(tmp_path, capsys):
    for argv, needle in ((["--output_dir", str(tmp_path / "m")], "--results_path is required"),
                         (["--results_path", str(tmp_path)], "--output_dir is required"),
                         (["--results_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "m")],
                          "no such folder"),
                         (["--results_path", str(tmp_path), "--output_dir", "m", "--merge_into", "fp4"], "fp4")):
        with pytest.raises(SystemExit) as exc:
            merge.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], (argv, err)


@pytest.mark.slow
def test_embedded_smollm2_merged_equals_unmerged_on_mrpc(mrpc, tmp_path):
    """The real embedded model (4-bit NF4 SmolLM2-135M): merged argmax = adapter argmax on 64 MRPC examples.

    float32 compute, pinned: with bf16 compute (auto's pick on a CPU where bf16 GEMMs are faster) the
    adapter's own rounding moves near-tie examples across the boundary; bench/merge_check.py measures that."""
    run = tmp_path / "run"
    ft.main(["--dataset", mrpc, "--results_path", str(run), "--max_train_samples", "64", "--max_eval_samples", "64",
             "--max_steps", "8", "--log_every", "4", "--lr", "1e-3", "--seed", "0", "--bnb_4bit_compute_dtype", "float32",
             "--latency_calls", "0"])
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    rows = _examples(run, 64)
    merged = plain_logits(out, rows)
    probs = run_probabilities(run)
    assert (softmax(merged).argmax(1) == probs.argmax(1)).all()
    assert np.abs(softmax(merged) - probs).max() <= 1e-4


def test_merge_check_labels_the_whole_split_both_ways(llama_run, mrpc, tmp_path):
    """bench/merge_check.py on a float32 run: every row labelled by both, in the same order, equal argmax."""
    from bench import merge_check
    import datasets
    result = merge_check.main(["--results_path", str(llama_run), "--dataset", mrpc, "--out", str(tmp_path)])
    n = len(datasets.load_dataset(mrpc, "mrpc")["validation"])
    assert result["examples"] == n and result["argmax_equal"] == n and result["disagreements"] == []
    assert result["max_abs_probability_diff"] <= 1e-5 and result["compute_dtype"] == "float32"
