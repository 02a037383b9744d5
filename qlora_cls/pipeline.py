"""The steps that ft.py and eval.py share: data in, model built, the same way in both.

Building the evaluation model exactly like the training model (same quantization, same fp32 casts,
same head) is what makes ``eval.py`` reproduce ``ft.py``'s final metrics to the last digit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from .data import TokenizedSplit, DataSource, TaskData, load_task_data, tokenize, warn_if_pad_in_inputs
from .errors import UsageError
from .hub import check_model_source
from .modeling import load_base_model, load_tokenizer, resolve_model_dir
from .prompts import Template

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    task: TaskData
    batchers: dict[str, TokenizedSplit]  # split -> tokenized examples
    pad_in_inputs: bool
    template: Template  # bound to this data: what every example was rendered with (prompt.txt)
    words: Optional[list[str]] = None  # --classifier label_words: each label's words (None: a head)


def check_model_paths(model_dir: Optional[str], tokenizer_dir: Optional[str]) -> None:
    """Before anything heavy: folders exist, hub ids are reachable (or cached)."""
    if model_dir is not None:
        check_model_source(model_dir, "--model_dir")
    if tokenizer_dir is not None and tokenizer_dir != model_dir:
        check_model_source(tokenizer_dir, "--tokenizer_dir")


def select(ds, n: Optional[int]):
    return ds if n is None else ds.select(range(min(n, len(ds))))


def prepare_data(source: DataSource, template: Template, tokenizer, splits: Sequence[str], max_length: int,
                 max_samples: dict[str, Optional[int]], accelerator, label_words=None) -> PreparedData:
    """Load and check the splits; tokenize each once (main process first, so the others hit the cache).
    ``label_words``: a ``label_words.LabelWords`` (``--classifier label_words``): the splits are
    ``LabelWordSplit``s, each label's words after the prompt; None: a head's ``TokenizedSplit``s."""
    with accelerator.main_process_first():
        task = load_task_data(source, list(splits))
        words = None if label_words is None else label_words.resolve(task.label_names, template)
        template = template.bind(task.spec.text_columns, task.label_names)
        # A --max_length that leaves no room for the inputs trains on the prompt alone: every example the same.
        fixed = len(tokenizer(template.render({f: "" for f in template.fields}))["input_ids"])
        if max_length <= fixed:
            raise UsageError(f"--max_length {max_length} leaves no room for the inputs: the prompt {template.name!r} "
                             f"alone is {fixed} tokens; use a --max_length well above {fixed}")
        for ds in task.splits.values():
            template.check_columns(ds.column_names)
        batchers = {}
        pad_hit = False
        for split in splits:
            ds = select(task.splits[split], max_samples.get(split))
            if words is not None:
                from .label_words import tokenize_split
                batchers[split] = tokenize_split(ds, template, tokenizer, source.label_column, max_length, words,
                                                 label_words.length_normalize)
                continue
            tok = tokenize(ds, template, tokenizer, source.label_column, max_length, task.spec.is_regression)
            pad_hit |= accelerator.is_main_process and warn_if_pad_in_inputs(tok, tokenizer.pad_token_id)
            cut = sum(n >= max_length for n in tok["length"])
            if cut and accelerator.is_main_process:
                log.warning("%d of %d %s examples (%.1f%%) reached --max_length %d and were cut there", cut, len(tok),
                            split, 100 * cut / len(tok), max_length)
            batchers[split] = TokenizedSplit(tok, tokenizer, task.spec.is_regression)
    return PreparedData(task, batchers, pad_hit, template, words)


def device_map_for(accelerator, zero3: bool = False):
    """Each process holds its own full (quantized) copy on its own device; ZeRO-3 places weights itself."""
    if zero3:
        return None
    return {"": str(accelerator.device)}


def build_model(cfg, model_path: str, tokenizer, num_labels: Optional[int], accelerator,
                adapter_dir: Optional[str] = None, base_only: bool = False, zero3: bool = False, head=None,
                new_tokens=()):
    """Base model (+ what ``cfg.method`` trains, fresh when training, saved when evaluating; methods.py).
    ``num_labels`` None: the causal LM (generative objectives); ``new_tokens``: tokens its chat template added."""
    from .methods import add_trainable, load_saved
    model = load_base_model(cfg, model_path, num_labels, tokenizer.pad_token_id, device_map_for(accelerator, zero3),
                            head, vocab_size=len(tokenizer) if new_tokens else None)
    if base_only:
        return model
    if adapter_dir is not None:
        return load_saved(model, adapter_dir)
    return add_trainable(model, cfg, new_token_ids=tokenizer.convert_tokens_to_ids(list(new_tokens)))


def resolve_paths(cfg) -> tuple[str, str]:
    model_path = resolve_model_dir(cfg.model_dir)
    tokenizer_path = model_path if cfg.tokenizer_dir in (None, cfg.model_dir) else cfg.tokenizer_dir
    return model_path, tokenizer_path


def tokenizer_for(cfg) -> tuple[str, object]:
    model_path, tokenizer_path = resolve_paths(cfg)
    try:
        tokenizer = load_tokenizer(tokenizer_path, cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load a tokenizer from {tokenizer_path}: {' '.join(str(exc).split())}")
    return model_path, tokenizer
