"""The shared prompt prefix in training: one pass over the prefix per batch gives the full pass's loss and gradients.

Oracle: ``model(**batch)`` on the whole rows, the path every other test and run uses. Dropout is off (eval
mode with gradients on, so the CPU repack trap of bitsandbytes does not arm; ft.py's loop runs in train mode,
covered end to end below with --lora_dropout 0 against --share_prefix false).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import ft
from conftest import build_tiny_architecture, tiny_args

DECODERS = ("llama", "mistral", "qwen2", "gemma", "gpt2")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-models")
    return {arch: str(build_tiny_architecture(arch, root / arch, seed=3)) for arch in DECODERS}


def _model_and_rows(model_dir: str, mrpc: str, compute: str):
    from accelerate import Accelerator

    from qlora_cls.config import TrainConfig
    from qlora_cls.data import DataSource
    from qlora_cls.pipeline import build_model, prepare_data, tokenizer_for
    from qlora_cls.prompts import load_template
    cfg = TrainConfig(model_dir=model_dir, dataset=mrpc, bnb_4bit_compute_dtype=compute, lora_dropout=0.0,
                      target_modules=["attention"])
    accelerator = Accelerator()
    cfg.resolve_auto(accelerator.device.type)
    model_path, tokenizer = tokenizer_for(cfg)
    data = prepare_data(DataSource.from_config(cfg), load_template("perfect", "mrpc"), tokenizer, ["train"], 512,
                        {"train": 24}, accelerator)
    torch.manual_seed(0)
    model = build_model(cfg, model_path, tokenizer, 2, accelerator)
    with torch.no_grad():  # LoRA B starts at zero: make the LoRA path carry gradient to A and to the prefix
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, data.batchers["train"]


def _loss_and_grads(model, forward, batch):
    model.zero_grad(set_to_none=True)
    loss = forward(model, batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,compute,tol", [(a, "float32", 1e-5) for a in DECODERS] + [("llama", "bfloat16", 3e-2)])
def test_shared_prefix_step_equals_the_full_step(arch, compute, tol, decoders, mrpc):
    from qlora_cls.prefix import TrainingPrefix, common_prefix_length
    model, rows = _model_and_rows(decoders[arch], mrpc, compute)
    p = common_prefix_length(rows.input_ids)
    # Hand check of what is shared: the first p tokens of every row are the same, the next ones are not.
    assert p >= 8 and all(r[:p] == rows.input_ids[0][:p] for r in rows.input_ids)
    assert len({tuple(r[:p + 1]) for r in rows.input_ids}) > 1
    batch = rows(list(range(8)))
    model.eval()  # no dropout; gradients on
    full_loss, full = _loss_and_grads(model, TrainingPrefix(0, "").forward(), batch)
    shared_loss, shared = _loss_and_grads(model, TrainingPrefix(p, "").forward(), batch)
    assert full.keys() == shared.keys() and any("lora_A" in n for n in full) and any("score" in n for n in full)
    assert shared_loss == pytest.approx(full_loss, rel=tol)
    for name, g in full.items():
        assert torch.linalg.norm(shared[name] - g) <= tol * torch.linalg.norm(g) + 1e-12, name


def test_the_decision_and_its_reasons():
    from transformers import BertConfig, LlamaConfig

    from qlora_cls.errors import UsageError
    from qlora_cls.prefix import training_prefix
    rows = [[5, 6, 7, 1], [5, 6, 7, 2, 3], [5, 6, 9]]

    def decide(share="auto", checkpointing=False, config=LlamaConfig(), launch=None, ids=rows):
        return training_prefix(SimpleNamespace(share_prefix=share, gradient_checkpointing=checkpointing), config,
                               ids, launch)
    assert decide().tokens == 2  # [5, 6] are in every row
    assert decide(share=True).tokens == 2
    for kwargs, words in [({"share": False}, "--share_prefix false"), ({"config": BertConfig()}, "not a causal decoder"),
                          ({"checkpointing": True}, "gradient checkpointing"), ({"launch": "MULTI_CPU"}, "MULTI_CPU"),
                          ({"ids": [[1, 2], [3, 2]]}, "share no leading tokens")]:
        d = decide(**kwargs)
        assert d.tokens == 0 and words in d.reason, (kwargs, d.reason)
        if kwargs != {"share": False}:
            with pytest.raises(UsageError, match="--share_prefix true cannot apply"):
                decide(share=True, **kwargs)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ft_with_and_without_the_shared_prefix_train_alike(tiny_model, mrpc, tmp_path):
    """ft.py's own loop (train mode, LoRA dropout off): the same losses and predictions either way. "auto" is the
    default (on where verified: the CPU); where auto is off, true opts in."""
    from qlora_cls.config import fast_path_default
    on = "auto" if fast_path_default("share_prefix", "cuda" if torch.cuda.is_available() else "cpu") else "true"
    runs = {}
    for share in (on, "false"):
        out = tmp_path / share
        ft.main(tiny_args(tiny_model, mrpc, out, "--lora_dropout", "0", "--bnb_4bit_compute_dtype", "float32",
                          "--share_prefix", share))
        runs[share] = out
    resolved = {s: json.loads((d / "config.json").read_text())["resolved"] for s, d in runs.items()}
    assert resolved[on]["train_prefix_tokens"] >= 8 and resolved["false"]["train_prefix_tokens"] == 0
    assert "--share_prefix false" in resolved["false"]["train_prefix"]
    assert _losses(runs[on]) == pytest.approx(_losses(runs["false"]), rel=1e-5)
    preds = {s: (d / "predictions_validation.csv").read_text().splitlines() for s, d in runs.items()}
    assert [r.split(",")[:3] for r in preds[on]] == [r.split(",")[:3] for r in preds["false"]]


def test_share_prefix_true_on_an_encoder_is_one_line_before_loading(tmp_path, mrpc, capsys):
    model = build_tiny_architecture("roberta", tmp_path / "roberta")
    results = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        ft.main(tiny_args(str(model), mrpc, results, "--share_prefix", "true"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ft.py: error:")]
    assert exc.value.code == 2 and len(err) == 1 and "roberta is not a causal decoder" in err[0], err
    assert not results.exists()


def test_share_prefix_auto_by_device_and_under_resume(tmp_path):
    """auto: kept for prefix.py on a CPU, off on CUDA (not verified there yet); a resumed run keeps what it was
    started with: auto stays auto (the rule it ran by), a run saved before the flag existed trains without it."""
    from dataclasses import asdict

    from qlora_cls.config import TrainConfig

    def resolved(device, saved=None, **kwargs):
        cfg = TrainConfig(bnb_4bit_compute_dtype="float32", **kwargs)
        if saved is not None:
            config = {k: v for k, v in asdict(TrainConfig(bnb_4bit_compute_dtype="float32")).items()
                      if saved != "absent" or k != "share_prefix"}
            if saved != "absent":
                config["share_prefix"] = saved
            (tmp_path / "config.json").write_text(json.dumps({"config": config}))
            cfg = TrainConfig(bnb_4bit_compute_dtype="float32", results_path=str(tmp_path), resume=True, **kwargs)
        cfg.resolve_auto(device)
        return cfg.share_prefix
    assert resolved("cpu") == "auto" and resolved("cuda") is False and resolved("cuda", share_prefix=True) is True
    assert resolved("cuda", saved="auto") == "auto" and resolved("cuda", saved=True) is True
    assert resolved("cpu", saved=False) is False and resolved("cpu", saved="absent") is False
