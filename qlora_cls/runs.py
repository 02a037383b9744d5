"""A results folder as a model that predicts: a run folder (ft.py) or a merged folder (merge.py).

``open_source`` reads a folder without loading any weights (so every bad path or flag is one line
before anything heavy) and says what it holds: the run's template, label names, text columns and
``max_length``. ``load_models`` then builds the model:

- a **run folder** exactly as ft.py built it (``pipeline.build_model``: the same 4-bit base, fp32 casts,
  head and CPU repack guard), with the saved adapter on top, so predictions equal the run's own;
- **several run folders trained on the same base** (same model, quantization, compute dtype, head): the
  base is loaded once and each further adapter is added with PEFT's ``load_adapter`` under its own name;
  ``Loaded.use(i)`` switches to run ``i`` with ``set_adapter``, which switches the LoRA layers *and* the
  head (a ``modules_to_save`` copy per adapter), and records the seconds each switch took;
- a **merged folder** (``qlora_cls.json`` with format ``qlora-cls-merged/1``: a plain
  ``AutoModelForSequenceClassification`` checkpoint with its tokenizer and ``prompt.txt``) with plain
  transformers, no bitsandbytes and no PEFT, in float32 unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .config import DTYPES, TrainConfig, role_fields
from .errors import UsageError
from .files import read_json
from .prompts import Template, parse_template
from .tasks import GLUE_TASKS, TaskSpec, custom_task

log = logging.getLogger(__name__)

MERGED_FORMAT = "qlora-cls-merged/1"
MERGED_FILE = "qlora_cls.json"
DEFAULT_DATASET = "nyu-mll/glue"
SHARED_BASE_FIELDS = role_fields("base")  # what two runs must agree on to share one loaded base model


@dataclass
class Source:
    """One results folder, read without loading weights."""
    path: Path
    kind: str  # "run" | "merged"
    records: dict  # run: config.json; merged: qlora_cls.json
    template: Optional[Template]  # the run's own template, as prompt.txt records it (None: a generative run)
    label_names: Optional[list[str]]  # None for regression
    text_columns: list[str]
    max_length: int
    task: str
    cfg: Optional[TrainConfig] = None  # a run's settings (with --model_dir/--dataset overrides applied)
    adapter_dir: Optional[Path] = None  # a run's adapter folder (None: merged, or the base only)
    summary: Optional[dict] = None  # a run's metrics.json (None: unfinished run, or merged)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def resolved(self) -> dict:
        return self.records.get("resolved", {}) if self.kind == "run" else {}

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def spec(self) -> TaskSpec:
        """The task as the run saw it: GLUE's spec (its metrics, splits) or a local-file task."""
        if self.task in GLUE_TASKS:
            return dataclasses.replace(GLUE_TASKS[self.task], text_columns=tuple(self.text_columns))
        return custom_task(self.text_columns, self.num_labels)

    @property
    def columns(self) -> list[str]:
        """Every input column a row needs: the text columns and any other field of the template."""
        return list(dict.fromkeys(list(self.text_columns) + list(self.template.fields)))

    @property
    def scoring(self):
        """``label_words.LabelWords`` for a label-words run or merged folder; None for a head."""
        from .label_words import LabelWords
        if self.kind == "run":
            return LabelWords.of(self.cfg)
        if self.records.get("classifier") != "label_words":
            return None
        return LabelWords(tuple(self.records.get("label_words") or ()) or None,
                          bool(self.records.get("length_normalize")))

    @property
    def default_batch_size(self) -> int:
        return self.cfg.eval_batch_size if self.cfg is not None else 32

    def base_key(self) -> dict:
        """The settings that decide which base model gets loaded (merged folders are their own base)."""
        if self.kind == "merged":
            return {"merged folder": str(self.path.resolve())}
        config = self.records.get("config", {})
        key = {name: config.get(name) for name in SHARED_BASE_FIELDS}
        model = self.cfg.model_dir  # after a --model_dir override
        # the same folder written two ways (relative, absolute) is the same base; a hub id stays as it is
        key["model_dir"] = ("the embedded model" if model is None
                            else str(Path(model).resolve()) if Path(model).exists() else model)
        key["method"] = config.get("method") or ("qlora" if config.get("load_in_4bit") else "lora")
        key["num_labels"] = self.num_labels
        key["head_modules"] = self.resolved.get("head_modules")
        key["mixed_precision"] = self.resolved.get("mixed_precision")
        return key


