"""Benchmark: ft.py's SFT against TRL's SFTTrainer, same model, records, chat template, LoRA, optimizer, steps.

    make bench-sft                                   # 60 steps, seeds 42 and 43, one core
    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/sft_bench.py --steps 60

TRL is a benchmark-only dependency (bench/requirements-bench.txt):
    .venv/bin/pip install -r bench/requirements-bench.txt

One process trains, for each seed, (a) ``ft.main([... --objective sft ...])`` and (b) TRL's ``SFTTrainer``,
interleaved (ft s1, TRL s1, ft s2, TRL s2) so slow drift of the machine hits both sides alike:

- the same model (the embedded SmolLM2-135M-Instruct unless ``--model_dir``), 4-bit NF4 with double
  quantization, the same compute dtype (ft.py's ``auto``), loaded as the QLoRA recipe writes it
  (``from_pretrained`` + ``prepare_model_for_kbit_training``, no gradient checkpointing, as ft.py on a CPU),
  and the CPU repack guard of ``qlora_cls.modeling`` on both sides;
- the same training records: the seed-42 hold-out of ``qlora_cls.generative.prepare`` (``--eval_holdout``
  records out, the rest trained), written once to JSON Lines that both sides read, so a second seed changes
  the batch order, LoRA init and dropout but not the records; the script checks that ft.py's tokenized
  examples on that file equal those of ``--train_file <original> --eval_holdout N --seed 42`` and equal
  TRL's prepared ``input_ids``/``labels`` token for token;
- the same rendering and loss: TRL's conversational prompt/completion format (prompt = the turns before
  the answer, completion = the answer turn) with ``completion_only_loss``: TRL renders prompt+completion
  with the tokenizer's chat template, so the end-of-turn token (and the newline after it) are in the
  completion and trained, as in ft.py (TRL adds an EOS only to non-conversational data);
- the same LoRA (r, alpha, dropout, q_proj/v_proj, bias none), 8-bit AdamW (``optim="adamw_8bit"``), lr,
  linear schedule with ``ceil(warmup_ratio * steps)`` warm-up steps, clipping 1.0, weight decay 0, batch,
  steps, seed, no evaluation, no checkpoints, a loss logged every step on both;
- the same batches: ``--trl_batches ft`` (default) gives TRL's trainer ft.py's length-grouped batches of the
  same seed, in ft.py's order (``ft_batches`` rebuilds them from ``qlora_cls.batching``; ``FixedBatches``
  feeds them to TRL as a ``batch_sampler``; row i of TRL's prepared dataset is ft.py's example i, checked),
  and every TRL step's collated batch is checked against ft.py's (``check_step_batch``: token counts, then
  row by row tokens and labels; a SystemExit at the first difference). ``--trl_batches trl`` keeps TRL's own
  sampler (``train_sampling_strategy="group_by_length"``, transformers' LengthGroupedSampler), other batches.
  TRL's defaults that differ from ft.py's are set to ft.py's: ``gradient_checkpointing=False``,
  ``bf16=False`` (no autocast; ft.py runs without mixed precision). TRL casts a quantized model's LoRA
  weights to bfloat16 (sft_trainer.py, after ``get_peft_model``); ft.py keeps them float32:
  ``--trl_lora_dtype trl`` (default) leaves TRL as it is, ``float32`` casts them back before training.

Loss curves (``loss_agreement``): ft vs TRL at one seed (the same batches under ``--trl_batches ft``) against
one side across seeds (different batches, LoRA init and dropout: the run-to-run noise); and each seed's
step-1 loss on both sides: LoRA's B starts at zero, so on the same batch it is the same base model's loss and
agrees to float tolerance. The initial LoRA A matrices of the two sides are compared at each seed
(``compare_lora_init``; ft.py's taken where ``methods.add_trainable`` returns) and the result is in the notes.

Timing: the training loop only, model loading, data preparation and ft.py's evaluations excluded: ft.py's
``train_seconds`` and TRL's ``on_train_begin`` -> ``on_train_end``. Per-step seconds: ft.py's train_log
(one line per step: tokens / tokens_per_s), TRL's time between consecutive ``on_step_end`` calls (the first
from ``on_train_begin``); both include fetching the batch. "Tokens" are real tokens: the attention-mask
(non-padding) tokens of the batches trained on, counted the same way on both sides (``count_tokens``:
ft.py's batches rebuilt from its sampler, TRL's counted in ``training_step``; TRL's per-step check of its
batch against ft.py's is inside its timed loop, microseconds per step); the answer (label != -100)
tokens are reported beside them. Results: ``bench/results/sft-<timestamp>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results_io import write_result  # noqa: E402

TRL_INSTALL = ".venv/bin/pip install -r bench/requirements-bench.txt   # TRL, a benchmark-only dependency"
DEFAULT_TRAIN_FILE = str(REPO.parent / "shared" / "data" / "instructions" / "instruction-data.json")
HOLDOUT_SEED = 42  # the records are the hold-out of this seed whatever --seeds says
SIDES = ("ft", "trl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--seeds", default="42,43", help="one ft.py and one TRL run per seed (two seeds give the noise)")
    p.add_argument("--model_dir", default=None, help="base model; none = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--train_file", default=DEFAULT_TRAIN_FILE)
    p.add_argument("--eval_holdout", type=int, default=100, help="records held out (seed 42), as ft.py's flag")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.1)
    p.add_argument("--trl_lora_dtype", choices=("trl", "float32"), default="trl",
                   help="trl: TRL's own bfloat16 cast of the LoRA weights of a 4-bit model; float32: as ft.py")
    p.add_argument("--trl_batches", choices=("ft", "trl"), default="ft",
                   help="ft: TRL trains ft.py's batches of the same seed, in ft.py's order (checked every step);\n"
                        "trl: TRL's own sampler (transformers' group_by_length LengthGroupedSampler)")
    p.add_argument("--loss_window", type=int, default=10, help="steps per window for the windowed loss means")
    p.add_argument("--max_train_samples", type=int, default=None, help="(tests) train on the first N records only")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.steps <= 0 or not args.seed_list:
        p.error("--steps must be > 0 and --seeds must name at least one seed")
    return args


# -- pure helpers (tests/test_sft_bench.py) ------------------------------------------------------------
def count_tokens(attention_mask, labels) -> dict:
    """Real tokens of one batch: ``tokens`` = attention-mask (non-padding) tokens, ``label_tokens`` = label != -100.
    Takes tensors or nested lists."""
    def total(rows, keep):
        if hasattr(rows, "tolist"):
            rows = rows.tolist()
        return sum(1 for row in rows for x in row if keep(x))
    return {"tokens": total(attention_mask, lambda x: x != 0), "label_tokens": total(labels, lambda x: x != -100)}


def batch_token_counts(lengths: Sequence[int], labels: Sequence[Sequence[int]], batches: Sequence[Sequence[int]]
                       ) -> list[dict]:
    """Per batch of row indices, as ``count_tokens`` counts the collated batch (right padding adds only
    attention 0 and label -100, so the unpadded rows give the same numbers)."""
    return [{"tokens": sum(lengths[r] for r in b), "label_tokens": sum(sum(1 for x in labels[r] if x != -100) for r in b)}
            for b in batches]


def ft_batches(lengths: Sequence[int], batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """ft.py's first ``steps`` training batches (row indices of its split, in training order): its
    ``LengthGroupedBatchSampler`` on one process without accumulation, epoch 0, 1, ... as ft.py's loop draws them."""
    from qlora_cls.batching import LengthGroupedBatchSampler
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed, 1, True)
    batches, epoch = [], 0
    while len(batches) < steps:
        batches += sampler.batches(epoch)
        epoch += 1
    return batches[:steps]


