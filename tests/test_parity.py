"""bench/parity.py end to end on the tiny model: both sides per seed, resumable state, mean ± std by a second route."""
import json

import numpy as np
import pytest

from bench import parity

pytestmark = pytest.mark.slow  # four training subprocesses


def test_parity_runs_both_sides_per_seed_and_skips_finished_runs(tiny_model, mrpc, tmp_path):
    argv = ["--seeds", "1", "2", "--epochs", "1", "--model_dir", tiny_model, "--dataset", mrpc,
            "--max_train_samples", "16", "--max_eval_samples", "8", "--state_dir", str(tmp_path / "state"),
            "--out", str(tmp_path / "out")]
    report = parity.main(argv)
    runs = report["runs"]
    assert sorted((r["side"], r["seed"]) for r in runs) == [("ft", 1), ("ft", 2), ("trainer", 1), ("trainer", 2)]
    # 16 examples / batch 8 = 2 optimizer steps per epoch, on both sides
    assert {r["train_steps"] for r in runs} == {2}
    assert {r["compute_dtype"] for r in runs if r["side"] == "trainer"} == {"bfloat16"}
    for side in ("ft", "trainer"):
        acc = np.array([100 * r["accuracy"] for r in runs if r["side"] == side])
        s = report["sides"][side]
        assert s["runs"] == 2
        assert s["accuracy_mean"] == pytest.approx(acc.mean()) and s["accuracy_std"] == pytest.approx(acc.std(ddof=1))
    diff = report["sides"]["ft"]["accuracy_mean"] - report["sides"]["trainer"]["accuracy_mean"]
    assert report["accuracy_points_ft_minus_trainer"] == pytest.approx(diff)
    assert report["target_met"] is None  # two seeds are no verdict
    md = (tmp_path / "out" / "parity.md").read_text()
    assert "fewer than 3 finished runs" in md and md.count("| ft.py (defaults) | ") == 2 + 1  # a row per run, one summary row
    # A second call runs nothing: the finished runs' result files stay as they were.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "state").glob("*/result.json")}
    again = parity.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again["runs"] == runs
    # ft.py's side is a normal run folder (resumable with --resume; checkpoints every 50 steps)
    cfg = json.loads((tmp_path / "state" / "ft-seed1" / "run" / "config.json").read_text())["config"]
    assert cfg["checkpoint_every"] == 50 and cfg["seed"] == 1


def test_parity_refuses_unknown_side(capsys):
    with pytest.raises(SystemExit) as exc:
        parity.main(["--sides", "ft,keras"])
    assert exc.value.code == 2
    assert "--sides: unknown keras; valid: ft, trainer" in capsys.readouterr().err