def _run_template(path: Path, name: str) -> Template:
    prompt = path / "prompt.txt"
    if not prompt.is_file():
        raise UsageError(f"{path} has no prompt.txt, so the template the model was trained with is unknown")
    return parse_template(name, prompt.read_text(encoding="utf-8").rstrip("\r\n"))


def is_merged(path: Path) -> bool:
    return (path / MERGED_FILE).is_file()


def check_folder(path: Path, flag: str) -> None:
    if path.is_file():
        raise UsageError(f"{flag} {path} is a file; give a folder")
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: no such folder")


def open_source(path: str | Path, adapter: str = "adapter", base_only: Optional[bool] = None,
                model_dir: Optional[str] = None, dataset: Optional[str] = None, generative: bool = False) -> Source:
    """A run folder or a merged folder; every problem is one line, before any weights are read.
    ``base_only`` None: the caller has no --base_only flag (predict.py), so no hint offers it.
    ``generative``: the caller handles ``--objective sft|lm`` runs (no template: ``Source.template`` is None)."""
    path = Path(path)
    check_folder(path, "--results_path")
    if is_merged(path):
        return _open_merged(path, adapter, base_only)
    if not (path / "config.json").is_file():
        raise UsageError(f"--results_path {path} has no config.json (and no {MERGED_FILE}); is it a run folder "
                         f"written by ft.py or a merged folder written by merge.py?")
    return _open_run(path, adapter, base_only, model_dir, dataset, generative)


def load_run_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    """A run's TrainConfig (fields this version does not know are dropped) and its config.json."""
    run_dir = Path(run_dir)
    check_folder(run_dir, "--results_path")
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--results_path {run_dir} has no config.json; is it a run folder written by ft.py?")
    records = read_json(run_dir / "config.json")
    if "config" not in records and "model_type" in records:
        raise UsageError(f"--results_path {run_dir} holds a transformers model but no {MERGED_FILE}, which merge.py "
                         f"writes with the task, labels and prompt; merge the run again with merge.py")
    if "config" not in records:
        raise UsageError(f"{run_dir}/config.json has no 'config' block; is it a run folder written by ft.py?")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in records["config"].items() if k in known}), records


def _open_run(path: Path, adapter: str, base_only: bool, model_dir: Optional[str],
              dataset: Optional[str], generative: bool = False) -> Source:
    cfg, records = load_run_config(path)
    if cfg.objective != "classification" and not generative:
        raise UsageError(f"{path} is an --objective {cfg.objective} run (a causal LM, no labels); this command reads "
                         f"classification runs (eval.py and merge.py take generative runs)")
    resolved = records.get("resolved", {})
    overrides = {"dataset": dataset, "model_dir": model_dir}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if model_dir is not None:
        cfg.tokenizer_dir = model_dir
    if cfg.label_names is None and resolved.get("num_labels") != 1:  # the data are checked against them
        cfg.label_names = resolved.get("label_names")
    adapter_dir = path / adapter
    summary = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None
    from .methods import has_saved_weights
    if not base_only and not has_saved_weights(adapter_dir):
        if summary is not None and adapter == "adapter_best" and not summary.get("has_adapter_best"):
            raise UsageError(f"{path} has no adapter_best/: its best epoch ({summary.get('best_epoch')}) was the "
                             f"final one, so adapter/ holds it (evaluate with --adapter adapter)"
                             if summary.get("best_epoch") is not None else
                             f"{path} has no adapter_best/: no epoch was selected (final protocol: trained on "
                             f"the validation split); adapter/ holds the last epoch")
        raise UsageError(f"{adapter_dir} has no trained weights (adapter_config.json, or weights.safetensors with "
                         f"qlora_cls_method.json)" + (
                             "; the run did not finish (no metrics.json): resume it by running its ft.py command "
                             "again with --resume" if summary is None else "; the run folder is incomplete") + (
                             "; or evaluate the un-tuned base model with --base_only" if base_only is not None else ""))
    if summary is None and not base_only:
        log.warning("%s has no metrics.json: the run did not finish; using the weights in %s (saved at the end of "
                    "an epoch or by the best-epoch selection), not a final model", path, adapter_dir)
    text_columns = resolved.get("text_columns") or list(cfg.text_columns or GLUE_TASKS[cfg.task].text_columns)
    label_names = resolved.get("label_names")
    if "num_labels" in resolved and label_names is None and resolved["num_labels"] != 1:
        label_names = [str(i) for i in range(resolved["num_labels"])]
    return Source(path=path, kind="run", records=records,
                  template=None if cfg.objective != "classification" else
                  _run_template(path, resolved.get("prompt_name", "run")), label_names=label_names, text_columns=list(text_columns), max_length=cfg.max_length,
                  task=resolved.get("task") or cfg.task, cfg=cfg,
                  adapter_dir=None if base_only else adapter_dir, summary=summary)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")