class FixedBatches:
    """Mixin for a transformers ``Trainer`` (before it in the bases): with ``fixed_batches`` set (lists of row
    indices of ``train_dataset``), each pass over the training DataLoader yields exactly those batches, in that
    order (its length is their count: given ``max_steps`` batches, the Trainer runs one pass); None keeps the
    Trainer's own loader. The standard pieces of
    ``Trainer._get_dataloader``: unused columns removed (``remove_unused_columns``), the Trainer's collator,
    ``accelerator.prepare``; only the sampler differs (a ``batch_sampler`` instead of ``group_by_length``)."""
    fixed_batches: Optional[list] = None

    def get_train_dataloader(self):
        if self.fixed_batches is None:
            return super().get_train_dataloader()
        import datasets
        from torch.utils.data import DataLoader
        dataset, collate = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="Training")
        loader = DataLoader(dataset, batch_sampler=[list(b) for b in self.fixed_batches], collate_fn=collate,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)


def check_step_batch(step: int, inputs: dict, rows: Sequence[int], split) -> None:
    """TRL's collated batch of optimizer step ``step`` (1-based) is ft.py's batch ``rows`` of ``split``: the same
    attention-mask and answer token counts, and row by row, in order, the same real tokens and labels."""
    got = count_tokens(inputs["attention_mask"], inputs["labels"])
    want = batch_token_counts(split.lengths, split.labels, [rows])[0]
    if got != want:
        raise SystemExit(f"TRL's batch at step {step} has {got['tokens']} tokens ({got['label_tokens']} answer "
                         f"tokens), ft.py's {want['tokens']} ({want['label_tokens']}): TRL is not training ft.py's "
                         "batches")
    ids, mask, labels = (inputs[k].tolist() for k in ("input_ids", "attention_mask", "labels"))
    if len(ids) != len(rows):
        raise SystemExit(f"TRL's batch at step {step} has {len(ids)} rows, ft.py's {len(rows)}")
    for i, r in enumerate(rows):
        real = [j for j, m in enumerate(mask[i]) if m]
        if [ids[i][j] for j in real] != split.input_ids[r] or [labels[i][j] for j in real] != split.labels[r]:
            raise SystemExit(f"TRL's batch at step {step}, row {i}, is not ft.py's example {r}: "
                             f"TRL is not training ft.py's batches")


