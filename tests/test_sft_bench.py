"""bench/sft_bench.py's pure helpers: token counting, throughput, ratios, loss agreement, the Markdown (no TRL)."""
import math

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
