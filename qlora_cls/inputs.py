"""Rows to predict on, read from a CSV or JSON Lines file (or standard input) a chunk at a time.

Values are kept as read (no NA guessing), rows numbered as data.py numbers them; the csv module rather than
pandas, so a malformed row is reported as that row and memory stays one chunk (docs/sweeps-and-reports.md#inputs-module).
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import UsageError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
csv.field_size_limit(2 ** 31 - 1)  # the default (128 KiB a cell) would refuse a long document


@dataclass
class Row:
    number: int  # 1-based data row (CSV) or line (JSON Lines)
    values: Optional[dict]  # None when the row could not be read at all (see problem)
    problem: Optional[str] = None


class InputFile:
    """A CSV or JSON Lines file; standard input (``-``) is first copied to a temporary file, in blocks,
    so it can be checked in full before anything is predicted (and then read again)."""

    def __init__(self, name: str, fmt: str = "auto"):
        self.name = name
        self._spooled: Optional[Path] = None
        if name == "-":
            fd, tmp = tempfile.mkstemp(prefix="qlora-cls-stdin-", suffix=".txt")
            with open(fd, "wb") as out:
                shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
            self._spooled = self.path = Path(tmp)
        else:
            self.path = Path(name)
            if not self.path.is_file():
                raise UsageError(f"--input {name}: no such file")
        self.format = self._format(fmt)
        self.header: Optional[list[str]] = self._read_header() if self.format == "csv" else None
        self.where = "standard input" if name == "-" else str(name)
        self.unit = "data row" if self.format == "csv" else "line"

    def close(self) -> None:
        if self._spooled is not None:
            self._spooled.unlink(missing_ok=True)
            self._spooled = None

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _format(self, fmt: str) -> str:
        if fmt != "auto":
            return fmt
        if self.name != "-":
            suffix = self.path.suffix.lower()
            if suffix == ".csv":
                return "csv"
            if suffix in JSONL_SUFFIXES:
                return "jsonl"
            raise UsageError(f"--input {self.name}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
                             f"name it .csv or .jsonl, or give --input_format csv|jsonl")
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "jsonl" if head.startswith(b"{") else "csv"

    def _open(self):
        # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column's name
        return open(self.path, encoding="utf-8-sig", newline="" if self.format == "csv" else None)

    def _read_header(self) -> list[str]:
        try:
            with self._open() as f:
                header = next(csv.reader(f), None)
        except UnicodeDecodeError as exc:
            raise UsageError(f"--input {self.name} is not UTF-8 text (byte {exc.start}); save it as UTF-8")
        if not header:
            raise UsageError(f"--input {self.name} is empty; it needs a header line naming the columns, then rows")
        return header

    def columns_hint(self) -> Optional[list[str]]:
        """The columns the file has: the CSV header, or the keys of the first JSON object."""
        if self.header is not None:
            return self.header
        for row in self.rows():
            if row.values is not None:
                return list(row.values)
        return None

    def rows(self) -> Iterator[Row]:
        try:
            with self._open() as f:
                yield from (self._csv_rows(f) if self.format == "csv" else self._jsonl_rows(f))
        except UnicodeDecodeError as exc:
            raise UsageError(f"--input {self.name} is not UTF-8 text (byte {exc.start}); save it as UTF-8")
        except csv.Error as exc:
            raise UsageError(f"--input {self.name} is not valid CSV: {exc}")

    def _csv_rows(self, f) -> Iterator[Row]:
        reader = csv.reader(f)
        header = next(reader)
        number = 0
        for cells in reader:
            if not cells:  # a blank line is not a row
                continue
            number += 1
            if len(cells) != len(header):
                yield Row(number, None, f"has {len(cells)} field(s) but the header has {len(header)}")
            else:
                yield Row(number, dict(zip(header, cells)))

    def _jsonl_rows(self, f) -> Iterator[Row]:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            value, problem = parse_json_line(line)
            if problem:
                yield Row(number, None, problem)
            elif not isinstance(value, dict):
                yield Row(number, None, f"is a JSON {type(value).__name__}, not an object of column: value")
            else:
                yield Row(number, value)

    def chunks(self, size: int) -> Iterator[list[Row]]:
        chunk: list[Row] = []
        for row in self.rows():
            chunk.append(row)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def parse_json_line(line: str) -> tuple[object, Optional[str]]:
    """One line of JSON Lines: (value, None), or (None, what is wrong) with the column in the line as written
    (the same words in ft.py's --train_file checks and predict.py's --input)."""
    try:
        return json.loads(line.rstrip("\r\n")), None
    except json.JSONDecodeError as exc:
        return None, (f"is not valid JSON ({exc.msg}, column {exc.colno}); JSON Lines need one complete object "
                      f"per line")


def row_problem(row: Row, columns: Sequence[str]) -> Optional[str]:
    """Why this row cannot be predicted (a text column missing or empty), or None."""
    if row.values is None:
        return row.problem
    missing = [c for c in columns if c not in row.values]
    if missing:
        return f"lacks column(s) {', '.join(missing)}"
    empty = [c for c in columns if row.values[c] is None or not str(row.values[c]).strip()]
    if empty:
        return f"has an empty {', '.join(empty)}"
    return None
