"""`make demo-sft`: instruction SFT of the embedded SmolLM2-135M on the shared instruction records, in the
study's turn-marker chat layout (prompts/chat/utterances.jinja), loss on the answers only.

The markers are new tokens: the base model has never seen them, so before training it cannot end an answer
with <|endofutterance|> (the study's failure: its model never learned to stop). After --steps optimizer steps
the table shows the answer perplexity and stop rate before and after on the held-out records, and three of
their prompts with the base model's and the adapter's answers.
"""
import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ft  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "instructions" / "instruction-data.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train_file", default=str(DATA), help="instruction records (JSON list, JSON Lines, CSV)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (batch 8)")
    parser.add_argument("--holdout", type=int, default=100, help="records held out for evaluation")
    parser.add_argument("--generate", type=int, default=30, help="held-out prompts answered by generation")
    parser.add_argument("--model_dir", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--results_dir", default=str(REPO / "results"), help="where the run folder goes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    run = Path(args.results_dir) / f"demo-sft-{datetime.now():%Y%m%d-%H%M%S}"
    summary = ft.main(["--objective", "sft", "--train_file", args.train_file, "--chat_template", "utterances",
                       "--eval_holdout", str(args.holdout), "--max_steps", str(args.steps),
                       "--generate_examples", str(args.generate), "--log_every", "10", "--results_path", str(run),
                       *(["--model_dir", args.model_dir] if args.model_dir else [])])
    print(f"\nresults folder: {run}\nwhole demo: {(time.monotonic() - started) / 60:.1f} min\n")
    print(table(run, summary))
    return summary


def table(run: Path, summary: dict) -> str:
    """Before (the base model) and after (the adapter) on the same held-out records, and three answers."""
    base, final = summary["baseline"]["metrics"], summary["final"]
    lines = [f"SFT demo: {summary['run']['model']}, {summary['run']['training']}",
             f"  held-out records: {summary['run']['eval_examples']}, of which {final.get('generated')} answered",
             "", f"  {'':<28}{'before':>12}{'after':>12}"]
    for name in ("answer_perplexity", "stop_rate", "rouge_l", "exact_match"):
        lines.append(f"  {name:<28}{base[name]:>12.3f}{final[name]:>12.3f}")
    before = [json.loads(x) for x in (run / "generations_validation_base.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (run / "generations_validation.jsonl").read_text().splitlines()]
    for b, a in list(zip(before, after))[:3]:
        lines += ["", "-" * 72, b["prompt"].rstrip(), f"  reference: {b['reference']!r}",
                  f"  before:    {b['generation'][:200]!r}{'' if b['stopped'] else '  (did not stop)'}",
                  f"  after:     {a['generation'][:200]!r}{'' if a['stopped'] else '  (did not stop)'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
