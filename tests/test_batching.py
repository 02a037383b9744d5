from collections import Counter

import pytest

from qlora_cls.batching import DatasetTooSmall, eval_batches, padding_efficiency, train_batches

LENGTHS = [((i * 37) % 90) + 10 for i in range(203)]  # odd size on purpose


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
    grouped = train_batches(LENGTHS, 16, 0, 0, group_by_length=True)
    random = train_batches(LENGTHS, 16, 0, 0, group_by_length=False)
    assert padding_efficiency(grouped, LENGTHS) > padding_efficiency(random, LENGTHS) + 0.1


@pytest.mark.parametrize("world", [1, 2])
def test_eval_batches_cover_once(world):
    parts = [eval_batches(LENGTHS, 16, world, r) for r in range(world)]
    rows = [i for p in parts for b in p for i in b]
    assert sorted(rows) == list(range(len(LENGTHS)))
    assert len({len(p) for p in parts}) == 1


def test_too_small_dataset():
    with pytest.raises(DatasetTooSmall):
        train_batches([5, 6, 7], 8, 0, 0, world_size=2, grad_accum=4)


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
    plain = padding_efficiency(train_batches(lengths, 16, 42, 0, group_by_length=False), lengths)
    assert grouped >= 0.95 and plain < 0.85
    assert padding_efficiency(eval_batches(lengths, 16), lengths) >= 0.95
