"""Classification by label words (``--classifier label_words``): the causal LM itself, no head.

Each label has a verbalisation (its dataset name with ``_`` as a space, ``not_equivalent`` -> "not equivalent",
or ``--label_words``). A label's score is the log-likelihood of its tokens right after the rendered prompt
(summed over a multi-token label; divided by the label's token count with ``--length_normalize``), the
prediction is the argmax and the probabilities are the softmax over the labels' scores: how lm-eval-harness
scores multiple-choice tasks. Training puts the causal-LM loss on the gold label's tokens only (the prompt's
labels are -100), with the SFT objective's collator (``DataCollatorForSeq2Seq``) and loss (the model's own).

The scores stand where a head's logits stood (``evaluation.predict`` dispatches here for a ``LabelWordSplit``),
so metrics, predictions_*.csv, eval.py, predict.py and report.py read them unchanged.

Tokenization (``encode``): a label's tokens are what follows the prompt's tokens in the tokenization of
``prompt + " " + word`` (lm-eval-harness ``_encode_pair``: a prompt's trailing whitespace moves to the
answer), so they are the tokens the model would produce after the prompt, leading space included; where the
joint tokenization does not start with the prompt's own tokens (a merge across the boundary) the answer is
tokenized alone after the prompt's tokens. Prompts are cut (from the right, as the head's are) so that the
longest label still fits in ``--max_length``.

Scoring (``score``), one pass over the prompt per example, whatever the number of labels: the prompts run
once, left-padded, with the KV cache on and only the last position's logits computed (``logits_to_keep``):
that position's log-softmax gives every label's first token. On the fast path (``--fast_eval``) the template's
shared leading tokens run once per evaluation, as the head's do (``fast_eval.prepare``, prefix.py): each
batch then holds only the prompts' other tokens, left-padded after that prefix's cache (the padding sits
between the prefix and the rest, masked; positions still come from the mask). On MRPC's 408 validation
examples with the embedded model that took label words from 1.39x to 1.15x the head's evaluation time (16
shared tokens of ~74; docs/benchmarks.md). Labels longer than one token then continue from that cache,
repeated once per label (``DynamicCache.batch_repeat_interleave``), with their remaining tokens only (a few
tokens each, not the prompt again). Where every label is one token the second call is skipped:
one forward per example. Why not ``prompt + label`` for every label: K times the prompt's cost. Why not
one packed sequence with a custom 4-D mask: not every architecture takes one. Positions come from the
attention mask (``cumsum - 1``), so left padding (prompts) and right padding (continuations) give each real
token the position it has alone.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .data import Rows
from .errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelWords:
    """How a run classifies by label words: ``words`` as given (None = the label names), normalisation."""
    words: Optional[tuple[str, ...]] = None
    length_normalize: bool = False

    @classmethod
    def of(cls, cfg) -> Optional["LabelWords"]:
        """From a TrainConfig; None for a head run."""
        if getattr(cfg, "classifier", "head") != "label_words":
            return None
        return cls(tuple(cfg.label_words) if cfg.label_words else None, bool(cfg.length_normalize))

    def resolve(self, label_names: Optional[Sequence[str]], template=None) -> list[str]:
        """The verbalisation of each label, in label-id order (checked: one per label, distinct, not empty):
        ``--label_words``, else the prompt file's ``# label_words:`` line (``template.label_words``), else the
        label names."""
        if label_names is None:
            raise UsageError("--classifier label_words scores class names; this is a regression task (one number "
                             "per example): use --classifier head")
        from_file = getattr(template, "label_words", None)
        given = ("--label_words" if self.words else f"prompt {template.name!r}'s '# label_words:' line" if from_file
                 else "the label names")
        words = (list(self.words) if self.words else list(from_file) if from_file
                 else [name.replace("_", " ") for name in label_names])
        if len(words) != len(label_names):
            raise UsageError(f"{given} gives {len(words)} word(s) ({', '.join(words)}) for {len(label_names)} "
                             f"labels ({', '.join(label_names)}); give one per label, in label-id order")
        if len(set(words)) != len(words):
            raise UsageError(f"{given} {', '.join(words)}: two labels have the same words; each label "
                             f"needs its own")
        return words


# -- tokenization ---------------------------------------------------------------------------------------------
def encode(tokenizer, prompts: Sequence[str], words: Sequence[str], max_length: int
           ) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each prompt's token ids and, per label, the label's token ids after it (see the module docstring).

    Returns ``(prompt_ids, candidates)``, ``candidates[i][k]`` the tokens of label ``k`` after prompt ``i``.
    """
    contexts, answers = [], []
    for prompt in prompts:
        stripped = prompt.rstrip()
        contexts.append(stripped)
        answers.append(prompt[len(stripped):] or " ")  # the separator: the prompt's own whitespace, else a space
    context_ids = tokenizer(contexts, verbose=False)["input_ids"] if contexts else []
    candidates: list[list[list[int]]] = [[] for _ in contexts]
    for word in words:
        joint = tokenizer([c + a + word for c, a in zip(contexts, answers)], verbose=False)["input_ids"] if contexts else []
        for i, (ctx, ids) in enumerate(zip(context_ids, joint)):
            if ids[:len(ctx)] == ctx and len(ids) > len(ctx):
                cont = ids[len(ctx):]
            else:
                cont = tokenizer(answers[i] + word, add_special_tokens=False)["input_ids"]
            candidates[i].append(list(cont))
    longest = max((len(c) for cands in candidates for c in cands), default=0)
    room = max_length - longest
    if contexts and room < 1:
        raise UsageError(f"--max_length {max_length} leaves no room for the prompt: the longest label word is "
                         f"{longest} tokens; raise --max_length")
    return [list(ctx[:room]) for ctx in context_ids], candidates


