"""Typed command lines from dataclasses, on transformers' ``HfArgumentParser``.

Every config field becomes a ``--flag`` with its help; values are parsed strictly, an optional ``--config`` file
fills fields first (the command line wins), validation is the dataclass's ``__post_init__``, every error is one
line. What differs from plain HfArgumentParser: docs/benchmarks.md#cli-module.

Line counts before and after HfArgumentParser: docs/benchmarks.md#cli-module-hfargumentparser.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import UsageError

TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


def strict_bool(text: Any) -> bool:
    """Parse a boolean the way a user means it; anything else is an error (never ``bool("false")``)."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, 1/0)")


AUTO = "auto"
AUTO_OR_BOOL = typing.Union[bool, str]  # a field type: "auto" (decided at run time) or a strict boolean


def auto_or_bool(text: Any) -> bool | str:
    """``auto`` stays ``auto``; anything else must be a boolean word (see ``strict_bool``)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        return strict_bool(text)
    except ValueError:
        raise ValueError(f"{text!r} is not auto or a boolean (use auto, true/false, yes/no, 1/0)") from None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    """A function that turns one command-line word (or a YAML value) into a value of type ``tp``; its
    ``__name__`` is what argparse reports (``invalid <__name__> value``)."""
    base, optional = _unwrap_optional(tp)
    if tp == AUTO_OR_BOOL:
        def convert(value: Any) -> Any:
            return auto_or_bool(value)
        convert.__name__ = "auto-or-bool"
        return convert

    def convert(value: Any) -> Any:
        if optional and value is None:
            return None
        # "none" is a word for "unset" only where it cannot be a real value: --prompt none is a template.
        if optional and base is not str and isinstance(value, str) and value.lower() in {"none", "null"}:
            return None
        if base is bool:
            return strict_bool(value)
        if base in (int, float):
            kind = "an integer" if base is int else "a number"
            if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{value!r} is not {kind}")
            try:
                return base(value)
            except ValueError:
                raise ValueError(f"{value!r} is not {kind}") from None
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError(f"{value!r} is not a string")
            return str(value)
        raise TypeError(f"unsupported field type {tp}")

    convert.__name__ = getattr(base, "__name__", str(base))
    return convert


def list_item_type(tp: Any) -> tuple[bool, Any]:
    base, _ = _unwrap_optional(tp)
    if typing.get_origin(base) in (list, Sequence, tuple):
        return True, typing.get_args(base)[0]
    return False, None


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """Convert a value from a config file to the field's type, with an error naming the field."""
    hints = typing.get_type_hints(cls)
    is_list, item_tp = list_item_type(hints[name])
    try:
        if is_list:
            if value is None:
                return None
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_converter(item_tp)(v) for v in items]
        return _converter(hints[name])(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--{name}: {exc}") from None


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage on error; we print one line that names the problem."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


@functools.lru_cache(maxsize=None)
def _dataclass_parser_class() -> type:
    # transformers is imported on first use: report.py and sweep.py import this module for
    # OneLineArgumentParser and strict_bool alone, and importing transformers costs them ~1.7 s.
    from transformers import HfArgumentParser

    class _DataclassParser(HfArgumentParser, OneLineArgumentParser):
        """transformers' HfArgumentParser (one ``--field`` per dataclass field, its ``metadata`` help and
        choices, ``nargs="+"`` lists, ``--flag``/``--flag false`` booleans, defaults in ``--help``) with our
        one-line errors and our value converters, which keep what HfArgumentParser does differently:

        (booleans, ``Optional[X]`` with ``none``, ``Union[bool, str]`` with ``auto``: docs/benchmarks.md#cli_dataclassparser);
        the converters go in through ``add_argument``, the method HfArgumentParser calls once per field.
        """

        def __init__(self, cls: type, **kwargs):
            self.hints = typing.get_type_hints(cls)  # read by add_argument, which super().__init__ calls
            super().__init__(cls, **kwargs)

        def add_argument(self, *names, **kwargs):
            kwargs.pop("role", None), kwargs.pop("before", None)  # config.py's field roles, not argparse's
            field = names[0][2:] if names and names[0].startswith("--") else None
            tp = self.hints.get(field)
            if tp is not None and "action" not in kwargs:  # not HfArgumentParser's --no_<flag> (store_false)
                is_list, item_tp = list_item_type(tp)
                kwargs["type"] = _converter(item_tp if is_list else tp)
                if tp == AUTO_OR_BOOL:
                    kwargs.update(metavar="{auto,true,false}", nargs="?", const=True)
                elif _unwrap_optional(tp)[0] is bool:
                    kwargs["metavar"] = "{true,false}"
            return super().add_argument(*names, **kwargs)

    return _DataclassParser


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = _dataclass_parser_class()(cls, prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML or JSON file with field: value pairs; flags on the command line win")
    return parser


def load_config_file(path: str, flag: str = "--config") -> dict[str, Any]:
    """A YAML/JSON mapping; errors name ``flag``, the option the file was given with."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"{flag} {path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}".replace("\n", " "))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {path}: expected a mapping of field names to values, got {type(data).__name__}")
    return data


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-4`` -> ``--lr=-1e-4``: argparse takes ``-1e-4`` for an option (it only knows plain
    negative numbers), so the value check would never see it; attached, it gets the real message."""
    out: list[str] = []
    for word in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and word.startswith("-"):
            try:
                float(word)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={word}"
                continue
        out.append(word)
    return out


def parse_dataclass(cls: type, argv: Sequence[str] | None, prog: str, description: str):
    """Defaults < ``--config`` file < command line; then ``cls(**values)`` validates.

    The file's values are converted and checked here (HfArgumentParser's ``parse_yaml_file`` passes them
    to the dataclass as they are, so ``load_in_4bit: 'false'`` would be the true string ``'false'``, and
    it cannot be combined with flags). They go in as the namespace argparse fills: argparse only applies
    a default where the namespace has no value, so a flag given on the command line wins even when it
    equals the default.
    """
    parser = build_parser(cls, prog, description)
    argv = _attach_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    values: dict[str, Any] = {}
    if config_path:
        from_file = load_config_file(config_path)
        known = set(field_names(cls))
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise UsageError(f"--config {config_path}: unknown field(s) {', '.join(unknown)}; "
                             f"valid fields are the flags listed by --help")
        try:
            values.update({k: coerce_field(cls, k, v) for k, v in from_file.items()})
        except UsageError as exc:
            raise UsageError(f"--config {config_path}: {exc}") from None
    args = vars(parser.parse_args(argv, namespace=argparse.Namespace(**values)))
    args.pop("config", None)
    return cls(**args)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]