def _open_merged(path: Path, adapter: str, base_only: Optional[bool]) -> Source:
    info = read_json(path / MERGED_FILE)
    if info.get("objective") not in (None, "classification"):
        raise UsageError(f"{path} is a merged {info['objective']} model (AutoModelForCausalLM, no labels): load it with "
                         f"plain transformers; eval.py scores its source run ({info.get('source_run')})")
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    missing = [what for what, ok in (
        ("config.json with a model_type", "model_type" in config),
        ("weights (model.safetensors)", any((path / f).is_file() for f in (
            "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))),
        ("tokenizer files (tokenizer_config.json and tokenizer.json or a vocabulary)",
         (path / "tokenizer_config.json").is_file() and any((path / f).is_file() for f in TOKENIZER_FILES)),
        ("prompt.txt", (path / "prompt.txt").is_file())) if not ok]
    if missing:
        raise UsageError(f"{path} is a merged folder ({MERGED_FILE}) that lacks {'; '.join(missing)}; merge.py "
                         f"writes them all: merge the source run again into a new --output_dir")
    if info.get("format") != MERGED_FORMAT:
        raise UsageError(f"{path / MERGED_FILE} has format {info.get('format')!r}; this version reads "
                         f"{MERGED_FORMAT!r} (folders written by merge.py)")
    if base_only or adapter != "adapter":
        raise UsageError(f"{path} is a merged folder: one set of weights, no adapter to choose and no base "
                         f"model apart from it (--base_only/--adapter apply to run folders)")
    missing = [k for k in ("label_names", "text_columns", "max_length", "task") if k not in info]
    if missing:
        raise UsageError(f"{path / MERGED_FILE} lacks {', '.join(missing)}; rewrite it with merge.py")
    names = info["label_names"]
    label_names = None if not names or info.get("num_labels") == 1 else list(names)
    return Source(path=path, kind="merged", records=info,
                  template=_run_template(path, info.get("prompt_name") or "run"),
                  label_names=label_names, text_columns=list(info["text_columns"]),
                  max_length=int(info["max_length"]), task=info["task"])


def merged_eval_config(source: Source, dataset: Optional[str]) -> TrainConfig:
    """The settings eval.py needs to load a merged folder's task data: a GLUE task from ``--dataset``
    (default: the hub's GLUE). A merged local-file task does not know its files."""
    if source.task not in GLUE_TASKS:
        raise UsageError(f"{source.path} was trained on local files (task {source.task!r}), which a merged folder "
                         f"does not record; score it with predict.py on your file, or eval.py on the source run "
                         f"({source.records.get('source_run')})")
    glue_columns = list(GLUE_TASKS[source.task].text_columns)
    scoring = source.scoring
    return TrainConfig(model_dir=str(source.path), dataset=dataset or DEFAULT_DATASET, task=source.task,
                       text_columns=None if source.text_columns == glue_columns else list(source.text_columns),
                       max_length=source.max_length, load_in_4bit=False, label_names=source.label_names,
                       bnb_4bit_compute_dtype="float32", gradient_checkpointing=False,
                       classifier="head" if scoring is None else "label_words",
                       label_words=None if scoring is None else list(scoring.words or ()) or None,
                       length_normalize=bool(scoring and scoring.length_normalize))


def check_same_base(sources: Sequence[Source]) -> None:
    """Several folders share one loaded base only if they were trained on the same one, the same way."""
    if len(sources) < 2:
        return
    merged = [s for s in sources if s.kind == "merged"]
    if merged:
        raise UsageError(f"{merged[0].path} is a merged folder: several --results_path must be run folders "
                         f"(adapters) trained on one base; evaluate merged folders one at a time")
    own = [s for s in sources if s.base_key().get("method") in ("adapter", "full")]
    if own:
        raise UsageError(f"{own[0].path} was trained with --method {own[0].base_key()['method']}: its weights are "
                         f"not a PEFT adapter, so it cannot share a loaded base with other runs; evaluate it alone")
    first = sources[0].base_key()
    for s in sources[1:]:
        key = s.base_key()
        diff = [k for k in first if key.get(k) != first.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {first.get(k)} vs {key.get(k)}" for k in diff)
            raise UsageError(f"--results_path {sources[0].path} and {s.path} were not trained on the same base "
                             f"({shown}); several runs share one loaded model only when these agree")


@dataclass
class Loaded:
    """The model of one or several sources; ``use(i)`` makes source ``i``'s adapter (and head) active."""
    model: object
    adapter_names: list[Optional[str]]
    load_seconds: list[float]  # [0]: base + first adapter (or the merged model); then one per added adapter
    switch_seconds: list[float] = field(default_factory=list)
    active: int = 0

    def use(self, i: int) -> None:
        if i == self.active:
            return
        start = time.perf_counter()
        self.model.set_adapter(self.adapter_names[i])
        self.switch_seconds.append(time.perf_counter() - start)
        self.active = i

    def timing_line(self) -> Optional[str]:
        if len(self.adapter_names) < 2:
            return None
        added = self.load_seconds[1:]
        switches = self.switch_seconds
        return (f"{len(self.adapter_names)} adapters on one base: base + first adapter loaded in "
                f"{self.load_seconds[0]:.2f} s, each further adapter in {sum(added) / len(added):.3f} s (load_adapter); "
                f"{len(switches)} switches (set_adapter), {1e3 * sum(switches) / max(len(switches), 1):.3f} ms each "
                f"on average")


def tokenizer_of(source: Source):
    """The tokenizer the source was trained with (pad token set, right padding)."""
    from .modeling import load_tokenizer
    from .pipeline import tokenizer_for
    if source.kind == "merged":
        try:
            return str(source.path), load_tokenizer(str(source.path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"could not load a tokenizer from {source.path}: {' '.join(str(exc).split())}")
    return tokenizer_for(source.cfg)


def check_model_sources(sources: Sequence[Source]) -> None:
    from .pipeline import check_model_paths
    for s in sources:
        if s.kind == "run":
            check_model_paths(s.cfg.model_dir, s.cfg.tokenizer_dir)


def load_models(sources: Sequence[Source], model_path: str, tokenizer, accelerator,
                dtype: Optional[str] = None) -> Loaded:
    """One model for ``sources`` (checked by ``check_same_base``); source 0 is active."""
    from accelerate.utils import set_seed

    start = time.perf_counter()
    first = sources[0]
    if first.kind == "merged":
        return Loaded(_load_merged(first, tokenizer, accelerator, dtype or "float32"), [None],
                      [time.perf_counter() - start])
    if dtype is not None:
        raise UsageError("--dtype applies to merged folders; a run is rebuilt in the dtypes it was trained with")
    from .pipeline import build_model
    set_seed(first.cfg.seed)  # --base_only gets the same fresh head as eval.py always gave it
    num_labels = None if first.cfg.causal_lm else first.num_labels  # label words: the causal LM, no head
    model = build_model(first.cfg, model_path, tokenizer, num_labels, accelerator,
                        adapter_dir=None if first.adapter_dir is None else str(first.adapter_dir),
                        base_only=first.adapter_dir is None)
    names: list[Optional[str]] = [None if first.adapter_dir is None else "default"]  # PeftModel's first adapter
    seconds = [time.perf_counter() - start]
    for i, s in enumerate(sources[1:], 1):
        start = time.perf_counter()
        name = f"run{i}"  # adapter names are module keys: no dots, so not the folder names
        model.load_adapter(str(s.adapter_dir), adapter_name=name, is_trainable=False)
        names.append(name)
        seconds.append(time.perf_counter() - start)
    return Loaded(model, names, seconds)


def _load_merged(source: Source, tokenizer, accelerator, dtype: str):
    """Plain transformers: the merged weights are ordinary (de-quantized or 16-bit) tensors. A label-words
    folder is a causal LM (AutoModelForCausalLM), scored by its labels' words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if source.scoring is not None:
        return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=getattr(torch, dtype)).to(
            accelerator.device).eval()
    model = AutoModelForSequenceClassification.from_pretrained(str(source.path), dtype=getattr(torch, dtype))
    if model.config.num_labels != source.num_labels:
        raise UsageError(f"{source.path}: config.json has {model.config.num_labels} labels but {MERGED_FILE} "
                         f"{source.num_labels}; the folder is inconsistent")
    if model.config.pad_token_id is None:  # the head finds each example's last real token with it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(accelerator.device).eval()