def lora_a_weights(model) -> dict:
    """The LoRA A matrices (name -> float32 CPU copy): PEFT's random initialisation (B starts at zero)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def compare_lora_init(ft: dict, trl: dict, trl_dtype: str) -> dict:
    """ft.py's and TRL's initial LoRA A at one seed: equal as float32, or equal once ft.py's are rounded to the
    dtype TRL keeps them in (TRL casts a 4-bit model's LoRA weights to bfloat16 after ``get_peft_model``)."""
    import torch
    same_names = sorted(ft) == sorted(trl)
    out = {"tensors": len(ft), "same_names": same_names, "trl_dtype": trl_dtype}
    if not same_names or not ft:
        return dict(out, equal=False, equal_after_rounding=False, max_abs_diff=None)
    dtype = getattr(torch, trl_dtype)
    out["max_abs_diff"] = max(float((ft[n] - trl[n]).abs().max()) for n in ft)
    out["equal"] = out["max_abs_diff"] == 0.0
    out["equal_after_rounding"] = all(torch.equal(ft[n].to(dtype).float(), trl[n]) for n in ft)
    return out


def summarize_run(step_seconds: Sequence[float], step_counts: Sequence[dict], loop_seconds: float) -> dict:
    """Throughput of one run: totals over the loop's seconds, and the median of per-step throughputs."""
    tokens = sum(c["tokens"] for c in step_counts)
    label_tokens = sum(c["label_tokens"] for c in step_counts)
    per_step = [c["tokens"] / s for c, s in zip(step_counts, step_seconds) if s > 0]
    return {"steps": len(step_counts), "train_seconds": loop_seconds, "train_tokens": tokens,
            "train_label_tokens": label_tokens,
            "train_tokens_per_s": tokens / loop_seconds if loop_seconds else None,
            "train_label_tokens_per_s": label_tokens / loop_seconds if loop_seconds else None,
            "median_step_tokens_per_s": statistics.median(per_step) if per_step else None,
            "step_seconds_sum": sum(step_seconds)}


def pooled(runs: Sequence[dict]) -> dict:
    """Several runs of one side as one: total tokens over total seconds, the median of every step's throughput."""
    seconds = sum(r["train_seconds"] for r in runs)
    steps = [t for r in runs for t in r.get("step_tokens_per_s", [])]
    return {"train_tokens": sum(r["train_tokens"] for r in runs), "train_seconds": seconds,
            "train_tokens_per_s": sum(r["train_tokens"] for r in runs) / seconds if seconds else None,
            "train_label_tokens_per_s": sum(r["train_label_tokens"] for r in runs) / seconds if seconds else None,
            "median_step_tokens_per_s": statistics.median(steps) if steps else None}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def window_means(curve: Sequence[float], window: int) -> list[float]:
    return [statistics.fmean(curve[i:i + window]) for i in range(0, len(curve), window)]


def rms_diff(a: Sequence[float], b: Sequence[float]) -> float:
    n = min(len(a), len(b))
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a[:n], b[:n])) / n) if n else float("nan")


FIRST_STEP_RTOL = 1e-3  # step 1 = the base model's loss on one batch; bf16 compute leaves ~1e-3 relative at most


def pair_batches(kind: str, side: str, a: int, b: int, same_batches: bool) -> str:
    """Which batches the two runs of a pair trained (``same_batches``: TRL trained ft.py's batches)."""
    if kind == "cross":
        return (f"the same: ft.py's seed-{a} batches on both sides" if same_batches else
                f"different: ft.py's seed-{a} batches vs TRL's own group_by_length sampler (seed {a})")
    if side == "ft" or same_batches:
        return f"different: ft.py's seed-{a} vs seed-{b} batches"
    return f"different: TRL's own sampler, seed {a} vs seed {b}"


