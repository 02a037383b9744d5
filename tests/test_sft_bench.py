"""bench/sft_bench.py's helpers: token counting, throughput, ratios, loss agreement, the Markdown, ft.py's batches given
to a transformers Trainer (FixedBatches) and checked per step (no TRL)."""
import math
from types import SimpleNamespace

import pytest
import torch

from bench import sft_bench as sb


def test_count_tokens_counts_attention_and_answer_tokens_of_a_padded_batch():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, 7, 8, 9, 2, 2]])
    assert sb.count_tokens(mask, labels) == {"tokens": 10, "label_tokens": 7}
    assert sb.count_tokens(mask.tolist(), labels.tolist()) == {"tokens": 10, "label_tokens": 7}


def test_batch_token_counts_equal_count_tokens_of_the_collated_batch():
    lengths = [4, 6, 2]
    labels = [[-100, -100, 5, 6], [-100, 7, 8, 9, 2, 2], [-100, 3]]
    rows = [0, 1]
    width = max(lengths[r] for r in rows)
    mask = [[1] * lengths[r] + [0] * (width - lengths[r]) for r in rows]
    padded = [labels[r] + [-100] * (width - lengths[r]) for r in rows]
    assert sb.batch_token_counts(lengths, labels, [rows, [2]]) == [sb.count_tokens(mask, padded),
                                                                   {"tokens": 2, "label_tokens": 1}]


def test_summarize_and_pool_and_ratio():
    r = sb.summarize_run([1.0, 2.0, 1.0], [{"tokens": 100, "label_tokens": 40}] * 3, loop_seconds=5.0)
    assert r["train_tokens"] == 300 and r["train_label_tokens"] == 120
    assert r["train_tokens_per_s"] == 60.0 and r["train_label_tokens_per_s"] == 24.0
    assert r["median_step_tokens_per_s"] == 100.0
    r["step_tokens_per_s"] = [100.0, 50.0, 100.0]
    p = sb.pooled([r, dict(r, train_seconds=10.0)])
    assert p["train_tokens_per_s"] == pytest.approx(600 / 15) and p["median_step_tokens_per_s"] == 100.0
    assert sb.ratio(120.0, 100.0) == pytest.approx(1.2) and sb.ratio(None, 1.0) is None


def test_holdout_split_is_generative_prepare_s():
    import random
    records = list(range(20))
    train, held = sb.holdout_split(records, 5, seed=42)
    order = list(range(20))
    random.Random(42).shuffle(order)
    assert held == order[:5] and train == order[5:]


def test_loss_agreement_pairs_and_verdict():
    ft = {1: [2.0, 1.5, 1.0, 0.9], 2: [2.1, 1.4, 1.1, 0.8]}
    trl = {1: [2.05, 1.45, 1.05, 0.85], 2: [2.0, 1.5, 1.0, 0.9]}
    out = sb.loss_agreement({"ft": ft, "trl": trl}, window=2)
    assert set(out["pairs"]) == {"ft s1 vs trl s1", "ft s2 vs trl s2", "ft s1 vs ft s2", "trl s1 vs trl s2"}
    assert out["pairs"]["ft s1 vs ft s2"]["kind"] == "noise"
    assert out["pairs"]["ft s1 vs trl s1"]["rms_step"] == pytest.approx(0.05)
    assert out["within_noise"] is True
    far = sb.loss_agreement({"ft": ft, "trl": {s: [x + 1 for x in c] for s, c in trl.items()}}, window=2)
    assert far["within_noise"] is False
    assert sb.window_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5]
    assert math.isclose(sb.rms_diff([0, 0], [3, 4]), math.sqrt(12.5))


