"""Which rows go into which batch, on which process.

Training: examples are shuffled, cut into mega-batches, sorted by length inside each mega-batch and
chunked into batches, and the batch order is shuffled again (the Trainer's ``group_by_length`` idea),
so a batch carries little padding while the data order stays random. The plan is a pure function of
(seed, epoch), identical on every process; each process takes every world_size-th batch.

Every example is used exactly once per epoch on every process count: instead of repeating examples
to even out the last round (what DistributedSampler does), the largest batches are split until the
batch count is a multiple of world_size x gradient_accumulation_steps. All processes therefore run
the same number of forward/backward passes (DDP and ZeRO need that) and every accumulation window
is full.

Evaluation: rows sorted by length (longest first, so an out-of-memory shows at once), chunked,
balanced the same way, and the predictions are put back in dataset order by row number.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

MEGA_BATCH_MULT = 50  # mega-batch = 50 batches, as in transformers' LengthGroupedSampler


class DatasetTooSmall(ValueError):
    pass


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


def train_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, world_size: int = 1,
                  rank: int = 0, grad_accum: int = 1, group_by_length: bool = True) -> list[list[int]]:
    """This process's micro-batches (lists of row numbers) for one epoch, in order."""
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if group_by_length:
        mega = batch_size * MEGA_BATCH_MULT
        chunks = [sorted(perm[i:i + mega], key=lambda r: -lengths[r]) for i in range(0, n, mega)]
        batches = [c[i:i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
        # Shuffle batch order so the epoch does not march from long to short within each mega-batch.
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    else:
        batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = _balance(batches, world_size * grad_accum)
    return batches[rank::world_size]


def eval_batches(lengths: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's evaluation batches: length-sorted, same count on every process."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return _balance(batches, world_size)[rank::world_size]


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Real tokens / padded tokens (1.0 = no padding)."""
    real = sum(lengths[r] for b in batches for r in b)
    padded = sum(len(b) * max(lengths[r] for r in b) for b in batches)
    return real / padded if padded else 1.0


def tokens_trained(lengths: Sequence[int], batch_size: int, seed: int, world_size: int, grad_accum: int,
                   group_by_length: bool, steps: int) -> int:
    """Real (non-padding) tokens of the micro-batches that the first ``steps`` optimizer steps trained on,
    over every process. Recomputed from the batch plan, so it is exact across resumes."""
    total, epoch, left = 0, 0, steps * grad_accum  # micro-batches per process still to count
    while left > 0:
        per_rank = [train_batches(lengths, batch_size, seed, epoch, world_size, r, grad_accum, group_by_length)
                    for r in range(world_size)]
        n = min(left, len(per_rank[0]))
        total += sum(lengths[i] for batches in per_rank for b in batches[:n] for i in b)
        left -= n
        epoch += 1
    return total