def loss_agreement(curves: dict, window: int, same_batches: bool = False, rtol: float = FIRST_STEP_RTOL) -> dict:
    """``curves``: {side: {seed: [loss per step]}}; ``same_batches``: TRL trained ft.py's batches of each seed.
    Pairs: across sides at the same seed (ft vs TRL: the same batches when ``same_batches``, else each side's
    own sampler) and within a side across seeds (the run-to-run noise: different batches, LoRA init and dropout).
    For each pair: the batches it trained, the RMS of per-step differences, of ``window``-step means, the mean
    difference and that of the last window's means. The curves agree within noise when no cross-side figure
    exceeds the largest within-side one. ``first_step``: each seed's step-1 loss on both sides; LoRA's B starts
    at zero, so it is the base model's loss on the first batch and, on the same batch, agrees within ``rtol``."""
    pairs = {}
    seeds = sorted(set(curves.get("ft", {})) & set(curves.get("trl", {})))
    for s in seeds:
        pairs[f"ft s{s} vs trl s{s}"] = ("cross", "ft", s, s, curves["ft"][s], curves["trl"][s])
    for side in SIDES:
        ss = sorted(curves.get(side, {}))
        for i in range(len(ss)):
            for j in range(i + 1, len(ss)):
                pairs[f"{side} s{ss[i]} vs {side} s{ss[j]}"] = ("noise", side, ss[i], ss[j],
                                                                curves[side][ss[i]], curves[side][ss[j]])
    rows = {}
    for name, (kind, side, sa, sb, a, b) in pairs.items():
        wa, wb = window_means(a, window), window_means(b, window)
        rows[name] = {"kind": kind, "batches": pair_batches(kind, side, sa, sb, same_batches),
                      "same_batches": kind == "cross" and same_batches,
                      "rms_step": rms_diff(a, b), "rms_window": rms_diff(wa, wb),
                      "last_window_diff": wa[-1] - wb[-1] if wa and wb else None,
                      "mean_diff": statistics.fmean(a) - statistics.fmean(b) if a and b else None}
    first = {}
    for s in seeds:
        a, b = curves["ft"][s], curves["trl"][s]
        if a and b:
            diff = a[0] - b[0]
            first[s] = {"ft": a[0], "trl": b[0], "diff": diff, "rel_diff": abs(diff) / abs(a[0]) if a[0] else None,
                        "same_batch": same_batches,
                        "agree": abs(diff) <= rtol * abs(a[0]) if same_batches else None}
    out = {"window": window, "same_batches": same_batches, "pairs": rows, "first_step": first,
           "first_step_rtol": rtol}
    if first and same_batches:
        out["first_step_max_rel_diff"] = max(f["rel_diff"] or 0.0 for f in first.values())
        out["first_step_agree"] = all(f["agree"] for f in first.values())
    cross = [r for r in rows.values() if r["kind"] == "cross"]
    noise = [r for r in rows.values() if r["kind"] == "noise"]
    if cross and noise:
        out["max_cross_rms_window"] = max(r["rms_window"] for r in cross)
        out["max_noise_rms_window"] = max(r["rms_window"] for r in noise)
        out["max_cross_abs_mean_diff"] = max(abs(r["mean_diff"]) for r in cross)
        out["max_noise_abs_mean_diff"] = max(abs(r["mean_diff"]) for r in noise)
        out["within_noise"] = (out["max_cross_rms_window"] <= out["max_noise_rms_window"]
                               and out["max_cross_abs_mean_diff"] <= out["max_noise_abs_mean_diff"])
    return out


def verdict_text(agree: dict) -> str:
    """The loss verdict in words, saying which batches the compared pairs trained."""
    if "within_noise" not in agree:
        return ""
    if agree.get("same_batches"):
        batches = ("The cross-side pairs (ft vs TRL at one seed) trained **the same batches** (ft.py's of that seed, "
                   "in its order; checked at every TRL step), so their difference holds only what the two "
                   "implementations do differently (LoRA dropout masks, LoRA init and dtype, numerics); the "
                   "run-to-run pairs (one side, two seeds) trained **different batches** (ft.py's seed-a vs seed-b "
                   "batches on either side), LoRA inits and dropout masks.")
    else:
        batches = ("The cross-side pairs (ft vs TRL at one seed) trained **different batches** (ft.py's sampler vs "
                   "TRL's own group_by_length sampler), as did the run-to-run pairs (one side, two seeds), so the "
                   "cross-side difference includes a batch-order difference (`--trl_batches trl`).")
    return (f"{batches} Cross-side vs run-to-run: RMS of window means {agree['max_cross_rms_window']:.4f} vs "
            f"{agree['max_noise_rms_window']:.4f}, |mean difference| {agree['max_cross_abs_mean_diff']:.4f} vs "
            f"{agree['max_noise_abs_mean_diff']:.4f}: **{'within' if agree['within_noise'] else 'NOT within'} "
            f"run-to-run noise**.")


