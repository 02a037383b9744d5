"""A faster LoRA dropout for CPU training.

PEFT applies ``nn.Dropout`` to the input of every LoRA layer. On a CPU, torch draws its mask one
float at a time through ``bernoulli_`` (~5 ms for a batch of 8 x 96 tokens x 576 features here,
two calls per layer): 7 % of a training step of the embedded model in ``bench/profile_step.py``.
``FastDropout`` draws 64 random bits per call instead and uses them as four 16-bit uniform numbers,
one per element, which is ~4x faster. An element is dropped when its number falls below
``round(p * 65536)``, so the drop probability differs from ``p`` by at most 2**-17; kept elements
are scaled by the inverse of the exact keep probability, so the output's expectation is the input,
as with ``nn.Dropout``. The mask comes from torch's default generator: seeded runs and resumed runs
(which restore the RNG state) draw the same masks. On other devices, in eval mode and for ``p = 0``
it is plain ``nn.Dropout``.
"""
from __future__ import annotations

import torch

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean ``shape`` tensor, True where an element is kept, and ``1 / keep probability``."""
    threshold = round(p * _LEVELS)
    numel = shape.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    uniform16 = words.view(torch.int16)[:numel].view(shape)  # each lane uniform on [-32768, 32767]
    return uniform16 >= threshold - (_LEVELS // 2), _LEVELS / (_LEVELS - threshold)


class _ScaledMask(torch.autograd.Function):
    """``x * keep * scale``, saving only the boolean mask for backward (1 byte per element, as torch's dropout)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


class FastDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.inplace or x.device.type != "cpu"
                or not 0 < round(self.p * _LEVELS) < _LEVELS):
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p, x.device)
        return _ScaledMask.apply(x, keep, scale)


def use_fast_dropout(model) -> int:
    """Replace the ``nn.Dropout`` modules of the model's LoRA layers by ``FastDropout``; returns how many."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, d in dropouts.items():
            if type(d) is torch.nn.Dropout:
                dropouts[name] = FastDropout(d.p)
                dropouts[name].train(d.training)
                count += 1
    return count