class LabelWordSplit(Rows):
    """A classification split for label words: each example's prompt tokens and every label's tokens after it.

    ``labels`` are the class ids (as ``data.TokenizedSplit``'s: baselines, metrics and prediction tables read
    them); ``__getitem__`` gives the training example, prompt + the gold label's tokens with the prompt's token
    labels -100, collated as the SFT objective collates (``DataCollatorForSeq2Seq``: right padding, labels
    padded with -100 by position). A hidden label (-1) trains on nothing (``check_trainable`` refuses such
    splits for training anyway).
    """

    def __init__(self, tokenizer, prompt_ids: list[list[int]], candidates: list[list[list[int]]], labels,
                 idx: list[int], words: Sequence[str], length_normalize: bool):
        from transformers import DataCollatorForSeq2Seq
        self.prompt_ids, self.candidates = prompt_ids, candidates
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.idx, self.words, self.length_normalize = list(idx), list(words), length_normalize
        self.pad_id = tokenizer.pad_token_id
        self.input_ids = prompt_ids  # Rows' length; the training rows are built in __getitem__
        self.lengths = [len(p) + (len(c[int(y)]) if y >= 0 else 0)
                        for p, c, y in zip(prompt_ids, candidates, self.labels.tolist())]
        self.collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    classifier = "label_words"  # evaluation.predict hands such a split to ``score``

    def score(self, model, batch_size: int, accelerator, fast: bool = False, prepared: Optional[tuple] = None,
              stream_dtype: str = "float32") -> tuple[np.ndarray, dict]:
        """``predict`` on this split (what ``evaluation.predict`` returns for it)."""
        return predict(model, self, batch_size, accelerator, fast, prepared, stream_dtype)

    def __getitem__(self, r: int) -> dict:
        y = int(self.labels[r])
        answer = self.candidates[r][y] if y >= 0 else []
        ids = self.prompt_ids[r] + answer
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [-100] * len(self.prompt_ids[r]) + list(answer)}

    @property
    def multi_token(self) -> bool:
        """Whether any label of any example has more than one token (scoring then continues from the cache)."""
        return any(len(c) > 1 for cands in self.candidates for c in cands)

    @classmethod
    def concat(cls, splits: Sequence["LabelWordSplit"]) -> "LabelWordSplit":
        """Several splits as one (training on train + validation under the final protocol)."""
        if len(splits) == 1:
            return splits[0]
        import copy
        merged = copy.copy(splits[0])
        for name in ("prompt_ids", "candidates", "idx", "lengths"):
            setattr(merged, name, [x for s in splits for x in getattr(s, name)])
        merged.input_ids = merged.prompt_ids
        merged.labels = torch.cat([s.labels for s in splits])
        return merged


