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
"""
from __future__ import annotations

import csv
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import PredictConfig
from qlora_cls.errors import UsageError

log = logging.getLogger("predict")
ID_COLUMNS = ("idx", "id")  # looked for, in this order, when --id_column is not given
MAX_LISTED = 5  # bad rows named in the --skip_bad_rows summary


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    try:
        return predict_file(parse_dataclass(PredictConfig, argv, "predict.py", __doc__))
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
    count, bad, first = 0, [], None
    for row in inp.rows():
        count += 1
        problem = row_problem(row, columns)
        if problem is None:
            continue
        if not skip:
            raise UsageError(f"--input {inp.where}: {inp.unit} {row.number} {problem}; fix or remove it, or pass "
                             f"--skip_bad_rows to give such rows an empty prediction")
        bad.append(row.number)
        first = first or f"{inp.unit} {row.number} {problem}"
    if count == 0:
        raise UsageError(f"--input {inp.where} has no rows")
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
    sources = [open_source(p, pcfg.adapter, model_dir=pcfg.model_dir) for p in pcfg.results_path]
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


if __name__ == "__main__":
    main()
