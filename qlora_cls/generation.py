"""Evaluation of the generative objectives (``--objective sft|lm``): answer loss, corpus perplexity, generation.

- ``answer_loss``: mean negative log-likelihood of the scored tokens (labels != -100: the answers, or every
  token with ``--train_on_prompt``) over a tokenized split; the same Accelerate pattern as
  ``evaluation.predict`` (rows sorted by length, ``gather_for_metrics``), so several processes give the
  single-process figure.
- ``corpus_perplexity``: the sliding-window perplexity of the transformers guide
  (https://huggingface.co/docs/transformers/perplexity), for plain text longer than the context.
- ``generate``: batched, left-padded generation that records whether each answer ended on a stop token
  (the study's failure: the end-of-turn marker never came, answers ran to the length limit).
- ``generation_metrics`` / ``write_generations``: stop rate, exact match, ROUGE-L; ``generations_<split>.jsonl``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from .evaluation import eval_loader
from .files import atomic_write_text


def _scored_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of scored tokens per row, the causal LM shift applied (logit t predicts token t+1).

    Only the scored positions go through log-softmax in float32: a (rows x length x vocab) float32 copy
    would be gigabytes for BLOOM's 250k vocabulary.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    rows = keep.nonzero(as_tuple=True)[0]
    picked = logits[:, :-1][keep].float()  # (scored tokens, vocab)
    nll = F.cross_entropy(picked, targets[keep], reduction="none")
    per_row = torch.zeros(labels.shape[0], dtype=torch.float64, device=logits.device)
    per_row.index_add_(0, rows, nll.double())
    return per_row, keep.sum(1)


@torch.inference_mode()
def answer_loss(model, split, batch_size: int, accelerator) -> dict:
    """``loss`` (mean NLL per scored token, pooled over the split, not a mean of per-example means, so long
    answers weigh by their length), ``perplexity`` = exp(loss), ``tokens`` (how many were scored).

    The same loop as ``evaluation.predict``: rows longest first (an out-of-memory shows at once, little
    padding), a loader prepared by Accelerate (each process its share), and ``gather_for_metrics``, which
    drops the duplicates Accelerate adds to even out the last round, so the sums count each example once.
    Its own ``torch.Generator``: evaluating must not shift training's random stream.
    """
    was_training = model.training
    model.eval()
    n = len(split)
    _, loader = eval_loader(split, batch_size, accelerator)
    nll_parts, count_parts = [], []
    for batch in loader:
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        nll, count = _scored_nll(logits, batch["labels"])
        nll_parts.append(accelerator.gather_for_metrics(nll).cpu())
        count_parts.append(accelerator.gather_for_metrics(count).cpu())
    if was_training:
        model.train()
    gathered = sum(len(p) for p in nll_parts)
    if gathered != n:
        raise RuntimeError(f"answer loss gathered {gathered} examples for {n}")
    total, tokens = float(torch.cat(nll_parts).sum()), int(torch.cat(count_parts).sum())
    if tokens == 0:
        raise ValueError("answer loss: no scored tokens (every label is -100)")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


@torch.inference_mode()
def corpus_perplexity(model, ids: torch.LongTensor, max_length: int, stride: int, device) -> dict:
    """Perplexity of one long token sequence with the transformers guide's sliding window.

    Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens the
    previous one did not (``trg_len``), so with ``stride < max_length`` every token but the first is scored
    once, with at least ``max_length - stride`` tokens of context; ``stride == max_length`` gives disjoint
    windows (the first token of each is then not scored: it has no context).

    One deliberate difference from the guide: the guide weights each window's mean loss by the number of
    valid targets minus one (the shift), which is right for the first window but one short for every later
    overlapping window (its first target has context, so it is scored). Here the NLL is summed per token and
    divided by the tokens actually scored, so ``nll`` is exactly the mean per-token NLL; the windows and each
    token's context are the guide's.
    """
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError("corpus_perplexity takes one sequence")
        ids = ids[0]
    seq_len = ids.numel()
    if seq_len < 2:
        raise ValueError("corpus_perplexity needs at least 2 tokens")
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}: a larger one skips tokens")
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    # A whole test set is thousands of windows (WikiText-2's test.txt: 2,438 at 256/128, 30 min on one CPU core).
    windows = math.ceil(max(seq_len - max_length, 0) / stride) + 1  # the loop ends at the first reaching the end
    for begin_loc in tqdm(range(0, seq_len, stride), total=windows, desc="perplexity windows", leave=False,
                          disable=windows < 50):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may differ from stride in the last window
        input_ids = ids[begin_loc:end_loc].unsqueeze(0).to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = model(input_ids).logits
        nll, count = _scored_nll(logits, target_ids)
        nll_sum += float(nll.sum())
        n_tokens += int(count.sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    if was_training:
        model.train()
    avg = nll_sum / n_tokens
    return {"perplexity": math.exp(avg), "nll": avg, "tokens": n_tokens}


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids: list[list[int]], stop_ids: list[int], max_new_tokens: int,
             batch_size: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0) -> list[dict]:
    """One ``{"generation", "stopped", "new_tokens"}`` per prompt, in prompt order.

    Left padding, built here from the ids (the training tokenizer pads right; a decoder continues from the
    last position, so padding must sit before the prompt, masked; ``generate`` derives positions from the
    mask). Prompts are batched longest first, so a batch holds similar lengths.
    ``generation``: the new text up to, not including, the first stop token; ``stopped``: a stop token came
    within ``max_new_tokens`` (an answer that runs to the limit is the failure the stop rate measures);
    ``new_tokens``: tokens produced, the stop token included.
    Greedy by default; sampling uses exactly ``temperature`` and ``top_p`` (top-k off) under ``seed``, in a
    forked RNG so the training random stream is untouched. ``use_cache=True``: training switched the config's off.
    """
    if not stop_ids:
        raise ValueError("generate needs at least one stop id")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stops = torch.tensor(stop_ids, device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False)
    order = sorted(range(len(prompt_ids)), key=lambda r: (-len(prompt_ids[r]), r))
    results: list[Optional[dict]] = [None] * len(prompt_ids)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompt_ids[r]) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                p = prompt_ids[r]
                if len(p) == 0:
                    raise ValueError(f"prompt {r} is empty")
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                                 use_cache=True, **sampling)
            for i, r in enumerate(rows):
                new = out[i, width:]
                hits = torch.isin(new, stops).nonzero()
                stopped = len(hits) > 0
                end = int(hits[0]) if stopped else len(new)
                results[r] = {"generation": tokenizer.decode(new[:end].tolist(), skip_special_tokens=False),
                              "stopped": stopped, "new_tokens": end + 1 if stopped else end}
    if was_training:
        model.train()
    return results


def generation_metrics(generations: list[dict], references: list[str]) -> dict:
    """``stop_rate`` (share of answers that ended on a stop token), ``exact_match`` (stripped strings equal),
    ``rouge_l`` (mean ROUGE-L F-measure, from Google's ``rouge-score``: offline, the reference
    implementation). Its tokenizer keeps only ASCII letters and digits (lower-cased), so text in other
    scripts scores 0 against anything; exact match still counts it."""
    from rouge_score.rouge_scorer import RougeScorer
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    if not generations:
        raise ValueError("no generations to score")
    scorer = RougeScorer(["rougeL"])
    n = len(generations)
    return {"stop_rate": sum(bool(g["stopped"]) for g in generations) / n,
            "exact_match": sum(g["generation"].strip() == r.strip() for g, r in zip(generations, references)) / n,
            "rouge_l": sum(scorer.score(r, g["generation"])["rougeL"].fmeasure
                           for g, r in zip(generations, references)) / n}


def write_generations(path: str | os.PathLike, prompts: list[str], references: list[str],
                      generations: list[dict]) -> None:
    """``generations_<split>.jsonl``: one ``{"prompt", "reference", "generation", "stopped"}`` a line, written
    atomically (a reader or a resume sees the old complete file or the new one)."""
    if not len(prompts) == len(references) == len(generations):
        raise ValueError(f"{len(prompts)} prompts, {len(references)} references, {len(generations)} generations")
    lines = [json.dumps({"prompt": p, "reference": r, "generation": g["generation"], "stopped": g["stopped"]},
                        ensure_ascii=False) + "\n" for p, r, g in zip(prompts, references, generations)]
    atomic_write_text(path, "".join(lines))