def _f(x, fmt=".1f"):
    return "n/a" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    """The tables: per run, pooled per side with the ratios, the loss agreement, the loss curves."""
    runs, pooled_, agree = result["runs"], result["pooled"], result["loss_agreement"]
    lines = [f"# SFT speed: ft.py vs TRL SFTTrainer ({result['started']})", "",
             f"{result['setup']}", "",
             "Tokens = real (attention-mask, non-padding) tokens of the batches trained on; answer tokens = "
             "label != -100. Seconds = the training loop only (no model load, no evaluation).", "",
             "| run | steps | seconds | tokens | tokens/s | answer tokens/s | median step tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['steps']} | {r['train_seconds']:.1f} | {r['train_tokens']} | "
                     f"{_f(r['train_tokens_per_s'])} | {_f(r['train_label_tokens_per_s'])} | "
                     f"{_f(r['median_step_tokens_per_s'])} |")
    lines += ["", "| side (all seeds) | tokens/s | answer tokens/s | median step tokens/s |", "|---|---:|---:|---:|"]
    for side, r in pooled_.items():
        lines.append(f"| {side} | {_f(r['train_tokens_per_s'])} | {_f(r['train_label_tokens_per_s'])} | "
                     f"{_f(r['median_step_tokens_per_s'])} |")
    lines += ["", "| ratio ft / TRL | value | target |", "|---|---:|---|"]
    for key, value in result["ratios"].items():
        lines.append(f"| {key} | {_f(value, '.3f')} | {'>= 1.0' if key.startswith('tokens/s') else ''} |")
    lines += ["", f"## Loss curves (window {agree['window']} steps)", "",
              "| pair | kind | batches | RMS per step | RMS of window means | mean difference "
              "| last window difference |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, r in agree["pairs"].items():
        lines.append(f"| {name} | {r['kind']} | {r.get('batches', '')} | {r['rms_step']:.4f} | {r['rms_window']:.4f} | "
                     f"{_f(r['mean_diff'], '+.4f')} | {_f(r['last_window_diff'], '+.4f')} |")
    if "within_noise" in agree:
        lines += ["", verdict_text(agree)]
    first = agree.get("first_step") or {}
    if first:
        same = agree.get("same_batches")
        lines += ["", "### Step 1: the base model's loss (LoRA B starts at zero)", "",
                  ("Both sides trained the same first batch (ft.py's), so the step-1 losses are the same model's loss "
                   f"on the same tokens and should agree to float tolerance (relative {agree['first_step_rtol']:g})."
                   if same else
                   "The sides trained different first batches (`--trl_batches trl`): the step-1 losses are the base "
                   "model's on different batches and need not agree."), "",
                  "| seed | ft.py step 1 | TRL step 1 | difference | relative | agree |",
                  "|---:|---:|---:|---:|---:|---|"]
        for seed, f in first.items():
            ok = "n/a (different batches)" if f["agree"] is None else ("yes" if f["agree"] else "**NO**")
            lines.append(f"| {seed} | {f['ft']:.6f} | {f['trl']:.6f} | {f['diff']:+.2e} | "
                         f"{_f(f['rel_diff'], '.2e')} | {ok} |")
    notes = result.get("notes") or []
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    names = list(result["loss_curves"])
    lines += ["", "| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    steps = max(len(c) for c in result["loss_curves"].values())
    for i in range(steps):
        cells = [_f(c[i], ".4f") if i < len(c) else "" for c in result["loss_curves"].values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- data ---------------------------------------------------------------------------------------------
def holdout_split(records: list, n: int, seed: int = HOLDOUT_SEED) -> tuple[list, list]:
    """(training, held-out) exactly as qlora_cls.generative.prepare holds out ``n`` records with ``seed``."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[n:]], [records[i] for i in order[:n]]


def write_split_files(args, workdir: Path) -> tuple[Path, Path, list]:
    from qlora_cls import sft
    records = sft.load_records(args.train_file)
    train, held = holdout_split(records, args.eval_holdout)
    train = train[:args.max_train_samples] if args.max_train_samples else train
    paths = workdir / "train.jsonl", workdir / "held.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths[0], paths[1], train


def ft_config(args, seed: int, train_path, held_path):
    from qlora_cls.config import TrainConfig
    cfg = TrainConfig(objective="sft", model_dir=args.model_dir, train_file=str(train_path),
                      validation_file=str(held_path), seed=seed, max_length=args.max_length,
                      batch_size=args.batch_size)
    return cfg


def ft_split(args, train_path, held_path, tokenizer):
    """ft.py's tokenized training split for the split files (the same for every seed)."""
    from qlora_cls import generative
    return generative.prepare(ft_config(args, HOLDOUT_SEED, train_path, held_path), tokenizer).train


def check_same_examples_as_holdout(args, split, tokenizer) -> int:
    """ft.py on the original file with --eval_holdout (seed 42) tokenizes to exactly ``split``'s examples."""
    from qlora_cls import generative
    from qlora_cls.config import TrainConfig
    cfg = TrainConfig(objective="sft", model_dir=args.model_dir, train_file=args.train_file,
                      eval_holdout=args.eval_holdout, seed=HOLDOUT_SEED, max_length=args.max_length,
                      max_train_samples=args.max_train_samples)
    original = generative.prepare(cfg, tokenizer).train
    if original.input_ids != split.input_ids or original.labels != split.labels:
        raise SystemExit("the split files do not reproduce ft.py's --eval_holdout training examples")
    return len(split)


# -- (a) ft.py ----------------------------------------------------------------------------------------
def run_ft(args, seed: int, train_path, held_path, split, workdir: Path) -> tuple[dict, dict]:
    """ft.py's run at ``seed``, and its initial LoRA A matrices (``lora_a_weights`` of the model that
    ``methods.add_trainable`` returns, taken before the first step)."""
    import ft
    from qlora_cls import methods
    out = workdir / f"ft-s{seed}"
    argv = ["--objective", "sft", "--train_file", str(train_path), "--validation_file", str(held_path),
            "--seed", str(seed), "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
            "--lr", str(args.lr), "--warmup_ratio", str(args.warmup_ratio), "--max_length", str(args.max_length),
            "--r", str(args.r), "--lora_alpha", str(args.lora_alpha), "--lora_dropout", str(args.lora_dropout),
            "--optim", "adamw_8bit", "--group_by_length", "true",
            "--generate_examples", "0", "--eval_every", "0", "--latency_calls", "0", "--log_every", "1",
            "--max_eval_samples", "8",  # the base-model and final evaluations are outside train_seconds: kept small
            "--results_path", str(out)]
    if args.model_dir:
        argv += ["--model_dir", args.model_dir]
    lora_init: dict = {}
    add_trainable = methods.add_trainable

    def capture(*a, **k):  # pipeline.build_model looks add_trainable up at call time; a copy changes nothing
        model = add_trainable(*a, **k)
        lora_init.update(lora_a_weights(model))
        return model

    methods.add_trainable = capture
    try:
        summary = ft.main(argv)
    finally:
        methods.add_trainable = add_trainable
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    batches = ft_batches(split.lengths, args.batch_size, seed, args.steps)
    counts = batch_token_counts(split.lengths, split.labels, batches)
    if sum(c["tokens"] for c in counts) != summary["train_tokens"]:
        raise SystemExit(f"ft.py's train_tokens {summary['train_tokens']} != the rebuilt batches' "
                         f"{sum(c['tokens'] for c in counts)}")
    step_seconds = [c["tokens"] / e["tokens_per_s"] for c, e in zip(counts, log)]
    r = summarize_run(step_seconds, counts, summary["train_seconds"])
    config = json.loads((out / "config.json").read_text())
    r.update(loss_curve=[e["loss"] for e in log], step_seconds=step_seconds,
             step_tokens_per_s=[c["tokens"] / s for c, s in zip(counts, step_seconds)],
             step_tokens=[c["tokens"] for c in counts],
             metrics_train_tokens_per_s=summary["train_tokens_per_s"],
             compute_dtype=config["config"]["bnb_4bit_compute_dtype"],
             mixed_precision=config["resolved"]["mixed_precision"],
             gradient_checkpointing=config["config"]["gradient_checkpointing"],
             fast_cpu_dropout=config["config"]["fast_cpu_dropout"], lora_weight_dtype="float32",
             batches="ft.py's LengthGroupedBatchSampler")
    return r, lora_init


# -- (b) TRL ------------------------------------------------------------------------------------------
def import_trl():
    try:
        import trl
    except ImportError:
        raise SystemExit(f"TRL is not installed; install it with: {TRL_INSTALL}")
    return trl


def trl_dataset(records: list):
    """TRL's conversational prompt/completion format: the turns before the answer, and the answer turn."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])


def run_trl(args, seed: int, records: list, split, compute_dtype: str, workdir: Path,
            ft_lora_init: Optional[dict] = None) -> dict:
    """TRL's run at ``seed``; with ``--trl_batches ft`` on ft.py's batches of ``seed`` (``FixedBatches``), each
    step's batch checked against ft.py's (``check_step_batch``). ``ft_lora_init``: ft.py's initial LoRA A at this
    seed, compared with TRL's (``compare_lora_init``)."""
    import torch
    from peft import LoraConfig, TaskType, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from qlora_cls.modeling import DTYPE, disable_cpu_weight_repacking, resolve_model_dir

    model_path = resolve_model_dir(args.model_dir)
    compute = DTYPE[compute_dtype]
    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=compute, device_map={"": 0 if on_gpu else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    model.config.use_cache = False
    disable_cpu_weight_repacking(model)  # the same CPU guard as ft.py
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=args.lora_alpha,
                             lora_dropout=args.lora_dropout, target_modules=["q_proj", "v_proj"], bias="none")
    sargs = SFTConfig(
        output_dir=str(workdir / f"trl-s{seed}"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=math.ceil(args.warmup_ratio * args.steps),
        optim="adamw_8bit", weight_decay=0.0, max_grad_norm=1.0, seed=seed, data_seed=seed,
        train_sampling_strategy="group_by_length", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", bf16=False, fp16=False, gradient_checkpointing=False, max_length=args.max_length,
        packing=False, completion_only_loss=True, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=not on_gpu)
    counts: list = []
    clock: dict = {"steps": []}
    losses: dict = {}
    batches = ft_batches(split.lengths, args.batch_size, seed, args.steps) if args.trl_batches == "ft" else None

    class Counting(FixedBatches, SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if batches is not None:  # list comparisons: microseconds against a step's ~1 s
                if len(counts) >= len(batches):
                    raise SystemExit(f"TRL trains more than ft.py's {len(batches)} batches")
                check_step_batch(len(counts) + 1, inputs, batches[len(counts)], split)
            counts.append((inputs["attention_mask"].sum(), (inputs["labels"] != -100).sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            clock["steps"].append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    trainer = Counting(model=model, args=sargs, train_dataset=trl_dataset(records), processing_class=tokenizer,
                       peft_config=peft_config, callbacks=[Clock()])
    check_trl_examples(trainer.train_dataset, split)  # so row i of TRL's dataset is ft.py's example i
    trainer.fixed_batches = batches
    lora_dtypes = {str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}
    trl_lora_init = lora_a_weights(trainer.model)
    lora_a_dtype = str(next((p.dtype for n, p in trainer.model.named_parameters() if ".lora_A." in n),
                            torch.float32)).replace("torch.", "")
    if args.trl_lora_dtype == "float32":
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trained_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad})
    trainer.train()
    if batches is not None and len(counts) != len(batches):
        raise SystemExit(f"TRL trained {len(counts)} batches, ft.py {len(batches)}")
    marks = [clock["start"]] + clock["steps"]
    step_seconds = [b - a for a, b in zip(marks, marks[1:])]
    step_counts = [{"tokens": int(t), "label_tokens": int(lab)} for t, lab in counts]
    r = summarize_run(step_seconds, step_counts, clock["end"] - clock["start"])
    r.update(loss_curve=[losses[s] for s in sorted(losses)], step_seconds=step_seconds,
             step_tokens_per_s=[c["tokens"] / s for c, s in zip(step_counts, step_seconds)],
             step_tokens=[c["tokens"] for c in step_counts], compute_dtype=compute_dtype, mixed_precision="no",
             gradient_checkpointing=False, lora_weight_dtype_after_trl_init=sorted(lora_dtypes),
             lora_weight_dtype=",".join(trained_dtypes),
             train_sampling_strategy=sargs.train_sampling_strategy,
             batches=("ft.py's batches of this seed (FixedBatches; checked every step)" if batches is not None
                      else f"TRL's own sampler ({sargs.train_sampling_strategy})"),
             lora_init_vs_ft=compare_lora_init(ft_lora_init, trl_lora_init, lora_a_dtype)
             if ft_lora_init is not None else None)
    del trainer, model
    return r


def check_trl_examples(dataset, split) -> None:
    """TRL's prepared examples are ft.py's, token for token (input_ids and labels), in the same record order."""
    ids, labels = dataset["input_ids"], dataset["labels"]
    if len(ids) != len(split):
        raise SystemExit(f"TRL kept {len(ids)} examples, ft.py {len(split)}")
    bad = [i for i in range(len(ids)) if list(ids[i]) != split.input_ids[i] or list(labels[i]) != split.labels[i]]
    if bad:
        i = bad[0]
        raise SystemExit(f"{len(bad)} examples differ between TRL and ft.py; first: record {i}: "
                         f"TRL {list(labels[i])[-8:]} vs ft.py {split.labels[i][-8:]}")


def notes(args, runs: dict, on_cpu: bool) -> list[str]:
    """What still differs between the sides beyond the batches: the initial LoRA A (measured), the dropout masks."""
    out = []
    for seed in args.seed_list:
        c = runs[f"trl s{seed}"].get("lora_init_vs_ft")
        if not c:
            continue
        if not c["same_names"]:
            out.append(f"Seed {seed}: the two sides' LoRA A matrices have different names or counts; not compared.")
        elif c["equal"]:
            out.append(f"Seed {seed}: the initial LoRA A matrices ({c['tensors']}) are equal on both sides, bit for "
                       f"bit (TRL's in {c['trl_dtype']}, ft.py's float32: PEFT rounds its float32 draw to the 4-bit "
                       f"layer's compute dtype before upcasting it).")
        elif c["equal_after_rounding"]:
            out.append(f"Seed {seed}: the initial LoRA A matrices ({c['tensors']}) are the same draw: ft.py's float32 "
                       f"values rounded to TRL's {c['trl_dtype']} equal TRL's (TRL casts a 4-bit model's LoRA weights "
                       f"to {c['trl_dtype']}; largest difference {c['max_abs_diff']:.2e}).")
        else:
            out.append(f"Seed {seed}: the initial LoRA A matrices DIFFER between the sides (largest difference "
                       f"{c['max_abs_diff']:.2e}, TRL's in {c['trl_dtype']}): a different random draw, so the "
                       "cross-side pair also differs in LoRA initialisation.")
    fast = on_cpu and any(r.get("fast_cpu_dropout") for n, r in runs.items() if n.startswith("ft "))
    out.append(f"The LoRA dropout ({args.lora_dropout}) masks differ between the sides even on the same batches: "
               + ("ft.py's fast CPU dropout draws its masks its own way (qlora_cls/fast_dropout.py), TRL's is torch's "
                  "nn.Dropout" if fast else "the two sides do not draw from torch's generator in the same order")
               + "; step 1 does not depend on them (LoRA B is zero), later steps do.")
    return out


# -- main ---------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    trl = import_trl()
    import torch
    import utils
    from qlora_cls.hardware import default_compute_dtype
    from qlora_cls.modeling import load_tokenizer, resolve_model_dir
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    runs, curves = {}, {"ft": {}, "trl": {}}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        workdir = Path(tmp)
        train_path, held_path, records = write_split_files(args, workdir)
        tokenizer = load_tokenizer(resolve_model_dir(args.model_dir))
        split = ft_split(args, train_path, held_path, tokenizer)
        examples = check_same_examples_as_holdout(args, split, tokenizer)
        compute_dtype = None
        for seed in args.seed_list:
            r, ft_lora_init = run_ft(args, seed, train_path, held_path, split, workdir)
            compute_dtype = r["compute_dtype"]
            runs[f"ft s{seed}"], curves["ft"][seed] = r, r["loss_curve"]
            r = run_trl(args, seed, records, split, compute_dtype, workdir, ft_lora_init)
            runs[f"trl s{seed}"], curves["trl"][seed] = r, r["loss_curve"]
    pooled_ = {side: pooled([r for n, r in runs.items() if n.startswith(side + " ")]) for side in SIDES}
    ratios = {"tokens/s (all seeds)": ratio(pooled_["ft"]["train_tokens_per_s"], pooled_["trl"]["train_tokens_per_s"]),
              "answer tokens/s (all seeds)": ratio(pooled_["ft"]["train_label_tokens_per_s"],
                                                   pooled_["trl"]["train_label_tokens_per_s"]),
              "median step tokens/s (all seeds)": ratio(pooled_["ft"]["median_step_tokens_per_s"],
                                                        pooled_["trl"]["median_step_tokens_per_s"])}
    for seed in args.seed_list:
        ratios[f"tokens/s seed {seed}"] = ratio(runs[f"ft s{seed}"]["train_tokens_per_s"],
                                                runs[f"trl s{seed}"]["train_tokens_per_s"])
    trl_batches = ("ft.py's of each seed, in its order (--trl_batches ft)" if args.trl_batches == "ft"
                   else "its own group_by_length sampler (--trl_batches trl)")
    setup = (f"{args.steps} steps x seeds {args.seed_list}, batch {args.batch_size}, lr {args.lr}, warm-up "
             f"{math.ceil(args.warmup_ratio * args.steps)} steps, max_length {args.max_length}, LoRA r {args.r} alpha "
             f"{args.lora_alpha} dropout {args.lora_dropout} on q_proj,v_proj, NF4 4-bit (compute {compute_dtype}), "
             f"adamw_8bit, {examples} training records; TRL {trl.__version__} LoRA weights "
             f"{runs[f'trl s{args.seed_list[0]}']['lora_weight_dtype']} (--trl_lora_dtype {args.trl_lora_dtype}), "
             f"ft.py's float32; TRL's batches: {trl_batches}; torch threads {torch.get_num_threads()}")
    result = {"started": started, "setup": setup, "args": {k: v for k, v in vars(args).items()},
              "trl_version": trl.__version__, "train_examples": examples,
              "tokens_definition": "attention-mask (non-padding) tokens of the batches trained on; "
                                   "label_tokens: label != -100",
              "runs": {n: {k: v for k, v in r.items()} for n, r in runs.items()},
              "pooled": pooled_, "ratios": ratios,
              "loss_agreement": loss_agreement(curves, args.loss_window, same_batches=args.trl_batches == "ft"),
              "lora_init": {seed: runs[f"trl s{seed}"]["lora_init_vs_ft"] for seed in args.seed_list},
              "notes": notes(args, runs, on_cpu=not torch.cuda.is_available()),
              "loss_curves": {n: r["loss_curve"] for n, r in runs.items()},
              "machine": {"cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                          "load_average": os.getloadavg(), "packages": utils.package_versions() | {"trl": trl.__version__},
                          "default_compute_dtype": default_compute_dtype("cuda" if torch.cuda.is_available() else "cpu")}}
    path = write_result(args.out, "sft-", result, markdown(result), tag="bench-sft")
    result["json_path"] = str(path)
    return result


if __name__ == "__main__":
    main()
