"""Prompt templates: ``prompts/<task>/<name>.txt``, whose ``{fields}`` are dataset columns.

Plain text with ``{column}`` fields; the same names exist for every GLUE task and ``prompts/any/`` for other
data. A first line ``# label_words: not equivalent, equivalent`` (not part of the prompt) names each label's
words for ``--classifier label_words``, in label-id order; ``--label_words`` overrides it. Rendering is not ``str.format`` (plain named fields only), so a template cannot reach into Python
objects. Details: docs/tasks-and-prompts.md#prompts-module.
"""
from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import UsageError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
GENERIC = "any"  # templates for any task, filled from the run's text columns and label names
SUFFIX = ".txt"
INPUTS, LABELS = "_inputs", "_labels"  # fields filled from the run, not from a dataset column
ANSWER = "_answer"  # where the answer goes: the prompt ends there (label words follow it; a head reads up to it)
LABEL_WORDS_LINE = "# label_words:"  # a template file's optional first line: each label's words, comma-separated


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    pieces: tuple[tuple[str, str | None], ...]  # (literal text, field name or None)
    label_words: Optional[tuple[str, ...]] = None  # the file's ``# label_words:`` line (None: none given)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f in self.pieces if f is not None)

    def bind(self, text_columns: Sequence[str], label_names: Optional[Sequence[str]]) -> "Template":
        """The template for one run: ``{_inputs}``/``{_labels}`` written out, every field a data column, and the
        template cut at ``{_answer}`` (optional: where the answer goes; without it the template's end is there).

        The result's ``text`` is a template again (literal braces escaped), which is what ``prompt.txt``
        records, so eval.py re-reads exactly what the run saw.
        """
        columns = list(text_columns)
        if not (set(self.fields) & (set(columns) | {INPUTS})):
            fields = ", ".join("{" + c + "}" for c in columns + [INPUTS])
            raise UsageError(f"prompt template {self.name!r} has no field for the text, so the model would never "
                             f"see the data; use one of {fields}")
        labels = ", ".join(label_names) if label_names else "a number"
        pieces = self.pieces
        if ANSWER in self.fields:  # the prompt is the text before the answer's slot
            at = next(i for i, (_, f) in enumerate(pieces) if f == ANSWER)
            after = "".join(literal + ("{" + f + "}" if f else "") for literal, f in pieces[at + 1:])
            if after.strip():
                raise UsageError(f"prompt template {self.name!r}: {{{ANSWER}}} marks where the answer goes and must "
                                 f"end the template, but {after.strip()[:40]!r} follows it")
            pieces = pieces[:at] + ((pieces[at][0], None),)

        def escape(s: str) -> str:
            return s.replace("{", "{{").replace("}", "}}")

        out = []
        for literal, f in pieces:
            out.append(escape(literal))
            if f == INPUTS:
                out.append(" ".join(f"{escape(c.replace('_', ' ').capitalize())}: {{{c}}}" for c in columns))
            elif f == LABELS:
                out.append(escape(labels))
            elif f is not None:
                out.append("{" + f + "}")
        return dataclasses.replace(parse_template(self.name, "".join(out)), label_words=self.label_words)

    def check_columns(self, columns: list[str]) -> None:
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise UsageError(f"prompt template {self.name!r} uses field(s) {', '.join(missing)} that the dataset "
                             f"lacks; available columns: {', '.join(columns)}")

    def render(self, row: dict) -> str:
        return "".join(literal + ("" if f is None else str(row[f])) for literal, f in self.pieces)


def template_folders(task: Optional[str]) -> list[Path]:
    """Where ``--prompt NAME`` is looked up for ``task`` (None: data that is not a GLUE task)."""
    return [PROMPTS_DIR / d for d in ([task] if task else []) + [GENERIC] if (PROMPTS_DIR / d).is_dir()]


def available_templates(task: Optional[str] = None) -> list[str]:
    """Template names usable with ``task``; with no task, every name shipped for any task."""
    folders = template_folders(task) if task else [p for p in PROMPTS_DIR.iterdir() if p.is_dir()]
    return sorted({p.stem for d in folders for p in d.glob(f"*{SUFFIX}")})


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


def template_path(name_or_path: str, task: Optional[str] = None) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in template_folders(task):
        if (folder / f"{name_or_path}{SUFFIX}").is_file():
            return folder / f"{name_or_path}{SUFFIX}"
    where = " and ".join(f"prompts/{f.name}/" for f in template_folders(task))
    raise UsageError(f"unknown prompt {name_or_path!r}: not a file and not one of "
                     f"{', '.join(available_templates(task))} (in {where})")


def load_template(name_or_path: str, task: Optional[str] = None) -> Template:
    """A name in ``prompts/<task>/`` or ``prompts/any/`` (without ``.txt``), or a path to a template file."""
    path = template_path(name_or_path, task)
    try:
        # A template file ends with a newline by convention; the newline is not part of the prompt.
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise UsageError(f"prompt template {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8")
    words = None
    first, _, rest = text.partition("\n")
    if first.startswith(LABEL_WORDS_LINE):
        words = tuple(w.strip() for w in first[len(LABEL_WORDS_LINE):].split(","))
        if len(words) < 2 or not all(words):
            raise UsageError(f"prompt template {path}: its first line {first.strip()!r} names no label words or an "
                             f"empty one; write one per label, in label-id order, comma-separated: "
                             f"'{LABEL_WORDS_LINE} not equivalent, equivalent'")
        text = rest
    if not text.strip():
        raise UsageError(f"prompt template {path} is empty; write the prompt with {{column}} fields, e.g. "
                         f"{(PROMPTS_DIR / 'mrpc' / 'perfect.txt').read_text().strip()!r}")
    return dataclasses.replace(parse_template(path.stem, text), label_words=words)
