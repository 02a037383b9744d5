from collections import Counter

import pytest
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from qlora_cls.batching import DatasetTooSmall, LengthGroupedBatchSampler, padding_efficiency

LENGTHS = [((i * 37) % 90) + 10 for i in range(203)]  # odd size on purpose


def train_batches(lengths, batch_size, seed, epoch, world=1, rank=0, accum=1, grouped=True):
    """Process ``rank``'s batches of ``epoch`` as ft.py gets them: the sampler in a DataLoader, sharded by
    Accelerate's own prepare_data_loader (the rows themselves are the dataset, so a batch is its row numbers)."""
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed, world * accum, grouped)
    loader = prepare_data_loader(DataLoader(range(len(lengths)), batch_sampler=sampler, collate_fn=list),
                                 num_processes=world, process_index=rank, put_on_device=False)
    loader.set_epoch(epoch)  # as ft.py's loop does
    sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_epoch_has_the_batches_of_an_uninterrupted_run(world):
    """A fresh loader started at epoch 2 (a resume) yields what the third pass of one loader yields."""
    sampler = LengthGroupedBatchSampler(LENGTHS, 8, 3, world)
    loader = prepare_data_loader(DataLoader(range(len(LENGTHS)), batch_sampler=sampler, collate_fn=list),
                                 num_processes=world, process_index=world - 1, put_on_device=False)
    passes = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        passes.append(list(loader))
    assert passes[0] != passes[1] != passes[2]
    assert train_batches(LENGTHS, 8, 3, 2, world, world - 1) == passes[2]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("grouped", [True, False])
def test_every_example_exactly_once_per_epoch(world, accum, grouped):
    for epoch in range(2):
        per_rank = [train_batches(LENGTHS, 8, 42, epoch, world, r, accum, grouped) for r in range(world)]
        counts = Counter(i for batches in per_rank for b in batches for i in b)
        assert sorted(counts) == list(range(len(LENGTHS))) and set(counts.values()) == {1}
        # same number of micro-batches on every process, whole accumulation windows
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) % accum == 0
        assert all(len(b) <= 8 and b for batches in per_rank for b in batches)


def test_order_depends_on_epoch_and_seed_only():
    a = train_batches(LENGTHS, 8, 1, 0)
    assert a == train_batches(LENGTHS, 8, 1, 0)
    assert a != train_batches(LENGTHS, 8, 1, 1)
    assert a != train_batches(LENGTHS, 8, 2, 0)


def test_grouping_reduces_padding():
    grouped = train_batches(LENGTHS, 16, 0, 0, grouped=True)
    random = train_batches(LENGTHS, 16, 0, 0, grouped=False)
    assert padding_efficiency(grouped, LENGTHS) > padding_efficiency(random, LENGTHS) + 0.1


def test_too_small_dataset():
    with pytest.raises(DatasetTooSmall):
        LengthGroupedBatchSampler([5, 6, 7], 8, 0, multiple=2 * 4)


def test_mrpc_padding_efficiency(mrpc):
    """Issue target: >= 0.95 real/padded tokens for batches of 16 with the reference prompt."""
    import datasets

    from qlora_cls.modeling import load_tokenizer, embedded_model_dir
    from qlora_cls.prompts import load_template
    tok = load_tokenizer(str(embedded_model_dir()))
    t = load_template("perfect", "mrpc")
    ds = datasets.load_dataset(mrpc, "mrpc")["train"]
    lengths = [len(x) for x in tok([t.render(r) for r in ds])["input_ids"]]
    grouped = padding_efficiency(train_batches(lengths, 16, 42, 0), lengths)
    plain = padding_efficiency(train_batches(lengths, 16, 42, 0, grouped=False), lengths)
    assert grouped >= 0.95 and plain < 0.85
    by_length = sorted(range(len(lengths)), key=lambda r: -lengths[r])  # evaluation's order (evaluation.py)
    assert padding_efficiency([by_length[i:i + 16] for i in range(0, len(lengths), 16)], lengths) >= 0.95
