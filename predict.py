"""Predict labels for new rows with a trained run (or a merged folder): any CSV or JSON Lines file.

    python predict.py --results_path results/<run> --input new.csv --output preds.csv
    cat new.jsonl | python predict.py --results_path results/<run> --input - > preds.csv     # a pipeline
    python predict.py --results_path results/<run1> results/<run2> --input new.csv --output preds/   # one base

The input needs the run's text columns (any order, other columns ignored, no label); each row is
rendered with the run's prompt and tokenized as in training (same max_length, right padding). The output
has one row per input row, in input order: the id column (``--id_column``; by default ``idx`` or ``id``
when the input has one), ``prediction`` (the label *name*) and ``prob_<name>`` per class, or ``score``
for a regression. The input is checked in full first (a missing or empty text column is one line naming
the row, exit 2, and nothing is written; ``--skip_bad_rows`` gives such rows an empty prediction and counts
them), then read, predicted and written a chunk at a time: memory does not grow with the file. A file
output is written under a temporary name and renamed at the end; an existing one is kept unless
``--overwrite``. Without ``--output`` (or with ``-``) rows go to standard output; logs and the progress
bar go to standard error.

A generative run (ft.py ``--objective sft|lm``) generates instead, one row per input row, in input order:

    python predict.py --results_path results/<sft run> --input prompts.jsonl --output answers.jsonl

sft rows are instruction records in the run's column names (``instruction``, optional ``input``; any
``output`` is ignored) or conversations (``messages``: role/content turns; a final assistant turn is left out
of the prompt, as in training); lm rows have a ``text`` to continue. Each prompt is rendered by the code
training used (the run's chat format, ``sft.render_prompt``) and answered by ``generation.generate``, as ft.py's
evaluation answers: greedy unless ``--do_sample true``, up to ``--max_new_tokens`` (these flags default to the run's
own settings). The output holds the id column, the prompt columns, ``generation`` and ``stopped`` (the answer
ended on the run's end of turn; lm: on the end-of-sequence token): CSV, or JSON Lines when ``--output`` ends in
.jsonl. The same checks first (exit 2, nothing written), the same chunked streaming and atomic output file.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import PredictConfig
from qlora_cls.errors import UsageError

log = logging.getLogger("predict")
ID_COLUMNS = ("idx", "id")  # looked for, in this order, when --id_column is not given
MAX_LISTED = 5  # bad rows named in the --skip_bad_rows summary


@dataclass
class PredictArgs(PredictConfig):
    """PredictConfig and the generation flags of a generative run (none = the run's own setting)."""
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": (
        "--objective sft|lm runs: most tokens generated per row; none = the run's --max_new_tokens")})
    do_sample: Optional[bool] = field(default=None, metadata={"help": (
        "--objective sft|lm runs: sample instead of greedy decoding; none = the run's --do_sample")})
    temperature: Optional[float] = field(default=None, metadata={"help": (
        "--objective sft|lm runs: sampling temperature; none = the run's --temperature")})
    top_p: Optional[float] = field(default=None, metadata={"help": (
        "--objective sft|lm runs: nucleus sampling mass; none = the run's --top_p")})

    def __post_init__(self) -> None:
        super().__post_init__()
        for ok, message in (
                (self.max_new_tokens is None or self.max_new_tokens > 0,
                 f"--max_new_tokens must be > 0, got {self.max_new_tokens}"),
                (self.temperature is None or self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
                (self.top_p is None or 0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")):
            if not ok:
                raise UsageError(message)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    try:
        return predict_file(parse_dataclass(PredictArgs, argv, "predict.py", __doc__))
    except UsageError as exc:
        sys.stderr.write(f"predict.py: error: {exc}\n")
        raise SystemExit(2)
    except BrokenPipeError:  # `predict.py ... | head`: the reader has what it wanted
        sys.stderr.close()
        raise SystemExit(0)


def _outputs(pcfg: PredictConfig, sources) -> list[Optional[Path]]:
    """Where each source's rows go (None = standard output); refused before anything is loaded."""
    to_stdout = pcfg.output in (None, "-")
    if len(sources) > 1:
        if to_stdout:
            raise UsageError("several --results_path write one CSV each: give --output FOLDER "
                             "(one <run folder name>.csv per run)")
        folder = Path(pcfg.output)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--output {folder} is a file; with several --results_path give a folder")
        if not folder.parent.is_dir():
            raise UsageError(f"--output {folder}: the folder {folder.parent} does not exist")
        names = [s.name for s in sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(f"several --results_path are named {', '.join(twice)}: their outputs would collide "
                             f"in {folder}; predict them in separate calls")
        paths = [folder / f"{n}.csv" for n in names]
    else:
        paths = [None if to_stdout else Path(pcfg.output)]
    for p in paths:
        if p is None:
            continue
        if p.is_dir():
            raise UsageError(f"--output {p} is a folder; give a file name such as {p / 'predictions.csv'}")
        if p.exists() and not pcfg.overwrite:
            raise UsageError(f"--output {p} already exists; pass --overwrite to replace it")
        if len(sources) == 1 and not p.parent.is_dir():
            raise UsageError(f"--output {p}: the folder {p.parent} does not exist")
        if pcfg.input != "-" and Path(pcfg.input).resolve() == p.resolve():
            raise UsageError(f"--output {p} is the --input file; write the predictions elsewhere")
    return paths


def _header(source, id_column: Optional[str]) -> list[str]:
    values = ["score"] if source.label_names is None else (
        ["prediction"] + [f"prob_{name}" for name in source.label_names])
    return ([id_column] if id_column else []) + values


def _check_input(inp, columns: Sequence[str], skip: bool) -> tuple[int, list[int], Optional[str]]:
    """Every row checked before any prediction: (rows, bad row numbers, first problem)."""
    if inp.header is not None:
        absent = [c for c in columns if c not in inp.header]
        if absent:
            raise UsageError(f"--input {inp.where} lacks column(s) {', '.join(absent)} that the run's prompt needs; "
                             f"found: {', '.join(inp.header)}")
    from qlora_cls.inputs import row_problem
    return _scan_rows(inp, lambda row: row_problem(row, columns), skip, "prediction", "")


def _scan_rows(inp, problem_of, skip: bool, output: str, empty_hint: str, on_good=None):
    """(rows, bad row numbers, first problem): each row's ``problem_of(row)`` (None = fine; ``on_good(row)`` then);
    a bad row stops here in one line unless ``skip`` (--skip_bad_rows: it gets an empty ``output``)."""
    count, bad, first = 0, [], None
    for row in inp.rows():
        count += 1
        problem = problem_of(row)
        if problem is None:
            if on_good is not None:
                on_good(row)
            continue
        if not skip:
            raise UsageError(f"--input {inp.where}: {inp.unit} {row.number} {problem}; fix or remove it, or pass "
                             f"--skip_bad_rows to give such rows an empty {output}")
        bad.append(row.number)
        first = first or f"{inp.unit} {row.number} {problem}"
    if count == 0:
        raise UsageError(f"--input {inp.where} has no rows{empty_hint}")
    return count, bad, first


def _id_column(pcfg: PredictConfig, inp) -> Optional[str]:
    columns = inp.columns_hint() or []
    if pcfg.id_column is not None:
        if inp.header is not None and pcfg.id_column not in inp.header:
            raise UsageError(f"--id_column {pcfg.id_column}: no such column in {inp.where}; found: {', '.join(columns)}")
        return pcfg.id_column
    return next((c for c in ID_COLUMNS if c in columns), None)


def predict_file(pcfg: PredictConfig) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from qlora_cls.files import atomic_open
    from qlora_cls.inputs import InputFile, row_problem
    from qlora_cls.runs import check_model_sources, check_same_base, load_models, open_source, tokenizer_of

    # -- cheap checks: folders, outputs, the whole input -------------------------------------------------
    sources = [open_source(p, pcfg.adapter, model_dir=pcfg.model_dir, generative=True) for p in pcfg.results_path]
    generative = [s for s in sources if s.template is None]
    if generative:
        if len(sources) > 1:
            raise UsageError(f"{generative[0].path} is an --objective {generative[0].cfg.objective} run: predict with "
                             f"generative runs one at a time (one --results_path)")
        return predict_generative(pcfg, sources[0])
    unused = [f"--{k} {getattr(pcfg, k)}" for k in GENERATION_FLAGS if getattr(pcfg, k, None) is not None]
    if unused:
        raise UsageError(f"{unused[0]} applies to --objective sft|lm runs; {sources[0].path} is a classification run")
    check_same_base(sources)
    out_paths = _outputs(pcfg, sources)
    check_model_sources(sources)
    columns = list(dict.fromkeys(c for s in sources for c in s.columns))
    with InputFile(pcfg.input, pcfg.input_format) as inp, ExitStack() as outputs:
        id_column = _id_column(pcfg, inp)
        total, bad, first_problem = _check_input(inp, columns, pcfg.skip_bad_rows)

        # -- model: the base once, an adapter per run ---------------------------------------------------
        accelerator = Accelerator(mixed_precision=sources[0].resolved.get("mixed_precision"))
        if accelerator.num_processes > 1:
            raise UsageError("predict.py runs in one process; start it with python, not accelerate launch")
        pcfg.resolve_auto(accelerator.device.type)
        for s in sources:
            if s.cfg is not None:
                s.cfg.resolve_auto(accelerator.device.type)
        tokenizers = [tokenizer_of(s) for s in sources]
        if len({t.pad_token_id for _, t in tokenizers}) > 1:
            raise UsageError("the runs' tokenizers pad with different token ids; one loaded base knows one pad id")
        loaded = load_models(sources, tokenizers[0][0], tokenizers[0][1], accelerator, pcfg.dtype)

        # -- stream: read a chunk, predict it with each run (sorted by length), write it in input order ----
        if out_paths[0] is not None and len(sources) > 1:
            out_paths[0].parent.mkdir(exist_ok=True)
        writers = []
        for s, path in zip(sources, out_paths):
            handle = sys.stdout if path is None else outputs.enter_context(atomic_open(path))
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(_header(s, id_column))
            writers.append((writer, handle))
        start = time.perf_counter()
        # The fast path's inference copy (fast_eval.inference_model): built once per run, on its first chunk,
        # and reused by every later chunk (the weights do not change while predicting).
        fast_models: dict = {}
        bar = tqdm(total=total, unit="row", desc="predicting", file=sys.stderr, disable=None)
        for chunk in inp.chunks(pcfg.chunk_size):
            ok = [row_problem(r, columns) is None for r in chunk]
            good = [r.values for r, fine in zip(chunk, ok) if fine]
            idents = [[] if id_column is None else [_cell(r.values, id_column)] for r in chunk]
            for i, (s, (_, tokenizer)) in enumerate(zip(sources, tokenizers)):
                loaded.use(i)
                if pcfg.fast_eval and good and i not in fast_models:
                    from qlora_cls.fast_eval import inference_model
                    fast_models[i] = inference_model(loaded.model, accelerator.device,
                                                     stream_dtype=pcfg.eval_stream_dtype)
                values = iter(_predict_rows(s, good, tokenizer, loaded.model, pcfg.batch_size, accelerator,
                                            fast_models.get(i)))
                blank = [""] * (len(_header(s, None)))
                writer, handle = writers[i]
                writer.writerows(ident + (next(values) if fine else blank) for ident, fine in zip(idents, ok))
                handle.flush()
            bar.update(len(chunk))
        bar.close()
    seconds = time.perf_counter() - start
    from utils import peak_memory_bytes
    summary = {"rows": total, "predicted": total - len(bad), "skipped": len(bad), "skipped_rows": bad[:MAX_LISTED],
               "seconds": seconds, "rows_per_s": (total - len(bad)) / seconds if seconds else None,
               "outputs": [str(p) if p else "-" for p in out_paths],
               "peak_rss_bytes": peak_memory_bytes(accelerator.device),
               "adapters": {"load_seconds": loaded.load_seconds, "switch_seconds_mean":
                            sum(loaded.switch_seconds) / len(loaded.switch_seconds) if loaded.switch_seconds else None,
                            "switches": len(loaded.switch_seconds)}}
    if bad:
        log.warning("skipped %d bad row(s) of %d (empty prediction written): %s%s; first: %s", len(bad), total,
                    ", ".join(map(str, bad[:MAX_LISTED])), ", ..." if len(bad) > MAX_LISTED else "", first_problem)
    line = loaded.timing_line()
    if line:
        log.info(line)
    log.info("predicted %d row(s) in %.1f s (%.1f rows/s), peak memory %.0f MiB; written: %s", summary["predicted"],
             seconds, summary["rows_per_s"] or 0, summary["peak_rss_bytes"] / 2 ** 20,
             ", ".join("standard output" if p == "-" else p for p in summary["outputs"]))
    return summary


def _cell(values: Optional[dict], column: str):
    return "" if values is None or values.get(column) is None else values[column]


def _predict_rows(source, rows: list[dict], tokenizer, model, batch_size: Optional[int], accelerator,
                  fast_model: Optional[tuple] = None) -> list[list]:
    """Output cells after the id for ``rows``, in their order: the label name and each class's probability,
    or the regression score (formatted as the run's predictions_*.csv are). Batches are sorted by length
    inside the chunk (evaluation.predict), and put back in row order. ``fast_model``: the run's inference
    copy (fast_eval.inference_model), or None for the plain path."""
    import numpy as np

    from qlora_cls.data import TokenizedSplit, encode_prompts
    from qlora_cls.evaluation import predict, probabilities
    if not rows:
        return []
    scoring = source.scoring  # --classifier label_words: each label's words scored after the prompt
    if scoring is not None:
        from qlora_cls.label_words import rows_split
        batcher = rows_split(tokenizer, source.template, rows, source.max_length,
                             scoring.resolve(source.label_names), scoring.length_normalize)
    else:
        ids = encode_prompts(tokenizer, source.template, rows, source.max_length)
        batcher = TokenizedSplit({"input_ids": ids, "length": [len(x) for x in ids], "idx": list(range(len(ids))),
                                  "labels": [0] * len(ids)}, tokenizer, False)
    logits, _ = predict(model, batcher, batch_size or source.default_batch_size, accelerator,
                        fast=fast_model is not None, prepared=fast_model)
    probs = probabilities(source.spec, logits)
    if source.label_names is None:
        return [[float(v)] for v in probs[:, 0]]
    names = source.label_names
    return [[names[int(np.argmax(p))]] + [f"{x:.6f}" for x in p] for p in probs]



# -- generative runs (ft.py --objective sft | lm) ---------------------------------------------------------------
GENERATION_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_p")
MESSAGES = "messages"  # a conversation's column (as in ft.py's training records)
LM_TEXT = "text"  # an --objective lm row: the text to continue


class PromptSpec:
    """What a row of a generative run's input holds, and the turns (sft) or text (lm) it becomes.

    sft: an instruction record in the run's column names (``--instruction_column``/``--input_column`` as
    config.json saved them; an input column under its default name ``input`` may be absent, i.e. empty, as in
    training), or a conversation (``messages``: ``role``/``content`` turns; a final assistant turn is the answer
    and is left out of the prompt, as in training). lm: a ``text`` column, continued."""

    def __init__(self, cfg):
        self.objective = cfg.objective
        self.instruction, self.input = cfg.instruction_column, cfg.input_column
        self.input_optional = self.input == "input"

    @property
    def needs(self) -> str:
        if self.objective == "lm":
            return f"the --objective lm run continues the {LM_TEXT} column"
        return (f"the --objective sft run's prompts need instruction records ({self.instruction}, "
                f"{'optionally ' if self.input_optional else ''}{self.input}) or conversations ({MESSAGES})")

    def check_header(self, inp) -> None:
        if inp.header is None:
            return
        if self.objective == "lm":
            absent = [] if LM_TEXT in inp.header else [LM_TEXT]
        elif MESSAGES in inp.header and self.instruction not in inp.header:
            absent = []
        else:
            absent = [c for c in (self.instruction, None if self.input_optional else self.input)
                      if c and c not in inp.header]
        if absent:
            raise UsageError(f"--input {inp.where} lacks column(s) {', '.join(absent)}: {self.needs}; "
                             f"found: {', '.join(inp.header)}")

    def fields(self, values: dict) -> list[str]:
        """The prompt columns of this row, copied to its output row."""
        if self.objective == "lm":
            return [LM_TEXT]
        if MESSAGES in values and self.instruction not in values:
            return [MESSAGES]
        return [c for c in (self.instruction, self.input) if c in values]

    def prompt(self, row) -> tuple[object, Optional[str]]:
        """(the turns before the answer, or the text to continue; None) or (None, what is wrong)."""
        if row.values is None:
            return None, row.problem
        values = row.values
        if self.objective == "lm":
            if LM_TEXT not in values:
                return None, f"lacks column(s) {LM_TEXT} ({self.needs})"
            text = values[LM_TEXT]
            if not isinstance(text, str) or not text.strip():
                return None, f"has an empty {LM_TEXT}" if not text or isinstance(text, str) else \
                    f"has a {type(text).__name__} {LM_TEXT}, not a string"
            return text, None
        if MESSAGES in values and self.instruction not in values:
            return _prompt_turns(values[MESSAGES])
        absent = [c for c in (self.instruction, None if self.input_optional else self.input) if c and c not in values]
        if absent:
            return None, f"lacks column(s) {', '.join(absent)} ({self.needs})"
        text = {c: "" if values.get(c) is None else str(values[c]) for c in (self.instruction, self.input)}
        turns = [{"role": "system", "content": text[self.instruction]}, {"role": "user", "content": text[self.input]}]
        turns = [t for t in turns if t["content"].strip()]  # as sft.load_records: an empty turn is left out
        if not turns:
            return None, f"has an empty {self.instruction} and {self.input}: there is no prompt to answer"
        return turns, None


def _prompt_turns(messages) -> tuple[Optional[list], Optional[str]]:
    """A conversation to answer: the turns before its answer (a final assistant turn, if any, is the answer)."""
    from qlora_cls.sft import ROLES
    if isinstance(messages, str):  # a CSV cell holds the JSON list
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            return None, f"has a {MESSAGES} cell that is not JSON ({exc.msg}); give a list of {{role, content}} turns"
    if not isinstance(messages, list) or not messages:
        return None, f"has {MESSAGES} that is not a non-empty list of {{role, content}} turns"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, f"has {MESSAGES} turn {i} that is not an object with a string role and content"
        if m["role"] not in ROLES:
            return None, f"has {MESSAGES} turn {i} with the unknown role {m['role']!r} (valid: {', '.join(ROLES)})"
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns:
        return None, f"has {MESSAGES} with only an assistant turn: there is no prompt to answer"
    return turns, None


def _check_generative(inp, spec: PromptSpec, skip: bool) -> tuple[int, list[int], Optional[str], list[str]]:
    """Every row checked before the model loads: (rows, bad row numbers, first problem, prompt columns)."""
    spec.check_header(inp)
    fields: list[str] = []
    count, bad, first = _scan_rows(inp, lambda row: spec.prompt(row)[1], skip, "generation",
                                   f"; give one prompt per row ({spec.needs})",
                                   on_good=lambda row: fields.extend(f for f in spec.fields(row.values)
                                                                     if f not in fields))
    if not fields:  # every row bad (--skip_bad_rows): the columns the run reads
        fields = [LM_TEXT] if spec.objective == "lm" else [spec.instruction, spec.input]
    order = [LM_TEXT, spec.instruction, spec.input, MESSAGES]
    return count, bad, first, sorted(fields, key=order.index)


def _generative_model(pcfg, source):
    """(model to generate with, tokenizer with the run's chat format, stop ids, accelerator): built as ft.py
    built it (eval.py's generative path), with the saved adapter."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qlora_cls import sft
    from qlora_cls.merging import check_chat_format
    from qlora_cls.pipeline import build_model, tokenizer_for
    cfg = source.cfg
    if pcfg.dtype is not None:
        raise UsageError("--dtype applies to merged folders; a run is rebuilt in the dtypes it was trained with")
    accelerator = Accelerator(mixed_precision=source.resolved.get("mixed_precision"))
    if accelerator.num_processes > 1:
        raise UsageError("predict.py runs in one process; start it with python, not accelerate launch")
    pcfg.resolve_auto(accelerator.device.type)
    cfg.resolve_auto(accelerator.device.type)
    model_path, tokenizer = tokenizer_for(cfg)
    fmt = None
    if cfg.objective == "sft":
        fmt = sft.chat_format(tokenizer, cfg.chat_template)  # the template set and its markers added, as in ft.py
        check_chat_format(fmt, tokenizer, source.records, model_path)
        stop_ids = list(source.resolved.get("stop_ids") or [tokenizer.convert_tokens_to_ids(fmt.end_of_turn)])
    else:
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if not stop_ids:
            raise UsageError(f"the tokenizer of {model_path} has no end-of-sequence token to stop a continuation at")
    set_seed(cfg.seed)  # any rows the chat template added start as in ft.py (the adapter stores the trained ones)
    model = build_model(cfg, model_path, tokenizer, None, accelerator, adapter_dir=str(source.adapter_dir),
                        new_tokens=fmt.added_tokens if fmt else ())
    if pcfg.fast_eval:  # generative.evaluate's inference copy: 4-bit weights de-quantized once, not per token
        from qlora_cls.fast_eval import inference_model
        model, _ = inference_model(model, accelerator.device, stream_dtype=pcfg.eval_stream_dtype)
    return model, tokenizer, stop_ids, accelerator


class _Writer:
    """Output rows as CSV (``stopped`` as true/false, a conversation as its JSON) or, for an --output named
    .jsonl/.json/.ndjson, JSON Lines (values as they are)."""

    def __init__(self, handle, header: list[str], jsonl: bool):
        self.handle, self.header, self.jsonl = handle, header, jsonl
        if not jsonl:
            self.csv = csv.writer(handle, lineterminator="\n")
            self.csv.writerow(header)

    def write(self, values: list) -> None:
        if self.jsonl:
            self.handle.write(json.dumps(dict(zip(self.header, values)), ensure_ascii=False) + "\n")
        else:
            self.csv.writerow(["" if v is None else ("true" if v else "false") if isinstance(v, bool) else
                               json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                               for v in values])


def predict_generative(pcfg, source) -> dict:
    """predict.py on an --objective sft|lm run: one generation per input row, in input order.

    Each row's prompt is rendered with the code training used (sft.render_prompt and the run's chat format;
    lm: the text, tokenized as training tokenized it) and answered with generation.generate, the function
    ft.py's evaluation generates with: greedy unless --do_sample, up to --max_new_tokens, stopping on the
    run's end of turn (lm: the end-of-sequence token). The whole input is checked before the model loads;
    then a chunk at a time is read, generated and written (flushed), into a file renamed into place at the
    end (complete or absent), as the classification path does."""
    from tqdm.auto import tqdm

    from qlora_cls import generation, sft
    from qlora_cls.files import atomic_open
    from qlora_cls.inputs import JSONL_SUFFIXES, InputFile
    from qlora_cls.runs import check_model_sources

    cfg = source.cfg
    spec = PromptSpec(cfg)
    out_path = _outputs(pcfg, [source])[0]
    check_model_sources([source])
    given = {k: getattr(pcfg, k, None) for k in GENERATION_FLAGS}  # a plain PredictConfig has none of them
    settings = {k: getattr(cfg, k) if given[k] is None else given[k] for k in GENERATION_FLAGS}
    with InputFile(pcfg.input, pcfg.input_format) as inp, ExitStack() as outputs:
        id_column = _id_column(pcfg, inp)
        total, bad, first_problem, fields = _check_generative(inp, spec, pcfg.skip_bad_rows)
        if id_column in fields:
            fields.remove(id_column)

        model, tokenizer, stop_ids, accelerator = _generative_model(pcfg, source)
        header = ([id_column] if id_column else []) + fields + ["generation", "stopped"]
        handle = sys.stdout if out_path is None else outputs.enter_context(atomic_open(out_path))
        writer = _Writer(handle, header, out_path is not None and out_path.suffix.lower() in JSONL_SUFFIXES)
        start = time.perf_counter()
        stopped = new_tokens = 0
        bar = tqdm(total=total, unit="row", desc="generating", file=sys.stderr, disable=None)
        for number, chunk in enumerate(inp.chunks(pcfg.chunk_size)):
            prompts = [spec.prompt(r)[0] for r in chunk]
            texts = [p if spec.objective == "lm" else sft.render_prompt(tokenizer, p + [{"role": "assistant",
                                                                                      "content": ""}])
                     for p in prompts if p is not None]
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
            gens = iter(generation.generate(
                model, tokenizer, ids, stop_ids, settings["max_new_tokens"], pcfg.batch_size or cfg.eval_batch_size,
                settings["do_sample"], settings["temperature"], settings["top_p"], seed=cfg.seed + number)
                if ids else [])
            for row, prompt in zip(chunk, prompts):
                values = row.values or {}
                cells = ([_cell(values, id_column)] if id_column else []) + [values.get(f) for f in fields]
                if prompt is None:
                    writer.write(cells + ["", None])
                    continue
                g = next(gens)
                stopped += g["stopped"]
                new_tokens += g["new_tokens"]
                writer.write(cells + [g["generation"], g["stopped"]])
            handle.flush()
            bar.update(len(chunk))
        bar.close()
    seconds = time.perf_counter() - start
    done = total - len(bad)
    summary = {"rows": total, "predicted": done, "skipped": len(bad), "skipped_rows": bad[:MAX_LISTED],
               "objective": cfg.objective, "generation": settings, "stop_rate": stopped / done if done else None,
               "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / seconds if seconds else None,
               "seconds": seconds, "rows_per_s": done / seconds if seconds else None,
               "outputs": [str(out_path) if out_path else "-"]}
    if bad:
        log.warning("skipped %d bad row(s) of %d (empty generation written): %s%s; first: %s", len(bad), total,
                    ", ".join(map(str, bad[:MAX_LISTED])), ", ..." if len(bad) > MAX_LISTED else "", first_problem)
    log.info("generated for %d row(s) in %.1f s (%.1f new tokens/s), %d ended on the stop token; written: %s", done,
             seconds, summary["new_tokens_per_s"] or 0, stopped, "standard output" if out_path is None else out_path)
    return summary

if __name__ == "__main__":
    main()
