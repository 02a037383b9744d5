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
    mask = keep_mask(torch.Size([n]), p, torch.float32, torch.device("cpu"))
    threshold = round(p * 65536)
    assert mask.shape == (n,)
    assert torch.unique(mask).tolist() == [0.0, torch.tensor(65536 / (65536 - threshold)).item()]
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # binomial: 5 standard deviations
    assert abs(mask.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)  # unbiased in expectation


def test_masks_are_independent_across_positions_and_calls():
    torch.manual_seed(0)
    a = keep_mask(torch.Size([400, 500]), 0.5, torch.float32, torch.device("cpu")) > 0
    b = keep_mask(torch.Size([400, 500]), 0.5, torch.float32, torch.device("cpu")) > 0
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
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)  # d out / d x is the mask
    torch.manual_seed(3)
    assert torch.equal(d(x), y)  # the default generator: seeded runs and resumes draw the same masks
    d.eval()
    assert d(x) is x  # eval mode: identity, as nn.Dropout
    assert FastDropout(0.0).train()(x) is x


def test_lora_layers_get_fast_dropout_and_peft_still_works(tiny_model):
    from qlora_cls.config import TrainConfig
    from qlora_cls.modeling import add_lora, load_base_model, load_tokenizer

    for fast in (True, False):
        cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="float32", gradient_checkpointing=False,
                          fast_cpu_dropout=fast)
        model = add_lora(load_base_model(cfg, tiny_model, 2, load_tokenizer(tiny_model).pad_token_id,
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
