"""STS-B as regression (one output, MSE) and a test split with hidden labels, from a hub-layout fixture."""
import json

import pandas as pd
import pytest

import eval as eval_cli
import ft

README = """---
configs:
- config_name: stsb
  data_files:
  - split: train
    path: stsb/train-*
  - split: validation
    path: stsb/validation-*
  - split: test
    path: stsb/test-*
---
"""


@pytest.fixture
def stsb(tmp_path):
    root = tmp_path / "glue"
    (root / "stsb").mkdir(parents=True)
    (root / "README.md").write_text(README)
    words = "cat dog sat ran the a on mat park quickly slowly".split()

    def frame(n, offset, hidden=False):
        rows = []
        for i in range(n):
            s1 = " ".join(words[(i + j) % len(words)] for j in range(3 + i % 5))
            s2 = " ".join(words[(i * 2 + j) % len(words)] for j in range(3 + i % 4))
            rows.append({"sentence1": s1, "sentence2": s2, "label": -1.0 if hidden else float((i + offset) % 6),
                         "idx": i})
        return pd.DataFrame(rows)

    frame(40, 0).to_parquet(root / "stsb/train-00000-of-00001.parquet")
    frame(13, 1).to_parquet(root / "stsb/validation-00000-of-00001.parquet")
    frame(9, 0, hidden=True).to_parquet(root / "stsb/test-00000-of-00001.parquet")
    return str(root)


def test_stsb_regression_and_hidden_test_labels(tiny_model, stsb, tmp_path, capsys):
    run = tmp_path / "run"
    summary = ft.main(["--model_dir", tiny_model, "--dataset", stsb, "--task", "stsb", "--prompt", "none",
                       "--results_path", str(run), "--max_steps", "3", "--eval_batch_size", "4"])
    assert set(summary["final"]) >= {"pearson", "spearmanr"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["num_labels"] == 1
    assert (run / "predictions_validation.csv").read_text().splitlines()[0] == "idx,label,prediction"
    out = eval_cli.main(["--results_path", str(run), "--split", "test"])
    assert out["metrics"] == {} and "hidden labels" in out["note"]
    preds = (run / "evals/test-none/predictions.csv").read_text().splitlines()
    assert len(preds) == 10
    # hidden labels cannot be trained on
    with pytest.raises(SystemExit):
        ft.main(["--model_dir", tiny_model, "--dataset", stsb, "--task", "stsb", "--prompt", "none",
                 "--results_path", str(tmp_path / "bad"), "--train_splits", "test", "--eval_split", "validation"])
    assert "hidden labels" in capsys.readouterr().err
