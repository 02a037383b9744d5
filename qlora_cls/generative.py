"""The generative objectives of ft.py (``--objective sft`` or ``lm``): their data, evaluation and final record.

They run on ft.py's loop unchanged: the splits here are map-style datasets with a collator (sft.py), the
loss is the causal LM's own (``model(**batch).loss``: labels of -100 are not scored, so the prompt is left
out of an SFT loss), and ``evaluate`` replaces the classification evaluator.

The trivial baseline of a generative run is the base model itself, scored by the same evaluation before
the first step: every method starts as the identity (LoRA's B and the adapters' up-projections are zero,
(IA)^3's scales one), so the model at step 0 *is* the base model, with no second copy loaded.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import generation, sft
from .errors import UsageError

log = logging.getLogger(__name__)

# Each objective's metrics, the main one first (lower is better for it, for both objectives).
METRICS = {"sft": ("answer_perplexity", "answer_loss", "stop_rate", "exact_match", "rouge_l"),
           "lm": ("perplexity", "nll")}
MAIN_METRIC = {objective: names[0] for objective, names in METRICS.items()}


@dataclass
class GenerativeData:
    train: object  # sft.SFTSplit (or the text blocks of --objective lm)
    eval: object
    fmt: Optional[sft.ChatFormat]  # the chat format (sft only)
    stop_ids: list  # token ids that end an answer: the end-of-turn token (and the tokenizer's eos)


def prepare(cfg, tokenizer) -> GenerativeData:
    """The training and evaluation splits, checked and tokenized before any weight is read."""
    if cfg.objective == "lm":
        if not cfg.train_file or not cfg.validation_file:
            raise UsageError("--objective lm trains on plain text: give --train_file and --validation_file "
                             "(UTF-8 text files, e.g. wikitext-2's valid.txt and test.txt)")
        return GenerativeData(sft.text_blocks(cfg.train_file, tokenizer, cfg.max_length, cfg.max_train_samples),
                              sft.text_blocks(cfg.validation_file, tokenizer, cfg.max_length, cfg.max_eval_samples),
                              None, [])
    source = cfg.train_file or (None if cfg.dataset == "nyu-mll/glue" else cfg.dataset)
    if source is None:
        raise UsageError("--objective sft needs instruction records or conversations: --train_file FILE (.json, "
                         ".jsonl or .csv) or --dataset <a hub id or hub-layout folder of such records>")
    fmt = sft.chat_format(tokenizer, cfg.chat_template)  # the template first: the cheapest check
    columns = (cfg.instruction_column, cfg.input_column, cfg.output_column)
    records = sft.load_records(source, columns, split=cfg.train_splits[0])
    if cfg.validation_file:
        held = sft.load_records(cfg.validation_file, columns)
    else:  # a seeded held-out share of the training records
        n = int(cfg.eval_holdout) if cfg.eval_holdout >= 1 else round(cfg.eval_holdout * len(records))
        if len(records) < 2:
            raise UsageError(f"{source} has {len(records)} record: too few to hold some out for evaluation; give more "
                             f"records, or the evaluation records with --validation_file")
        if not 0 < n < len(records):
            raise UsageError(f"--eval_holdout {cfg.eval_holdout} holds out {n} of {len(records)} records; give a "
                             f"count between 1 and {len(records) - 1}, a fraction, or --validation_file")
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        held, records = [records[i] for i in order[:n]], [records[i] for i in order[n:]]
    records = records[:cfg.max_train_samples] if cfg.max_train_samples else records
    held = held[:cfg.max_eval_samples] if cfg.max_eval_samples else held
    train = sft.encode(records, tokenizer, fmt, cfg.max_length, cfg.train_on_prompt)
    held_split = sft.encode(held, tokenizer, fmt, cfg.max_length, cfg.train_on_prompt)
    if not len(train) or not len(held_split):
        raise UsageError(f"no {'training' if not len(train) else 'evaluation'} example keeps an answer within "
                         f"--max_length {cfg.max_length}; raise it")
    stop_ids = [tokenizer.convert_tokens_to_ids(fmt.end_of_turn)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    return GenerativeData(train, held_split, fmt, stop_ids)


def evaluate(cfg, model, data: GenerativeData, tokenizer, accelerator, out_dir: Optional[Path] = None,
             split: str = "validation", zero3: bool = False) -> dict:
    """Scores of the evaluation split: answer-token loss and perplexity (sft) or the corpus perplexity with a
    sliding window (lm); for sft also greedy (or sampled) generations of the first --generate_examples
    prompts, their stop rate, exact match and ROUGE-L, written to ``out_dir/generations_<split>.jsonl``.
    Generation runs in the main process, so not under ZeRO-3 (its forwards are collective): skipped there."""
    runner = model
    # fast_eval.py's inference copy: 4-bit weights de-quantized once, not at every forward. lm scores in the main
    # process only: the others build no copy (under ZeRO-3 every process takes part in gathering the weights).
    if cfg.fast_eval and (cfg.objective != "lm" or accelerator.is_main_process or zero3):
        from .fast_eval import inference_model
        runner, _ = inference_model(model, accelerator.device, zero3=zero3)
    if cfg.objective == "lm":
        stride = cfg.stride or cfg.max_length // 2
        scores = {}
        if accelerator.is_main_process:  # one sequential pass; the other processes wait
            r = generation.corpus_perplexity(runner, data.eval.ids, cfg.max_length, stride, accelerator.device)
            scores = {"perplexity": r["perplexity"], "nll": r["nll"], "eval_tokens": r["tokens"]}
        return _shared(accelerator, scores)
    loss = generation.answer_loss(runner, data.eval, cfg.eval_batch_size, accelerator)
    scores = {"answer_loss": loss["loss"], "answer_perplexity": loss["perplexity"], "answer_tokens": loss["tokens"]}
    n = 0 if zero3 else min(cfg.generate_examples, len(data.eval))
    if n and accelerator.is_main_process:
        gens = generation.generate(runner, tokenizer, data.eval.prompt_ids[:n], data.stop_ids, cfg.max_new_tokens,
                                   cfg.eval_batch_size, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.seed)
        scores.update(generation.generation_metrics(gens, data.eval.references[:n]), generated=n)
        if out_dir is not None:
            generation.write_generations(out_dir / f"generations_{split}.jsonl", data.eval.prompts[:n],
                                         data.eval.references[:n], gens)
    return _shared(accelerator, scores)


def _shared(accelerator, scores: dict) -> dict:
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([scores])[0] if accelerator.num_processes > 1 else scores
