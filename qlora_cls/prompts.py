"""Prompt templates: one file per template in ``prompts/``, fields are dataset columns.

A template is plain text with ``{column}`` fields, e.g.
``Does sentence 1 mean the same as sentence 2? Sentence 1: {sentence1} Sentence 2: {sentence2}``.
Rendering is deliberately not ``str.format``: only plain named fields are allowed (no attribute or
index access, no conversions), so a template can never reach into Python objects.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
SUFFIX = ".txt"


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    pieces: tuple[tuple[str, str | None], ...]  # (literal text, field name or None)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f in self.pieces if f is not None)

    def check_columns(self, columns: list[str]) -> None:
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise UsageError(f"prompt template {self.name!r} uses field(s) {', '.join(missing)} that the dataset "
                             f"lacks; available columns: {', '.join(columns)}")

    def render(self, row: dict) -> str:
        return "".join(literal + ("" if f is None else str(row[f])) for literal, f in self.pieces)


def available_templates() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob(f"*{SUFFIX}"))


def parse_template(name: str, text: str) -> Template:
    pieces = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise UsageError(f"prompt template {name!r} is malformed: {exc} (write literal braces as {{{{ and }}}})")
    for literal, field_name, spec, conversion in parsed:
        if field_name is not None and (not field_name.isidentifier() or spec or conversion):
            raw = "{" + field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(f"prompt template {name!r}: field {raw} is not allowed; use plain column names like {{sentence1}}")
        pieces.append((literal, field_name))
    return Template(name=name, text=text, pieces=tuple(pieces))


def load_template(name_or_path: str) -> Template:
    """A name in ``prompts/`` (without ``.txt``) or a path to a template file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / f"{name_or_path}{SUFFIX}"
    if not path.is_file():
        raise UsageError(f"unknown prompt {name_or_path!r}: not a file and not one of "
                         f"{', '.join(available_templates())} (in {PROMPTS_DIR})")
    # A template file ends with a newline by convention; the newline is not part of the prompt.
    text = path.read_text(encoding="utf-8").rstrip("\r\n")
    return parse_template(path.stem, text)