def tokenize_split(ds, template, tokenizer, label_column: str, max_length: int, words: Sequence[str],
                   length_normalize: bool) -> LabelWordSplit:
    """A dataset split rendered with ``template`` and encoded for label words."""
    template.check_columns(ds.column_names)
    rows = ds.to_list()
    prompt_ids, candidates = encode(tokenizer, [template.render(r) for r in rows], words, max_length)
    idx = [r["idx"] for r in rows] if "idx" in ds.column_names else list(range(len(rows)))
    return LabelWordSplit(tokenizer, prompt_ids, candidates, [int(r[label_column]) for r in rows], idx, words,
                          length_normalize)


def rows_split(tokenizer, template, rows: Sequence[dict], max_length: int, words: Sequence[str],
               length_normalize: bool) -> LabelWordSplit:
    """Unlabelled rows (predict.py) as a split to score."""
    prompt_ids, candidates = encode(tokenizer, [template.render(r) for r in rows], words, max_length)
    return LabelWordSplit(tokenizer, prompt_ids, candidates, [-1] * len(rows), list(range(len(rows))), words,
                          length_normalize)


# -- scoring --------------------------------------------------------------------------------------------------
class _ScoringView(torch.utils.data.Dataset):
    """The split as ``evaluation.eval_loader`` takes it (``lengths``, ``collate``), batched for ``score``;
    ``skip``: leading prompt tokens left out of every batch (the shared prefix, run once)."""

    def __init__(self, split: LabelWordSplit, skip: int = 0):
        self.split, self.skip = split, skip
        self.lengths = [len(p) for p in split.prompt_ids]
        self.rest = split.multi_token  # decided for the whole split: every process makes the same calls

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, r: int) -> int:
        return r

    def collate(self, rows: list[int]) -> dict:
        """Prompts left-padded; each label's first token; the labels' other tokens, one row per (example, label):
        inputs = the label's tokens but its last, targets = its tokens but its first (-100 beyond)."""
        s = self.split
        k, pad = len(s.candidates[rows[0]]), s.pad_id if s.pad_id is not None else 0
        width = max(self.lengths[r] for r in rows) - self.skip
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            p = s.prompt_ids[r][self.skip:]
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p):] = 1
        cands = [c for r in rows for c in s.candidates[r]]
        rest = max(1, max(len(c) - 1 for c in cands)) if self.rest else 0
        rest_ids = torch.full((len(cands), rest), pad, dtype=torch.long)
        rest_mask = torch.zeros((len(cands), rest), dtype=torch.long)
        targets = torch.full((len(cands), rest), -100, dtype=torch.long)
        for j, c in enumerate(cands):
            n = len(c) - 1
            if n > 0:
                rest_ids[j, :n] = torch.tensor(c[:-1], dtype=torch.long)
                rest_mask[j, :n] = 1
                targets[j, :n] = torch.tensor(c[1:], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask,
                "first": torch.tensor([c[0] for c in cands], dtype=torch.long).view(len(rows), k),
                "counts": torch.tensor([len(c) for c in cands], dtype=torch.float32).view(len(rows), k),
                "rest_ids": rest_ids, "rest_mask": rest_mask, "rest_targets": targets}


