"""`make demo`: a short real QLoRA fine-tune of the embedded SmolLM2-135M on MRPC, an evaluation, and
a small prompt sweep with its report.

A few minutes on two CPU cores: 40 optimizer steps of batch 8, validation on 200 examples, then
eval.py on 200 test examples and the un-tuned base model on the same examples for comparison. Then
sweep.py trains the same model under two prompt templates (8 steps each), evaluates each adapter
and the base model under both templates, and report.py writes the table and plots.
"""
import argparse
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import eval as evaluate_cli  # noqa: E402
import ft  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="nyu-mll/glue", help="hub id or local folder with GLUE MRPC")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--sweep_steps", type=int, default=8, help="optimizer steps of each sweep run; 0 = no sweep")
    args = parser.parse_args(argv)
    run = REPO / "results" / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    ft.main(["--dataset", args.dataset, "--results_path", str(run), "--max_steps", str(args.steps),
             "--max_eval_samples", "200", "--log_every", "5", "--prompt", "perfect",
             "--gradient_checkpointing", "false"])  # plenty of memory here; recomputation only costs time
    evaluate_cli.main(["--results_path", str(run), "--split", "test", "--max_eval_samples", "200"])
    evaluate_cli.main(["--results_path", str(run), "--split", "test", "--max_eval_samples", "200", "--base_only"])
    print(f"\nresults folder: {run}\nTensorBoard:    {REPO / '.venv/bin/tensorboard'} --logdir {run / 'tensorboard'}")
    if args.sweep_steps:
        sweep_dir = REPO / "results" / f"demo-sweep-{datetime.now():%Y%m%d-%H%M%S}"
        try:
            sweep.main(["--sweep_dir", str(sweep_dir), "--eval_prompts", "none", "perfect",
                        "--prompt", "none", "perfect", "--seed", "1", "--dataset", args.dataset,
                        "--max_steps", str(args.sweep_steps), "--max_eval_samples", "64", "--log_every", "2",
                        "--gradient_checkpointing", "false"])
        except SystemExit as exc:  # exit 1 = some point failed: the report lists it; anything else stops here
            if exc.code != 1:
                raise
        report.main([str(sweep_dir)])
        print(f"sweep folder:   {sweep_dir}\nreport:         {sweep_dir / 'report' / 'report.md'}\n"
              f"TensorBoard:    {REPO / '.venv/bin/tensorboard'} --logdir {sweep_dir}")


if __name__ == "__main__":
    main()
