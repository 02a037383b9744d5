"""Loading a classification data set, checking it, rendering the prompt and tokenizing once.

Works for GLUE tasks from the hub or a local folder in hub layout (``--dataset``, ``--task``) and for
local CSV/JSON files (``--train_file`` ... with ``--text_columns``). Every check runs before any model
is loaded, and every failure is one line that lists what was found.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import UsageError
from .hub import check_dataset_source
from .inputs import parse_json_line
from .prompts import Template
from .tasks import GLUE_TASKS, TaskSpec, custom_task

log = logging.getLogger(__name__)

HIDDEN_LABEL = -1  # GLUE test splits ship label -1: predictions are possible, scores are not


@dataclass(frozen=True)
class DataSource:
    """Where the examples come from; saved in config.json so eval.py can find them again."""
    dataset: str
    task: str
    files: dict[str, str]  # split -> local file, when the data are CSV/JSON files
    text_columns: Optional[tuple[str, ...]]
    label_column: str
    label_names: Optional[tuple[str, ...]]

    @classmethod
    def from_config(cls, cfg) -> "DataSource":
        files = {s: f for s, f in (("train", cfg.train_file), ("validation", cfg.validation_file),
                                   ("test", cfg.test_file)) if f}
        return cls(cfg.dataset, cfg.task, files, tuple(cfg.text_columns) if cfg.text_columns else None,
                   cfg.label_column, tuple(cfg.label_names) if cfg.label_names else None)


@dataclass
class TaskData:
    spec: TaskSpec
    label_names: Optional[list[str]]  # None for regression
    splits: dict  # split name -> datasets.Dataset (raw columns)


def _load(source: DataSource):
    import datasets
    if source.files:
        for split, f in source.files.items():
            if not Path(f).is_file():
                raise UsageError(f"--{split}_file {f}: no such file")
        suffixes = {Path(f).suffix.lower() for f in source.files.values()}
        builder = "csv" if suffixes <= {".csv"} else "json" if suffixes <= {".json", ".jsonl"} else None
        if builder is None:
            raise UsageError(f"data files must all be .csv or all .json/.jsonl, got {', '.join(sorted(suffixes))}")
        _check_data_files(source.files, builder)
        quiet = logging.getLogger("datasets.packaged_modules.json.json")  # its "row 1" errors precede ours
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            return datasets.load_dataset(builder, data_files=dict(source.files))
        except Exception as exc:  # a malformed file: name the file and the first cause that says something
            for split, f in source.files.items():
                if builder == "json":
                    _check_json_lines(split, f)
            try:  # each file alone: a label column of numbers in one file and of names in another
                alone = {s: datasets.load_dataset(builder, data_files={s: f})[s] for s, f in source.files.items()}
            except Exception:
                alone = None
            if alone:
                _label_values(alone, source, "train" if "train" in alone else next(iter(alone)))
            cause, seen = exc, []
            while cause is not None and cause not in seen:
                seen.append(cause)
                cause = cause.__cause__ or cause.__context__
            detail = next((str(c).splitlines()[0] for c in reversed(seen) if str(c).strip()), type(exc).__name__)
            raise UsageError(f"could not read data files {', '.join(source.files.values())}: {detail}")
        finally:
            quiet.setLevel(level)
    check_dataset_source(source.dataset)
    try:
        return datasets.load_dataset(source.dataset, source.task)
    except ValueError as exc:
        raise UsageError(f"--dataset {source.dataset} has no config {source.task!r}: "
                         f"{str(exc).splitlines()[0]}")
    except Exception as exc:
        raise UsageError(f"could not load --dataset {source.dataset} --task {source.task}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _check_data_files(files: dict[str, str], builder: str) -> None:
    """What the datasets library reports only as "An error occurred while generating the dataset":
    an empty file, a CSV with a header and no rows, CSV files whose columns differ."""
    import csv
    headers = {}
    for split, f in files.items():
        if Path(f).stat().st_size == 0:
            raise UsageError(f"--{split}_file {f} is empty (0 bytes); it needs a header line and rows")
        if builder != "csv":
            continue
        with open(f, newline="", encoding="utf-8", errors="replace") as fh:
            rows = csv.reader(fh)
            headers[split] = next(rows, [])
            if next(rows, None) is None:
                raise UsageError(f"--{split}_file {f} has a header ({', '.join(headers[split])}) but no rows")
    first = next(iter(headers), None)
    for split, header in headers.items():
        if header != headers[first]:
            raise UsageError(f"--{split}_file {files[split]} has columns {', '.join(header)} but --{first}_file "
                             f"{files[first]} has {', '.join(headers[first])}; every file needs the same columns")


def _check_json_lines(split: str, f: str) -> None:
    import json
    with open(f, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    try:
        json.loads(text)  # one JSON document (a list of rows) is valid as a whole
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        problem = parse_json_line(line)[1] if line.strip() else None
        if problem:
            raise UsageError(f"--{split}_file {f} line {number} {problem}")


def load_task_data(source: DataSource, splits: Sequence[str]) -> TaskData:
    """Load ``splits``, check their columns and labels, and describe the task."""
    raw = _load(source)
    missing = [s for s in splits if s not in raw]
    if missing:
        raise UsageError(f"split(s) {', '.join(missing)} not found; the data have: {', '.join(raw)}")
    raw, string_names = _string_labels_to_ids(raw, source, splits[0])
    if source.files:
        text_columns = list(source.text_columns or ())
        label_names = (string_names or (list(source.label_names) if source.label_names else None)
                       or _infer_label_names(raw[splits[0]], source.label_column))
        spec = custom_task(text_columns, 1 if label_names is None or len(label_names) == 1 else len(label_names))
        if spec.is_regression:
            label_names = None
    else:
        spec = GLUE_TASKS[source.task]
        if source.text_columns:
            spec = TaskSpec(spec.name, tuple(source.text_columns), spec.num_labels, spec.metrics,
                            spec.validation_split, spec.test_split)
        names = {s: list(getattr(raw[s].features.get(source.label_column), "names", None) or []) for s in splits}
        if len({tuple(n) for n in names.values()}) > 1:
            raise UsageError("the splits' label names differ: " + "; ".join(
                f"{_where(source, s)} has {', '.join(n) or 'plain numbers'}" for s, n in names.items())
                + "; every split needs the same labels in the same order")
        label_names = string_names or names[splits[0]] or None
        if label_names and source.label_names and label_names != list(source.label_names):
            raise UsageError(f"--dataset {source.dataset} --task {source.task} has labels {', '.join(label_names)}, "
                             f"not {', '.join(source.label_names)} (--label_names, or the labels the run was "
                             f"trained with); give data with the same labels in the same order")
        if not spec.is_regression and label_names and len(label_names) != spec.num_labels:
            raise UsageError(f"--task {source.task} has {spec.num_labels} labels but --dataset {source.dataset} has "
                             f"{len(label_names)}: {', '.join(label_names)}; give the {source.task} data")
        if not spec.is_regression and label_names is None:
            label_names = [str(i) for i in range(spec.num_labels)]
    for split in splits:
        _check_split(raw[split], _where(source, split), spec, source.label_column, label_names)
    return TaskData(spec=spec, label_names=label_names, splits={s: raw[s] for s in splits})


def _where(source: DataSource, split: str) -> str:
    return f"split {split!r}" + (f" ({source.files[split]})" if split in source.files else "")


def _label_values(raw, source: DataSource, first: str) -> dict[str, list[str]]:
    """Each split's label values, when any split has names for labels; every split is checked: a value
    outside ``--label_names``, or without them one that ``first`` (the training split) lacks (``neg``/``pos``
    in one file, ``0``/``1`` in another), is refused in one line that names each file and its values."""
    column, given = source.label_column, source.label_names
    kinds = {s: getattr(raw[s].features[column], "dtype", None) in ("string", "large_string") for s in raw
             if column in raw[s].column_names}
    if not any(kinds.values()):
        return {}
    values = {s: sorted({str(v) for v in raw[s][column] if v is not None}) for s in kinds}
    for s, vs in sorted(values.items(), key=lambda item: not kinds[item[0]]):  # names first
        unknown = [v for v in vs if v not in (given or values.get(first, vs))]
        if unknown and given and kinds[s]:
            raise UsageError(f"{_where(source, s)} has label value(s) {', '.join(map(repr, unknown[:5]))} in column "
                             f"{column!r}, not among the label names {' '.join(given)} (--label_names, or "
                             f"the run's); give every class name in label-id order, spelled the same in every file")
        if unknown or (vs and not kinds[s]):  # numbers in this split, names in another
            raise UsageError("the splits' label values disagree: " + "; ".join(
                f"{_where(source, s)} has {', '.join(map(repr, v[:5]))}" for s, v in values.items())
                + "; spell each class the same way in every file, or give --label_names (every class, in label-id "
                  "order)")
    return values


def _string_labels_to_ids(raw, source: DataSource, first: str):
    """A label column of names (``neg``/``pos``, AG News' ``World``...): ids in ``--label_names`` order,
    or in sorted order when no names are given (config.json records the names either way)."""
    values = _label_values(raw, source, first)
    if not values:
        return raw, None
    label_column, given = source.label_column, source.label_names
    names = list(given) if given else sorted({v for vs in values.values() for v in vs})
    index = {name: i for i, name in enumerate(names)}

    def encode(batch):
        return {label_column: [float("nan") if v is None else index[v] for v in batch[label_column]]}

    for split in values:  # a split of numbers here has no values (all missing): nothing to look up
        raw[split] = raw[split].map(encode, batched=True, desc="label names to ids")
    return raw, names


def _infer_label_names(ds, label_column: str) -> Optional[list[str]]:
    if label_column not in ds.column_names:
        return None  # reported by _check_split with the columns found
    values = np.asarray(ds[label_column], dtype=np.float64)
    values = values[values != HIDDEN_LABEL]
    if len(values) and np.all(values == np.round(values)):
        return [str(i) for i in range(int(values.max()) + 1)]
    return None  # real-valued labels: regression


def _check_split(ds, where: str, spec: TaskSpec, label_column: str, label_names) -> None:
    columns = ds.column_names
    needed = list(spec.text_columns) + [label_column]
    absent = [c for c in needed if c not in columns]
    if absent:
        raise UsageError(f"{where} lacks column(s) {', '.join(absent)}; found: {', '.join(columns)}")
    if len(ds) == 0:
        raise UsageError(f"{where} is empty")
    for column in spec.text_columns:
        # An empty CSV cell arrives as None (NaN) and would be rendered as the text "None".
        empty = [i for i, v in enumerate(ds[column]) if v is None or not str(v).strip() or v != v]
        if empty:
            raise UsageError(f"{where}: column {column!r} is empty in {len(empty)} row(s), first data row(s) "
                             f"{', '.join(str(i + 1) for i in empty[:5])} (1-based, header not counted); "
                             f"fill or remove them")
    labels = np.asarray(ds[label_column], dtype=np.float64)
    if np.isnan(labels).any():
        raise UsageError(f"{where} has missing labels in column {label_column!r}")
    if not spec.is_regression:
        visible = labels[labels != HIDDEN_LABEL]
        bad = visible[(visible < 0) | (visible >= len(label_names)) | (visible != np.round(visible))]
        if len(bad):
            raise UsageError(f"{where} has label {bad[0]:g} outside the label set 0..{len(label_names) - 1} "
                             f"({', '.join(label_names)})")


def check_trainable(ds, split: str, label_column: str) -> None:
    """Hidden test labels (-1) cannot be trained on."""
    if (np.asarray(ds[label_column]) == HIDDEN_LABEL).any():
        raise UsageError(f"split {split!r} has hidden labels (-1) and cannot be trained on")


def encode_prompts(tokenizer, template: Template, rows: Sequence[dict], max_length: int) -> list[list[int]]:
    """Each row's rendered prompt as token ids, cut at ``max_length``: what training, eval.py and predict.py
    all feed the model (predict.py calls it on rows it reads itself)."""
    return tokenizer([template.render(r) for r in rows], truncation=True, max_length=max_length)["input_ids"]


def tokenize(ds, template: Template, tokenizer, label_column: str, max_length: int, is_regression: bool):
    """Render the template and tokenize once; the result keeps only what batches need."""
    template.check_columns(ds.column_names)
    has_idx = "idx" in ds.column_names

    def encode(batch, indices):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        input_ids = encode_prompts(tokenizer, template, rows, max_length)
        return {
            "input_ids": input_ids,
            "labels": [float(x) if is_regression else int(x) for x in batch[label_column]],
            "row": indices,
            "idx": batch["idx"] if has_idx else indices,
            "length": [len(x) for x in input_ids],
        }

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc=f"tokenizing with prompt {template.name!r}")


def warn_if_pad_in_inputs(ds, pad_id: int) -> bool:
    """The head pools the last non-pad token: a pad id inside real inputs can make it pool the wrong one."""
    flat = np.concatenate([np.asarray(x) for x in ds["input_ids"]]) if len(ds) else np.array([])
    hits = int((flat == pad_id).sum())
    if hits:
        log.warning("the pad token id %d occurs %d times inside real inputs; the classification head pools the "
                    "last non-pad token and may pool the wrong position. Use a tokenizer with a dedicated pad token.",
                    pad_id, hits)
    return hits > 0


class Rows(torch.utils.data.Dataset):
    """Tokenized rows held in memory (``input_ids``, ``lengths``, ``labels``, ``collate``) as a map-style dataset;
    ``split(rows)`` collates the given rows directly. Classification (TokenizedSplit) and SFT (sft.SFTSplit)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, r: int) -> dict:
        return {"input_ids": self.input_ids[r], "attention_mask": [1] * self.lengths[r], "labels": self.labels[r]}

    def __call__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        return dict(self.collate([self[r] for r in rows]))


