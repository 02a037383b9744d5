"""FastDropout: the same distribution as nn.Dropout (up to 2^-17 in p), correct gradients, seeded, wired into LoRA."""
from __future__ import annotations

import math

import pytest
import torch

from qlora_cls.fast_dropout import FastDropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_mask_drop_rate_and_scale(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last 64-bit word is only partly used
    keep, scale = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    threshold = round(p * 65536)
    assert keep.shape == (n,) and keep.dtype == torch.bool and scale == 65536 / (65536 - threshold)
    mask = keep.double() * scale
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # binomial: 5 standard deviations
    assert abs(mask.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)  # unbiased in expectation


def test_masks_are_independent_across_positions_and_calls():
    torch.manual_seed(0)
    a = keep_mask(torch.Size([400, 500]), 0.5, torch.device("cpu"))[0]
    b = keep_mask(torch.Size([400, 500]), 0.5, torch.device("cpu"))[0]
    # Neighbouring elements come from the same 64-bit word: they must still be uncorrelated.
    for x, y in ((a[:, :-1], a[:, 1:]), (a, b), (a[:, 0::4], a[:, 1::4])):
        agree = (x == y).double().mean().item()
        assert abs(agree - 0.5) < 0.01


def test_forward_backward_and_modes():
    d = FastDropout(0.25)
    x = torch.randn(4, 7, 33, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    scale = 65536 / (65536 - 16384)
    kept = y.detach() != 0
    assert torch.allclose(y[kept], x.detach()[kept] * scale)
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.bool]  # backward keeps 1 byte per element
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)  # d out / d x is the mask
    torch.manual_seed(3)
    assert torch.equal(d(x), y)  # the default generator: seeded runs and resumes draw the same masks
    d.eval()
    assert d(x) is x  # eval mode: identity, as nn.Dropout
    assert FastDropout(0.0).train()(x) is x


def test_lora_layers_get_fast_dropout_and_peft_still_works(tiny_model):
    from qlora_cls.config import TrainConfig
    from qlora_cls.methods import add_trainable
    from qlora_cls.modeling import load_base_model, load_tokenizer

    for fast in (True, False):
        cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="float32", gradient_checkpointing=False,
                          fast_cpu_dropout=fast)
        model = add_trainable(load_base_model(cfg, tiny_model, 2, load_tokenizer(tiny_model).pad_token_id,
                                         {"": "cpu"}), cfg)
        kinds = [type(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout")]
        assert kinds == [FastDropout if fast else torch.nn.Dropout] * 4  # q,v x 2 layers
    # Already converted (or non-LoRA) modules are left alone.
    assert use_fast_dropout(model) == 4 and use_fast_dropout(model) == 0
    model.train()
    batch = {"input_ids": torch.randint(5, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0])}
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # (B starts at 0: A gets none yet)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_model):
    """Checkpointed layers run forward twice; the second pass must redraw the same dropout masks (torch's
    checkpoint restores the RNG state), or the gradients would belong to a different forward."""
    from qlora_cls.config import TrainConfig
    from qlora_cls.methods import add_trainable
    from qlora_cls.modeling import load_base_model, load_tokenizer

    grads = []
    for checkpointing in (False, True):
        cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="float32", lora_dropout=0.5,
                          gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = add_trainable(load_base_model(cfg, tiny_model, 2, load_tokenizer(tiny_model).pad_token_id,
                                         {"": "cpu"}), cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so every dropout mask reaches the loss and every gradient
                torch.nn.init.normal_(p, std=0.5)
        model.train()
        torch.manual_seed(1)
        batch = {"input_ids": torch.randint(5, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long),
                 "labels": torch.tensor([0, 1, 0])}
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
