"""`make demo`: a short real QLoRA fine-tune of the embedded SmolLM2-135M on MRPC, then an evaluation.

A few minutes on two CPU cores: 40 optimizer steps of batch 8, validation on 200 examples, then
eval.py on 200 test examples and the un-tuned base model on the same examples for comparison.
"""
import argparse
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import eval as evaluate_cli  # noqa: E402
import ft  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="nyu-mll/glue", help="hub id or local folder with GLUE MRPC")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    args = parser.parse_args(argv)
    run = REPO / "results" / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    ft.main(["--dataset", args.dataset, "--results_path", str(run), "--max_steps", str(args.steps),
             "--max_eval_samples", "200", "--log_every", "5", "--prompt", "perfect",
             "--gradient_checkpointing", "false"])  # plenty of memory here; recomputation only costs time
    evaluate_cli.main(["--results_path", str(run), "--split", "test", "--max_eval_samples", "200"])
    evaluate_cli.main(["--results_path", str(run), "--split", "test", "--max_eval_samples", "200", "--base_only"])
    print(f"\nresults folder: {run}\nTensorBoard:    {REPO / '.venv/bin/tensorboard'} --logdir {run / 'tensorboard'}")


if __name__ == "__main__":
    main()
