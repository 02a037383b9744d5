"""Which rows go into which training batch: a ``BatchSampler`` for a ``DataLoader`` that Accelerate prepares.

Examples are shuffled, cut into mega-batches, sorted by length inside each mega-batch and chunked into
batches, and the batch order is shuffled again (the Trainer's ``group_by_length`` idea), so a batch
carries little padding while the data order stays random. The order is a pure function of (seed, epoch).

Not transformers' ``LengthGroupedSampler``: under several processes Accelerate would repeat examples to even
out the last round. Here the largest batches are split until the batch count is a multiple of processes x
gradient_accumulation_steps: every example once per epoch on any process count, full accumulation windows
(docs/scale-out.md#batching-module-why-not-lengthgroupedsampler).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

MEGA_BATCH_MULT = 50  # mega-batch = 50 batches, as in transformers' LengthGroupedSampler


class DatasetTooSmall(ValueError):
    pass


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Every process's micro-batches of one epoch, in order (``set_epoch`` picks the epoch).

    ``multiple``: processes x gradient_accumulation_steps; the batch count is a multiple of it.
    The batch size is kept as ``size``, not ``batch_size``: Accelerate reads ``batch_size`` to pad the last
    round with repeated examples, which this sampler makes unnecessary.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, multiple: int = 1,
                 group_by_length: bool = True):
        self.lengths, self.size, self.seed, self.multiple = lengths, batch_size, seed, multiple
        self.group_by_length = group_by_length
        self.epoch = 0
        self._count = len(self.batches(0))  # the same every epoch: chunk sizes do not depend on the order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        n, size = len(self.lengths), self.size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
        perm = torch.randperm(n, generator=g).tolist()
        if self.group_by_length:
            mega = size * MEGA_BATCH_MULT
            chunks = [sorted(perm[i:i + mega], key=lambda r: -self.lengths[r]) for i in range(0, n, mega)]
            batches = [c[i:i + size] for c in chunks for i in range(0, len(c), size)]
            # Shuffle batch order so the epoch does not march from long to short within each mega-batch.
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        else:
            batches = [perm[i:i + size] for i in range(0, n, size)]
        return _balance(batches, self.multiple)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self._count


def _balance(batches: list[list[int]], multiple: int) -> list[list[int]]:
    """Split the largest batches in two until ``len(batches)`` is a multiple of ``multiple``."""
    target = math.ceil(len(batches) / multiple) * multiple
    total = sum(len(b) for b in batches)
    if total < target:
        raise DatasetTooSmall(f"{total} examples cannot fill {target} batches "
                              f"(processes x gradient_accumulation_steps = {multiple})")
    batches = list(batches)
    while len(batches) < target:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        b = batches[i]
        half = len(b) // 2
        batches[i:i + 1] = [b[:half], b[half:]]
    return batches


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Real tokens / padded tokens (1.0 = no padding)."""
    real = sum(lengths[r] for b in batches for r in b)
    padded = sum(len(b) * max(lengths[r] for r in b) for b in batches)
    return real / padded if padded else 1.0


def tokens_trained(sampler: LengthGroupedBatchSampler, world_size: int, grad_accum: int, steps: int) -> int:
    """Real (non-padding) tokens of the micro-batches that the first ``steps`` optimizer steps trained on,
    over every process. Recomputed from the sampler's order, so it is exact across resumes."""
    total, epoch, left = 0, 0, steps * grad_accum * world_size  # micro-batches (all processes) still to count
    while left > 0:
        batches = sampler.batches(epoch)
        total += sum(sampler.lengths[i] for b in batches[:left] for i in b)
        left -= len(batches)
        epoch += 1
    return total
