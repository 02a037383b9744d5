"""Sweep grids: which runs a sweep is made of, what each is called, and the sweep's manifest.

A grid maps TrainConfig fields to the values to try; every combination is a *point*, i.e. one normal
ft.py run with its own folder ``<sweep>/<field>=<value>,...``. Fields given one value are *fixed*:
passed unchanged to every run. Nothing here launches processes (that is ``sweep.py``): this module
turns command-line words or a YAML grid into validated points, before anything expensive happens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import re
import typing
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from .cli import coerce_field, list_item_type, load_config_file, parse_dataclass
from .config import TrainConfig, role_fields, with_fields_added_later
from .errors import UsageError
from .files import atomic_write_json, read_json
from .procs import group_alive, same_process_alive, slurm_active
from .prompts import load_template

RESERVED = role_fields("command")  # set by sweep.py for every point; a grid may not choose them
MANIFEST = "sweep.json"
ERROR_FILE = "sweep_error.txt"
FIELDS_HINT = "`python ft.py --help` lists the valid fields"


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _is_list_field(name: str) -> bool:
    return list_item_type(_field_types()[name])[0]


def _check_field(name: str, where: str) -> None:
    if name not in _field_types() or name not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise UsageError(f"{where}: unknown field {name!r}; {FIELDS_HINT}")
    if name in RESERVED:
        raise UsageError(f"{where}: {name!r} is set by sweep.py for every run (use --sweep_dir to choose where runs go)")


def _word(value: Any) -> str:
    """A YAML value as the command-line word ft.py would parse back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (dict, list, tuple)):
        raise UsageError(f"value {value!r} is not a single value")
    return str(value)


@dataclass
class Grid:
    """Swept fields (each value as the argv words of that field) and the fixed ft.py arguments."""
    swept: dict[str, list[list[str]]]
    fixed: list[str]

    def to_json(self) -> dict:
        return {"swept": self.swept, "fixed": self.fixed}


