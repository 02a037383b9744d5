"""The fast paths on CUDA: what `--fast_eval true` and `--share_prefix true` claim there, checked for real.

Deselected unless ``-m gpu`` is given (tests/conftest.py); `make gpu-check` runs them, and a session that
selects them without a CUDA device stops in one line. Oracles as on the CPU (tests/test_fast_eval.py,
tests/test_prefix.py): the plain path ``predict(..., fast=False)`` and the full ``model(**batch)``.
Tolerances: float32 as on the CPU up to the GPU's kernels (1e-4); bf16 compute: its rounding (3e-2, the
bound test_prefix.py uses for bf16 on the CPU), with argmax equal wherever the plain margin exceeds it.
Once these and `make gpu-check` pass on a GPU, "cuda" goes into config.VERIFIED_FAST_PATHS.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ft
from conftest import tiny_args
from test_fast_eval import _setup, tiny_models  # noqa: F401 (a fixture)
from test_prefix import DECODERS, _loss_and_grads, _model_and_rows, decoders  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gpu

TOL = {"float32": 1e-4, "bfloat16": 3e-2}


@pytest.mark.parametrize("arch,compute", [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float32"),
                                          ("roberta", "bfloat16")])
def test_fast_path_equals_plain_path_on_cuda(arch, compute, tiny_models, mrpc):
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models[arch], mrpc, compute)
    assert accelerator.device.type == "cuda"
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    plain, _ = predict(model, batcher, 8, accelerator)
    fast, stats = predict(model, batcher, 8, accelerator, fast=True)
    tol = TOL[compute]
    assert np.abs(fast - plain).max() <= tol
    margin = np.abs(plain[:, 1] - plain[:, 0])
    assert (fast.argmax(1) == plain.argmax(1))[margin > 2 * tol].all()
    assert stats["eval_dequantized"] is True and stats["eval_dequantized_layers"] > 0
    assert (stats["eval_prefix_tokens"] > 5) == (arch != "roberta")
    assert "eval_fused_gated_mlps" not in stats  # the CPU-only rewrites stay off on a GPU
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the training model is untouched


@pytest.mark.parametrize("arch,compute", [(a, "float32") for a in DECODERS] + [("llama", "bfloat16")])
def test_shared_prefix_step_equals_the_full_step_on_cuda(arch, compute, decoders, mrpc):
    from qlora_cls.prefix import TrainingPrefix, common_prefix_length
    model, rows = _model_and_rows(decoders[arch], mrpc, compute)
    p = common_prefix_length(rows.input_ids)
    batch = {k: v.to("cuda") for k, v in rows(list(range(8))).items()}
    model.eval()
    full_loss, full = _loss_and_grads(model, TrainingPrefix(0, "").forward(), batch)
    shared_loss, shared = _loss_and_grads(model, TrainingPrefix(p, "").forward(), batch)
    tol = TOL[compute] if compute == "bfloat16" else 1e-4
    assert p >= 8 and full.keys() == shared.keys()
    assert shared_loss == pytest.approx(full_loss, rel=tol)
    for name, g in full.items():
        assert torch.linalg.norm(shared[name] - g) <= tol * torch.linalg.norm(g) + 1e-9, name


def test_ft_on_cuda_records_the_fast_paths_off_by_default_and_on_when_asked(tiny_models, mrpc, tmp_path):
    """The defaults resolve off on CUDA (until verified) and config.json says so; true opts in and is recorded."""
    records = {}
    for name, extra in (("default", []), ("opt-in", ["--fast_eval", "true", "--share_prefix", "true"])):
        run = tmp_path / name
        ft.main(tiny_args(tiny_models["llama"], mrpc, run, "--lora_dropout", "0", "--latency_calls", "0", *extra))
        records[name] = json.loads((run / "config.json").read_text())
    default, opt_in = records["default"], records["opt-in"]
    assert default["config"]["fast_eval"] is False and default["config"]["share_prefix"] is False
    assert default["resolved"]["train_prefix_tokens"] == 0
    assert opt_in["config"]["fast_eval"] is True and opt_in["config"]["share_prefix"] is True
    assert opt_in["resolved"]["train_prefix_tokens"] >= 8
    metrics = json.loads((tmp_path / "opt-in" / "metrics.json").read_text())
    assert metrics["epochs"][-1]["eval_fast_path"] is True