def test_markdown_has_the_ratio_table_and_the_curves():
    run = sb.summarize_run([1.0, 1.0], [{"tokens": 10, "label_tokens": 4}] * 2, 2.0)
    runs = {"ft s1": dict(run, loss_curve=[1.0, 0.5]), "trl s1": dict(run, loss_curve=[1.1, 0.6])}
    result = {"started": "now", "setup": "x", "runs": runs,
              "pooled": {"ft": sb.pooled([run]), "trl": sb.pooled([run])},
              "ratios": {"tokens/s (all seeds)": 1.0}, "loss_curves": {n: r["loss_curve"] for n, r in runs.items()},
              "loss_agreement": sb.loss_agreement({"ft": {1: [1.0, 0.5]}, "trl": {1: [1.1, 0.6]}}, 2)}
    md = sb.markdown(result)
    assert "| tokens/s (all seeds) | 1.000 | >= 1.0 |" in md
    assert "| 2 | 0.5000 | 0.6000 |" in md and "ft s1 vs trl s1" in md


def test_markdown_says_which_batches_and_the_first_step():
    run = sb.summarize_run([1.0, 1.0], [{"tokens": 10, "label_tokens": 4}] * 2, 2.0)
    curves = {"ft": {1: [2.0, 1.0], 2: [2.2, 1.1]}, "trl": {1: [2.0004, 1.05], 2: [2.21, 1.2]}}
    runs = {f"{side} s{s}": dict(run, loss_curve=c) for side in curves for s, c in curves[side].items()}
    agree = sb.loss_agreement(curves, 2, same_batches=True)
    assert agree["pairs"]["ft s1 vs trl s1"]["batches"] == "the same: ft.py's seed-1 batches on both sides"
    assert agree["pairs"]["trl s1 vs trl s2"]["batches"] == "different: ft.py's seed-1 vs seed-2 batches"
    assert agree["first_step"][1]["agree"] is True and agree["first_step"][2]["agree"] is False  # 0.01 / 2.2 > 1e-3
    assert agree["first_step"][1]["diff"] == pytest.approx(-0.0004) and agree["first_step_agree"] is False
    result = {"started": "now", "setup": "x", "runs": runs, "pooled": {"ft": sb.pooled([run]), "trl": sb.pooled([run])},
              "ratios": {}, "loss_curves": {n: r["loss_curve"] for n, r in runs.items()}, "loss_agreement": agree,
              "notes": ["a note"]}
    md = sb.markdown(result)
    assert "trained **the same batches**" in md and "trained **different batches**" in md
    assert "| 1 | 2.000000 | 2.000400 | -4.00e-04 | 2.00e-04 | yes |" in md and "| **NO** |" in md
    assert "- a note" in md
    other = sb.loss_agreement(curves, 2, same_batches=False)
    assert other["pairs"]["ft s1 vs trl s1"]["batches"].startswith("different: ft.py's seed-1 batches vs TRL's own")
    assert other["first_step"][1]["agree"] is None and "first_step_agree" not in other
    assert "n/a (different batches)" in sb.markdown(dict(result, loss_agreement=other))


def test_ft_batches_are_ft_s_sampler_epoch_after_epoch():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1]  # 11 rows, batch 4: 3 batches an epoch
    got = sb.ft_batches(lengths, 4, seed=7, steps=5)
    assert len(got) == 5
    assert sorted(r for b in got[:3] for r in b) == list(range(11))  # epoch 0: every row once
    from qlora_cls.batching import LengthGroupedBatchSampler
    s = LengthGroupedBatchSampler(lengths, 4, 7)
    assert got == s.batches(0) + s.batches(1)[:2]
    assert sb.ft_batches(lengths, 4, seed=8, steps=3) != got[:3]


def _split(rows):
    """A stand-in for ft.py's split: input_ids, labels (-100 on the prompt), lengths."""
    return SimpleNamespace(input_ids=[r[0] for r in rows], labels=[r[1] for r in rows],
                           lengths=[len(r[0]) for r in rows])