def _keeps_last_logits_only(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do; remote code may not)."""
    from .prefix import hf_model
    try:
        return "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def score_batch(model, batch: dict, length_normalize: bool = False, prefix: Optional[list] = None) -> torch.Tensor:
    """(examples, labels) log-likelihoods of each label after each prompt, float32 (see the module docstring).
    ``prefix``: the batch-1 cache of the leading tokens every prompt shares (``prefix.prefix_layers``), which
    the batch's rows then leave out (``_ScoringView(skip=...)``)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, k = batch["first"].shape
    rest = batch["rest_ids"].shape[1] > 0
    extra = {"logits_to_keep": 1} if _keeps_last_logits_only(model) else {}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if prefix:
        from .prefix import expanded_cache, hf_model
        p = prefix[0][0].shape[-2]
        extra["past_key_values"] = expanded_cache(hf_model(model), prefix, rows)
        mask, positions = torch.cat([mask.new_ones(rows, p), mask], 1), positions + p
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=rest, **extra)
    scores = torch.log_softmax(out.logits[:, -1].float(), -1).gather(1, batch["first"])
    if rest:
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        rest_mask = batch["rest_mask"]
        start = mask.sum(1).repeat_interleave(k)[:, None]
        positions = start + torch.arange(rest_mask.shape[1], device=start.device)[None]
        out = model(input_ids=batch["rest_ids"], attention_mask=torch.cat([mask.repeat_interleave(k, 0), rest_mask], 1),
                    position_ids=positions, past_key_values=cache, use_cache=True)
        targets = batch["rest_targets"]
        logp = torch.log_softmax(out.logits.float(), -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
        scores = scores + (logp * (targets != -100)).sum(1).view(rows, k)
    if length_normalize:
        scores = scores / batch["counts"]
    return scores


class AnswerTokensForward:
    """ft.py's training forward for label words (where a ``prefix.TrainingPrefix`` stands for a head run; no
    prompt prefix is shared: ``tokens`` 0): the model's own causal-LM loss, with the vocabulary projection
    computed only at the positions that predict a label token.

    The loss is on the gold label's one or two tokens, yet a plain ``model(**batch)`` projects every position of
    every row onto the vocabulary (SmolLM2: 49,152 x 576, a quarter of the model's own multiply-adds per token)
    and upcasts all those logits to float32 for the loss. Here ``logits_to_keep`` is the boolean mask of the
    positions whose next token is labelled (transformers' ``slice_logits_to_keep``) and ``shift_labels`` their
    targets, in the same order, so the model's own loss function sees only those rows: the same loss and
    gradients (tests/test_label_words.py), ~1.5x faster per step on the embedded model (MRPC, one core:
    2.2-2.3 s against 3.2-3.7 s; docs/benchmarks.md). A model whose forward takes no ``logits_to_keep``
    (remote code) gets the plain call."""
    tokens = 0

    def __init__(self, reason: str):
        self.reason = reason

    def forward(self, autocast=None):
        """``forward(model, batch)`` for ft.py's loop (``autocast`` unused: accelerate's is on the model's forward)."""
        from accelerate.utils import extract_model_from_parallel
        keeps: dict = {}

        def answer_tokens_only(model, batch):
            if id(model) not in keeps:
                keeps[id(model)] = _keeps_last_logits_only(extract_model_from_parallel(model))
            if not keeps[id(model)]:
                return model(**batch)
            labels = batch["labels"]
            shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            keep = shift != -100
            target = shift[keep]
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                         labels=target, shift_labels=target)
        return answer_tokens_only


def scoring_call(model, split: LabelWordSplit, accelerator):
    """``(forward, collate)`` for latency.py: ``collate(rows)`` batches rows as ``predict`` does, ``forward(**batch)``
    scores every label of them (what a served label-word classifier does per request)."""
    view = _ScoringView(split)

    def forward(**batch):
        with accelerator.autocast():
            return score_batch(model, {k: v.to(accelerator.device) for k, v in batch.items()}, split.length_normalize)
    return forward, view.collate


@torch.inference_mode()
def predict(model, split: LabelWordSplit, batch_size: int, accelerator, fast: bool = False,
            prepared: Optional[tuple] = None, stream_dtype: str = "float32") -> tuple[np.ndarray, dict]:
    """``evaluation.predict`` for label words: (examples, labels) scores in dataset order, and throughput figures.

    The same Accelerate pattern (``eval_loader``: rows longest first, ``gather_for_metrics``). ``fast``: through
    fast_eval's inference copy (4-bit weights de-quantized once, float32 LoRA merged), as the generative
    objectives evaluate; ``prepared``: such a copy built earlier (predict.py's chunks), reused.
    """
    from .evaluation import eval_loader, in_dataset_order
    from .preflight import zero_stage

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    runner, prefix, info = model, None, {}
    if fast:  # the head's fast path: the inference copy and the prompts' shared prefix, decided in one place
        from .fast_eval import prepare
        fast_runner = prepare(model, split.prompt_ids, accelerator.device, zero3=zero_stage(accelerator) == 3,
                              autocast=accelerator.autocast, prepared=prepared, stream_dtype=stream_dtype)
        runner, prefix, info = fast_runner.model, fast_runner.prefix_cache, fast_runner.info
        runner.eval()
    view = _ScoringView(split, skip=prefix[0][0].shape[-2] if prefix else 0)
    order, loader = eval_loader(view, batch_size, accelerator)
    parts = []
    for batch in loader:
        with accelerator.autocast():
            scores = score_batch(runner, batch, split.length_normalize, prefix)
        parts.append(accelerator.gather_for_metrics(scores).cpu())
    del runner, prefix
    return in_dataset_order(parts, order, view.lengths, batch_size, start, info if fast else None,
                            model if was_training else None)