def split_cli(tokens: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Group ``--field v1 v2 ...`` words; returns {field: words} and pass-through words (``--config f``)."""
    groups: dict[str, list[str]] = {}
    passthrough: list[str] = []
    current: list[str] | None = None
    for tok in tokens:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            if name == "config":  # an ft.py config file: passed to every run as is
                current = passthrough
                passthrough.append(f"--{name}")
            else:
                _check_field(name, f"--{name}")
                if name in groups:
                    raise UsageError(f"--{name} is given twice; list all its values after one --{name}")
                current = groups[name] = []
            if eq:
                current.append(value)
        elif current is None:
            raise UsageError(f"unexpected word {tok!r}: values follow a --field (e.g. --prompt none perfect)")
        else:
            current.append(tok)
    return groups, passthrough


def grid_from_cli(groups: dict[str, list[str]]) -> dict[str, list[list[str]]]:
    """Each field's list of values, each value as argv words.

    A scalar field with several words is swept over them. A list field (target_modules, train_splits)
    takes its words as ONE value, as ft.py does, unless they are comma-joined combinations:
    ``--target_modules q_proj,v_proj q_proj,k_proj,v_proj,o_proj`` sweeps two combinations. Target presets
    stand alone, so ``--target_modules attention-qv attention all-linear`` sweeps the three presets.
    """
    from .modeling import PRESETS
    out: dict[str, list[list[str]]] = {}
    for name, words in groups.items():
        if _is_list_field(name) and (any("," in w for w in words)
                                     or (name == "target_modules" and any(w in PRESETS for w in words))):
            out[name] = [[p for p in w.split(",") if p] for w in words]
        elif _is_list_field(name):
            out[name] = [words]
        elif not words:  # a bare boolean flag means true, as in ft.py
            out[name] = [[]]
        else:
            out[name] = [[w] for w in words]
    return out


def grid_from_file(path: str) -> dict[str, list[list[str]]]:
    """YAML/JSON mapping field -> list of values (swept) or one value (fixed).

    A list field's values are lists: ``target_modules: [[q_proj, v_proj], [q_proj, k_proj, v_proj, o_proj]]``
    sweeps two combinations; ``target_modules: [q_proj, v_proj]`` is one (fixed) combination.
    """
    data = load_config_file(path, "--grid")
    data.pop(SCHEDULER_KEY, None)  # how the points are run, not what they are (slurm_options_from_file)
    if not data:
        raise UsageError(f"--grid {path} is empty; give field: [values] pairs, e.g. prompt: [none, perfect]")
    out: dict[str, list[list[str]]] = {}
    for name, value in data.items():
        _check_field(str(name), f"--grid {path}")
        if value == [] and not _is_list_field(name):
            raise UsageError(f"--grid {path}: {name} has an empty list of values; give two or more to sweep, or one")
        try:
            if _is_list_field(name):
                if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
                    out[name] = [[_word(x) for x in v] for v in value]
                else:
                    out[name] = [[_word(x) for x in (value if isinstance(value, list) else [value])]]
            elif isinstance(value, list):
                out[name] = [[_word(v)] for v in value]
            else:
                out[name] = [[_word(value)]]
        except UsageError as exc:
            raise UsageError(f"--grid {path}: {name}: {exc}") from None
        for option in out[name]:  # a value of the wrong type, named with the file (ft.py's parser would not)
            try:
                coerce_field(TrainConfig, name, option if _is_list_field(name) else option[0])
            except UsageError as exc:
                raise UsageError(f"--grid {path}: {exc}") from None
    return out


SCHEDULER_KEY = "slurm"
SLURM_KEYS = {"partition": str, "gpus_per_point": int, "cpus_per_point": int, "mem_gb": float, "time_min": int,
              "options": dict, "setup": list}


def slurm_options_from_file(path: str | None) -> dict[str, Any]:
    """The grid file's ``slurm:`` mapping (partition, gpus_per_point, cpus_per_point, mem_gb, time_min,
    options: {sbatch option: value}, setup: [shell lines]), checked; {} without one."""
    if not path:
        return {}
    data = load_config_file(path, "--grid").get(SCHEDULER_KEY)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--grid {path}: {SCHEDULER_KEY}: expected a mapping of {', '.join(SLURM_KEYS)}")
    out = {}
    for key, value in data.items():
        kind = SLURM_KEYS.get(key)
        if kind is None:
            raise UsageError(f"--grid {path}: {SCHEDULER_KEY}: unknown key {key!r}; valid: {', '.join(SLURM_KEYS)}")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or (kind is int and value != int(value)) or value <= 0):
            raise UsageError(f"--grid {path}: {SCHEDULER_KEY}: {key} must be a positive "
                             f"{'integer' if kind is int else 'number'}, got {value!r}")
        if kind is dict and not isinstance(value, dict):
            raise UsageError(f"--grid {path}: {SCHEDULER_KEY}: options must map sbatch options to values, "
                             f"e.g. {{account: myproject}}")
        if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UsageError(f"--grid {path}: {SCHEDULER_KEY}: setup must be a list of shell lines")
        out[key] = kind(value) if kind in (int, float, str) else value
    return out


def make_grid(tokens: Sequence[str], grid_file: str | None) -> Grid:
    """Merge the grid file and the command line (the command line wins per field)."""
    groups, passthrough = split_cli(tokens)
    values = grid_from_file(grid_file) if grid_file else {}
    values.update(grid_from_cli(groups))
    swept, fixed = {}, list(passthrough)
    for name, options in values.items():
        if len(options) > 1:
            keys = [tuple(o) for o in options]
            if len(set(keys)) != len(keys):
                raise UsageError(f"--{name} lists the same value twice: {' '.join(','.join(o) for o in options)}")
            swept[name] = options
        else:
            fixed += [f"--{name}", *options[0]]
    if not swept:
        raise UsageError("empty grid: give at least one field with two or more values, e.g. "
                         "--prompt none perfect conflicting insufficient, or --grid grid.yaml")
    return grid_from_parts(swept, fixed)


def grid_from_parts(swept: dict, fixed: list[str]) -> Grid:
    return Grid(swept={k: [list(v) for v in vs] for k, vs in swept.items()}, fixed=list(fixed))


# -- points ---------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


def _value_label(words: list[str]) -> str:
    text = "+".join(Path(w).stem if "/" in w else w for w in words) if words else "true"
    return _UNSAFE.sub("_", text) or "_"


@dataclass
class Point:
    name: str                      # folder name, e.g. prompt=none,seed=1
    values: dict[str, list[str]]   # swept field -> argv words

    def argv(self, grid: Grid, run_dir: Path) -> list[str]:
        args = list(grid.fixed)
        for name, words in self.values.items():
            args += [f"--{name}", *words]
        return args + ["--results_path", str(run_dir)]


def points(grid: Grid) -> list[Point]:
    names = list(grid.swept)
    out = []
    for combo in itertools.product(*(grid.swept[n] for n in names)):
        values = dict(zip(names, combo))
        name = ",".join(f"{n}={_value_label(v)}" for n, v in values.items())
        if len(name) > 200:  # file names are limited to 255 bytes
            name = name[:180] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
        out.append(Point(name=name, values=values))
    if len({p.name for p in out}) != len(out):
        raise UsageError("two grid points get the same folder name (values that differ only in characters "
                         "unsafe in file names, or prompt paths with the same file name); rename them")
    return out


def validate(grid: Grid, pts: list[Point], sweep_dir: Path) -> list[TrainConfig]:
    """Parse every point's full ft.py command line now: a bad value fails before any run starts."""
    configs = []
    for p in pts:
        cfg = parse_dataclass(TrainConfig, p.argv(grid, sweep_dir / p.name), "sweep.py", "")
        load_template(cfg.prompt, cfg.glue_task)
        configs.append(cfg)
    return configs