class TokenizedSplit(Rows):
    """A tokenized split in memory, as a map-style ``Dataset`` for a ``DataLoader``, with its collator.

    ``collate`` is transformers' ``DataCollatorWithPadding``: right padding (``load_tokenizer`` sets it) to
    the longest example of the batch, with the tokenizer's pad id, which the model's config also knows,
    so the head finds each example's last real token. ``split(rows)`` collates the given rows directly.
    """

    def __init__(self, ds, tokenizer, is_regression: bool):
        from transformers import DataCollatorWithPadding
        self.input_ids: list[list[int]] = ds["input_ids"]
        self.labels = torch.tensor(ds["labels"], dtype=torch.float32 if is_regression else torch.long)
        self.lengths: list[int] = ds["length"]
        self.idx: list[int] = ds["idx"]
        self.collate = DataCollatorWithPadding(tokenizer)


def concat_batchers(batchers: Sequence["TokenizedSplit"]) -> "TokenizedSplit":
    """Several tokenized splits as one (training on train + validation under the final protocol)."""
    if len(batchers) == 1:
        return batchers[0]
    import copy
    merged = copy.copy(batchers[0])
    merged.input_ids = [x for b in batchers for x in b.input_ids]
    merged.lengths = [x for b in batchers for x in b.lengths]
    merged.idx = [x for b in batchers for x in b.idx]
    merged.labels = torch.cat([b.labels for b in batchers])
    return merged