def _collate(split, rows, pad=0):
    width = max(split.lengths[r] for r in rows)
    return {"input_ids": torch.tensor([split.input_ids[r] + [pad] * (width - split.lengths[r]) for r in rows]),
            "attention_mask": torch.tensor([[1] * split.lengths[r] + [0] * (width - split.lengths[r]) for r in rows]),
            "labels": torch.tensor([split.labels[r] + [-100] * (width - split.lengths[r]) for r in rows])}


def test_check_step_batch_accepts_ft_s_rows_and_stops_on_any_other():
    split = _split([([1, 2, 3], [-100, 2, 3]), ([4, 5, 6], [-100, -100, 6]), ([7, 8], [-100, 8]),
                    ([9, 9, 9], [-100, 9, 9])])
    sb.check_step_batch(1, _collate(split, [0, 2]), [0, 2], split)  # the same rows, in order: passes
    with pytest.raises(SystemExit, match="step 3 has 6 tokens"):
        sb.check_step_batch(3, _collate(split, [0, 1]), [0, 2], split)  # another row of another length
    with pytest.raises(SystemExit, match="row 0, is not ft.py's example 3"):
        sb.check_step_batch(2, _collate(split, [0, 2]), [3, 2], split)  # same counts, other tokens
    with pytest.raises(SystemExit, match="row 0, is not ft.py's example 2"):
        sb.check_step_batch(2, _collate(split, [0, 2]), [2, 0], split)  # same rows, other order


def test_compare_lora_init():
    a = {"x.lora_A.default.weight": torch.tensor([[0.1234567, -0.5]])}
    assert sb.compare_lora_init(a, {k: v.clone() for k, v in a.items()}, "float32")["equal"] is True
    rounded = {k: v.to(torch.bfloat16).float() for k, v in a.items()}
    c = sb.compare_lora_init(a, rounded, "bfloat16")
    assert c["equal"] is False and c["equal_after_rounding"] is True and 0 < c["max_abs_diff"] < 1e-3
    c = sb.compare_lora_init(a, {k: v + 0.01 for k, v in rounded.items()}, "bfloat16")
    assert c["equal_after_rounding"] is False
    assert sb.compare_lora_init(a, {"y.lora_A.default.weight": a["x.lora_A.default.weight"]}, "float32")[
        "same_names"] is False


class _Tiny(torch.nn.Module):
    """A model whose forward takes input_ids/attention_mask/labels: the Trainer keeps those columns only."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return {"loss": self.w.sum()}


def test_fixed_batches_dataloader_yields_exactly_the_given_batches(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    # Row i holds the tokens [100 + i] * (i % 3 + 1) and a text column the collator could not take (removed).
    n = 10
    data = Dataset.from_dict({"input_ids": [[100 + i] * (i % 3 + 1) for i in range(n)],
                              "note": [f"row {i}" for i in range(n)]})

    def collate(features):
        assert set(features[0]) == {"input_ids"}  # remove_unused_columns did its part
        width = max(len(f["input_ids"]) for f in features)
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                                for f in features])}

    class T(sb.FixedBatches, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none",
                             train_sampling_strategy="group_by_length", dataloader_num_workers=0)
    trainer = T(model=_Tiny(), args=args, train_dataset=data, data_collator=collate)
    given = [[4, 0, 7], [2], [9, 1, 3, 5], [4, 4]]  # any order, sizes, even a repeated row
    trainer.fixed_batches = given
    loader = trainer.get_train_dataloader()
    assert len(loader) == len(given)
    for _ in range(2):  # every pass: the same batches
        seen = [[int(row[0]) - 100 for row in batch["input_ids"]] for batch in loader]
        assert seen == given
    batch = next(iter(loader))  # padded as the collator pads: row 4 has 2 tokens, rows 0 and 7 one and two
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0], [1, 1]]
    trainer.fixed_batches = None  # the Trainer's own loader: its batch size, every row once
    own = [[int(row[0]) - 100 for row in batch["input_ids"]] for batch in trainer.get_train_dataloader()]
    assert [len(b) for b in own] == [2] * 5 and sorted(r for b in own for r in b) == list(range(n))