def base_key(point: Point, grid: Grid) -> str:
    """Folder of the base-model evaluations a point shares with the others.

    The un-tuned model depends only on the fields that shape the base model and the evaluation data;
    when none of those is swept, a sweep has one set of base evaluations (``base/``).
    """
    values = {k: v for k, v in point.values.items() if k in BASE_FIELDS}
    if not values:
        return "base"
    return "base-" + ",".join(f"{k}={_value_label(v)}" for k, v in values.items())


BASE_FIELDS = role_fields("base", "eval_data")


def clear_sweep_files(run_dir: Path) -> None:
    """Remove what the sweep itself left in a point folder, so ft.py finds it as it left it."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)


# -- the manifest ---------------------------------------------------------------------------------------
def _comparable(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in RESERVED:
        d.pop(k, None)
    return d


class Manifest:
    """``<sweep>/sweep.json``: the grid, each point's settings and status (pending, running, finished,
    failed with its error, interrupted), and the base-model evaluations. Rewritten atomically on
    every change, so it can be read while the sweep runs."""

    def __init__(self, sweep_dir: Path, data: dict):
        self.dir = sweep_dir
        self.path = sweep_dir / MANIFEST
        self.data = data

    @classmethod
    def open(cls, sweep_dir: Path, grid: Grid, pts: list[Point], configs: list[TrainConfig],
             eval_prompts: list[str]) -> "Manifest":
        path = sweep_dir / MANIFEST
        wanted = {p.name: {"values": p.values, "config": _comparable(c)} for p, c in zip(pts, configs)}
        # Round-trip through JSON so tuples/None compare like the stored file.
        wanted = json.loads(json.dumps(wanted, default=str))
        if path.is_file():
            data = read_json(path)  # a sweep started before a field existed resumes (with_fields_added_later)
            stored = {name: {"values": s.get("values"), "config": with_fields_added_later(s.get("config") or {})}
                      for name, s in data.get("points", {}).items()}
            if stored != wanted:
                differs = sorted(set(stored) ^ set(wanted)) or sorted(
                    k for n in wanted for k in wanted[n]["config"]
                    if stored[n]["config"].get(k) != wanted[n]["config"][k])
                raise UsageError(f"--sweep_dir {sweep_dir} holds a different sweep (differs in: "
                                 f"{', '.join(differs[:6])}); repeat its own command (see {path}) to resume "
                                 f"it, or choose a new --sweep_dir")
            data["eval_prompts"] = eval_prompts
            data["resumed"] = data.get("resumed", []) + [datetime.now().isoformat(timespec="seconds")]
            m = cls(sweep_dir, data)
        else:
            if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
                raise UsageError(f"--sweep_dir {sweep_dir} already holds files but no {MANIFEST}; "
                                 f"sweeps never write into other folders: choose a new --sweep_dir")
            try:
                sweep_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create --sweep_dir {sweep_dir}: {exc.strerror}")
            m = cls(sweep_dir, {
                "grid": grid.to_json(), "eval_prompts": eval_prompts,
                "created": datetime.now().isoformat(timespec="seconds"),
                "points": {n: {**w, "status": "pending"} for n, w in wanted.items()},
                "base_evals": {}})
        m.save()
        return m

    def lock(self):
        """One sweep process per sweep folder (two would train the same point twice)."""
        @contextlib.contextmanager
        def held():
            with open(self.dir / ".sweep.lock", "w") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"another sweep.py is running on {self.dir}; wait for it or stop it first")
                yield
        return held()

    def check_orphans(self) -> None:
        """A point of a sweep killed with SIGKILL gets SIGTERM (procs.py) and checkpoints, which takes a
        while; training it twice at once would corrupt its folder, so a re-run waits for it to end."""
        for name, p in self.data["points"].items():
            pgid = p.get("process_group")
            if p.get("status") in ("running", "queued") and pgid and group_alive(pgid):
                raise UsageError(f"point {name} is still running (process group {pgid}) from an earlier sweep "
                                 f"that was killed; wait for it or stop it (kill -TERM -{pgid}), then re-run")
            job = p.get("job_id")
            if p.get("status") in ("running", "queued") and job and p.get("executor") == "local" \
                    and same_process_alive(int(job), p.get("job_started", "")):
                raise UsageError(f"point {name} is still running (local job {job}) from an earlier sweep that was "
                                 f"killed; wait for it or stop it (kill -TERM {job}), then re-run")
        slurm = [p["job_id"] for p in self.data["points"].values()
                 if p.get("status") in ("running", "queued") and p.get("executor") == "slurm" and p.get("job_id")]
        if slurm:
            try:
                alive = sorted(slurm_active(slurm))
            except (RuntimeError, OSError) as exc:
                raise UsageError(f"cannot check this sweep's Slurm jobs ({exc}); re-run where squeue works") from None
            if alive:
                raise UsageError(f"Slurm job(s) {', '.join(alive)} of this sweep are still queued or running; wait "
                                 f"for them or cancel them (scancel {' '.join(sorted({a.split('_')[0] for a in alive}))}), "
                                 f"then re-run")

    def save(self) -> None:
        self.data["updated"] = datetime.now().isoformat(timespec="seconds")
        atomic_write_json(self.path, self.data)

    def point(self, name: str) -> dict:
        return self.data["points"][name]

    def update(self, name: str, **fields) -> None:
        self.data["points"][name].update(fields)
        if fields.get("status") in ("finished", "failed", "interrupted"):
            self.data["points"][name].pop("process_group", None)
        self.save()

    def update_base(self, name: str, entry: dict) -> None:
        self.data.setdefault("base_evals", {})[name] = entry
        self.save()

    def failed(self) -> list[str]:
        bad = [n for n, p in self.data["points"].items() if p.get("status") == "failed" or p.get("eval_errors")]
        bad += [n for n, b in self.data.get("base_evals", {}).items() if b.get("status") == "failed"]
        return bad

    def counts(self) -> str:
        c = Counter(p.get("status") for p in self.data["points"].values())
        text = ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
        evals = [n for n, p in self.data["points"].items() if p.get("eval_errors")]
        return text + (f", evaluation failed for {', '.join(evals)}" if evals else "")
