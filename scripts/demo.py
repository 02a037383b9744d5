"""`make demo`: a short real QLoRA fine-tune of the embedded SmolLM2-135M on MRPC, an evaluation, and
a small prompt sweep with its report.

DEMO_STEPS optimizer steps of batch 8, validation on 200 examples, then eval.py on 200 test examples
and the un-tuned base model on the same examples. It ends with a before/after table beside the trivial
baseline (always the most frequent training class, scored on the same examples). Then sweep.py trains
the same model under two prompt templates (--sweep_steps each), evaluates each adapter and the base
model under both templates, and report.py writes the table and plots.
"""
import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import eval as evaluate_cli  # noqa: E402
import ft  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402

# ---- The demo's length, from measured runs (README "The two commands"). --------------------------------
# LoRA on every linear layer learns fastest per step: on full MRPC validation after 300 steps (seed 42, one
# run each) q,v 71.3 %, attention 72.8 %, all-linear 74.5 %, majority class 68.4 %. 200 steps of
# all-linear take ~6 min of training on two CPU cores (~1.9 s per step of 8).
DEMO_STEPS = 200         # optimizer steps of the main demo run (batch 8)
DEMO_TARGETS = "all-linear"
DEMO_SWEEP_STEPS = 8     # optimizer steps of each of the two sweep runs
DEMO_EVAL_SAMPLES = 200  # validation examples scored during training, and test examples scored by eval.py


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="nyu-mll/glue", help="hub id or local folder with GLUE MRPC")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps of the main run")
    parser.add_argument("--sweep_steps", type=int, default=DEMO_SWEEP_STEPS,
                        help="optimizer steps of each sweep run; 0 = no sweep")
    parser.add_argument("--eval_samples", type=int, default=DEMO_EVAL_SAMPLES,
                        help="validation (during training) and test (eval.py) examples scored")
    parser.add_argument("--model_dir", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--results_dir", default=str(REPO / "results"), help="where the demo's folders go")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = Path(args.results_dir)
    run = results / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    model = ["--model_dir", args.model_dir] if args.model_dir else []
    n = str(args.eval_samples)
    summary = ft.main(["--dataset", args.dataset, "--results_path", str(run), "--max_steps", str(args.steps),
                       "--max_eval_samples", n, "--log_every", "10", "--prompt", "perfect",
                       "--target_modules", DEMO_TARGETS, *model])
    after = evaluate_cli.main(["--results_path", str(run), "--split", "test", "--max_eval_samples", n])
    before = evaluate_cli.main(["--results_path", str(run), "--split", "test", "--max_eval_samples", n, "--base_only"])
    train_minutes = (time.monotonic() - started) / 60
    table = before_after(summary, before, after)
    if args.sweep_steps:
        print("\n" + table)  # shown again at the very end, after the sweep's output
    out = {"run": run, "summary": summary, "before": before, "after": after, "table": table}
    if args.sweep_steps:
        sweep_dir = results / f"demo-sweep-{datetime.now():%Y%m%d-%H%M%S}"
        try:
            sweep.main(["--sweep_dir", str(sweep_dir), "--eval_prompts", "none", "perfect",
                        "--prompt", "none", "perfect", "--seed", "1", "--dataset", args.dataset,
                        "--max_steps", str(args.sweep_steps), "--max_eval_samples", "64", "--log_every", "2",
                        *model])
        except SystemExit as exc:  # exit 1 = some point failed: the report lists it; anything else stops here
            if exc.code != 1:
                raise
        report.main([str(sweep_dir)])
        out["sweep_dir"] = sweep_dir
        print(f"\nsweep folder:   {sweep_dir}\nreport:         {sweep_dir / 'report' / 'report.md'}")
    print(f"\nresults folder: {run}  (model card: {run / 'adapter' / 'README.md'})\n"
          f"TensorBoard:    {REPO / '.venv/bin/tensorboard'} --logdir {results}   (each run under its folder's "
          f"name: {run.name}" + (f", {out['sweep_dir'].name}/<point>" if "sweep_dir" in out else "") + ")\n"
          f"main run: {train_minutes:.1f} min (training + both evaluations); "
          f"whole demo: {(time.monotonic() - started) / 60:.1f} min")
    print("\n" + table)
    return out


def before_after(summary: dict, before: dict, after: dict) -> str:
    """The demo's result in one table: trivial baseline, un-tuned model, fine-tuned adapter, on the same examples."""
    run = summary.get("run", {})
    metrics = [m for m in ("accuracy", "f1", "pearson", "spearmanr", "matthews_correlation")
               if m in summary.get("final", {})]
    width = 44

    def row(name, scores):
        return f"  {name:<{width}}" + "".join(f"{'–' if scores.get(m) is None else format(scores[m], '.3f'):>10}"
                                                for m in metrics)
    base = summary.get("baseline", {})
    lines = [f"Demo result: {run.get('model')} on {run.get('task')}, prompt {run.get('prompt')}",
             f"  trained: {run.get('training')}",
             "",
             f"  {'':<{width}}" + "".join(f"{m:>10}" for m in metrics),
             f"{summary.get('eval_split')} ({base.get('eval_examples')} examples)",
             row(f"trivial baseline ({_name(base)})", base.get("metrics", {})),
             row("fine-tuned adapter (after)", summary.get("final", {}))]
    for result in (after, before):
        if result is None:
            return "\n".join(lines)
    tb = after.get("baseline", {})
    lines += [f"{after.get('split')} ({after.get('examples')} examples)",
              row(f"trivial baseline ({_name(tb)})", tb.get("metrics", {})),
              row("un-tuned base model (before)", before.get("metrics", {})),
              row("fine-tuned adapter (after)", after.get("metrics", {})), ""]
    for where, cmp in ((summary.get("eval_split"), summary.get("vs_baseline", {})), (after.get("split"),
                                                                                      after.get("vs_baseline", {}))):
        if cmp.get("beats") is None:
            continue
        verdict = "beats" if cmp["beats"] else "does NOT beat"
        lines.append(f"  {where}: the fine-tuned adapter {verdict} the trivial baseline "
                     f"({cmp['metric']} {cmp['model']:.3f} vs {cmp['baseline']:.3f}, {cmp['margin']:+.3f})")
    return "\n".join(lines)


def _name(b: dict) -> str:
    return f"always '{b.get('prediction_name')}'" if b.get("kind") == "majority_class" else "training mean"


if __name__ == "__main__":
    main()
