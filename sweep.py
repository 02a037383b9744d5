"""Run a grid of ft.py runs (a sweep), each in its own folder, then evaluate each under every prompt.

    python sweep.py --prompt none perfect conflicting insufficient --seed 1 2 3 [ft.py flags ...]
    python sweep.py --grid grid.yaml --sweep_dir results/prompts [ft.py flags ...]
    python report.py results/prompts

Any ft.py field given two or more values is swept; fields given one value (and every other ft.py
flag) are passed unchanged to every run. List fields sweep comma-joined combinations:
``--target_modules q_proj,v_proj q_proj,k_proj,v_proj,o_proj``. Each point is launched with
``accelerate launch`` (every configured device), into ``<sweep_dir>/<field>=<value>,...``.

Re-running the same command with the same --sweep_dir resumes the sweep: finished points (their
metrics.json exists) are skipped, unfinished ones continue from their last checkpoint, failed ones
are retried. A failing point is recorded (sweep.json, <point>/sweep_error.txt) and the others go on;
the exit status is non-zero if any point failed. Ctrl-C / SIGTERM checkpoints the running point and stops.

Several points at once (submitit jobs, each the same point command):
    python sweep.py --executor local --parallel 2 ...     # this machine, its GPUs or cores split between points
    python sweep.py --executor slurm --parallel 8 --slurm_partition gpu --slurm_gpus_per_point 1 ...
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls import procs, sweep_jobs, sweeps
from qlora_cls.cli import OneLineArgumentParser, strict_bool
from qlora_cls.errors import UsageError
from qlora_cls.files import atomic_write_json, atomic_write_text, read_json
from qlora_cls.prompts import available_templates, load_template

REPO = Path(__file__).resolve().parent
log = logging.getLogger("sweep")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="sweep.py", description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="YAML/JSON file: field: [values] (swept) or field: value (fixed); "
                                  "command-line fields win")
    p.add_argument("--sweep_dir", help="folder of the sweep (default: results/sweep-<time>); "
                                       "an existing sweep there is resumed")
    p.add_argument("--eval_prompts", nargs="*", default=available_templates(), metavar="PROMPT",
                   help="templates every trained adapter (and the base model) is evaluated under, on the "
                        "run's eval split (default: all shipped: %(default)s); give the flag alone for none")
    p.add_argument("--base_eval", type=strict_bool, default=True, metavar="{true,false}",
                   help="also evaluate the un-tuned base model under each eval prompt, once per sweep (default: true)")
    p.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate",
                   help="accelerate = `accelerate launch` (uses every configured device); python = one plain "
                        "process (default: accelerate)")
    p.add_argument("--accelerate_config", help="accelerate config file passed to `accelerate launch --config_file`")
    p.add_argument("--executor", choices=("sequential", "local", "slurm"), default="sequential",
                   help="sequential = one point after another in this process's children (default); local = "
                        "submitit jobs on this machine, --parallel at once, devices split between them; slurm = "
                        "one Slurm job array (submitit), at most --parallel running at once")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="points at once (local: default 1; slurm: the array's cap, default all points)")
    p.add_argument("--time_min", type=int, metavar="MIN",
                   help="time limit of each point's job in minutes (slurm default 1440; local default none); "
                        "the job checkpoints before it and is requeued")
    p.add_argument("--slurm_partition", help="Slurm partition (grid file: slurm: {partition: ...})")
    p.add_argument("--slurm_gpus_per_point", type=int, metavar="N", help="GPUs of each point's job")
    p.add_argument("--slurm_cpus_per_point", type=int, metavar="N",
                   help="CPUs of each point's job (also its OMP_NUM_THREADS)")
    p.add_argument("--slurm_mem_gb", type=float, metavar="GB", help="memory of each point's job")
    p.add_argument("--slurm_option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable: --slurm_option account=myproj --slurm_option qos=high")
    p.add_argument("--slurm_setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before the point, repeatable (e.g. 'module load cuda')")
    p.add_argument("--dry_run", type=strict_bool, nargs="?", const=True, default=False, metavar="{true,false}",
                   help="validate the grid and list the points, run nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        code = run_sweep(argv)
    except UsageError as exc:
        sys.stderr.write(f"sweep.py: error: {exc}\n")
        raise SystemExit(2)
    if code:
        raise SystemExit(code)
    return 0


def run_sweep(argv: Optional[Sequence[str]]) -> int:
    opts, rest = build_parser().parse_known_args(argv)
    if opts.accelerate_config and not Path(opts.accelerate_config).is_file():
        raise UsageError(f"--accelerate_config {opts.accelerate_config}: no such file")
    grid = sweeps.make_grid(rest, opts.grid)
    pts = sweeps.points(grid)
    sweep_dir = Path(opts.sweep_dir or REPO / "results" / f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UsageError(f"--sweep_dir {sweep_dir} is a file")
    scheduler = check_scheduling(opts, opts.grid, len(pts))
    configs = sweeps.validate(grid, pts, sweep_dir)  # every point's ft.py command line parses, or nothing runs
    for cfg in configs:  # and every evaluation prompt exists for each point's task
        for name in opts.eval_prompts:
            load_template(name, cfg.glue_task)
    if opts.dry_run:
        for p in pts:
            print(f"{p.name}: ft.py {' '.join(p.argv(grid, sweep_dir / p.name))}")
        return 0
    manifest = sweeps.Manifest.open(sweep_dir, grid, pts, configs, opts.eval_prompts)
    with manifest.lock():
        manifest.check_orphans()
        if opts.executor == "sequential":
            return Sweep(manifest, grid, pts, opts).run()
        return SubmititSweep(manifest, grid, pts, opts, scheduler).run()


def check_scheduling(opts, grid_file: Optional[str], n_points: int) -> dict:
    """The executor's settings, checked before anything runs (one usage line each)."""
    slurm_flags = {"partition": opts.slurm_partition, "gpus_per_point": opts.slurm_gpus_per_point,
                   "cpus_per_point": opts.slurm_cpus_per_point, "mem_gb": opts.slurm_mem_gb}
    given = [f"--slurm_{k}" for k, v in slurm_flags.items() if v is not None]
    given += ["--slurm_option"] * bool(opts.slurm_option) + ["--slurm_setup"] * bool(opts.slurm_setup)
    if opts.parallel is not None and opts.parallel < 1:
        raise UsageError(f"--parallel {opts.parallel}: give 1 or more points at once")
    if opts.time_min is not None and opts.time_min < 1:
        raise UsageError(f"--time_min {opts.time_min}: give 1 or more minutes")
    for name in ("slurm_gpus_per_point", "slurm_cpus_per_point", "slurm_mem_gb"):
        if getattr(opts, name) is not None and getattr(opts, name) <= 0:
            raise UsageError(f"--{name} {getattr(opts, name)}: give a positive number")
    if opts.executor == "sequential":
        if opts.parallel not in (None, 1):
            raise UsageError(f"--parallel {opts.parallel} needs --executor local or slurm (sequential runs one point "
                             f"at a time)")
        if given or opts.time_min is not None:
            raise UsageError(f"{(given or ['--time_min'])[0]} needs --executor slurm"
                             f"{' or local' if not given else ''}")
        return {}
    if importlib.util.find_spec("submitit") is None:
        raise UsageError(f"--executor {opts.executor} needs submitit: pip install -r requirements.txt "
                         f"(it pins submitit)")
    if opts.executor == "local":
        if given:
            raise UsageError(f"{given[0]} needs --executor slurm (--executor local splits this machine's devices)")
        return {"slots": sweep_jobs.local_slots(opts.parallel or 1), "time_min": opts.time_min}
    settings = sweeps.slurm_options_from_file(grid_file)
    settings.update({k: v for k, v in slurm_flags.items() if v is not None})
    options = dict(settings.get("options", {}))
    for item in opts.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--slurm_option {item!r}: give KEY=VALUE, e.g. --slurm_option account=myproj")
        options[key.strip().lstrip("-")] = value
    settings["options"] = options
    settings["setup"] = list(settings.get("setup", [])) + list(opts.slurm_setup)
    settings["time_min"] = opts.time_min or settings.get("time_min", 1440)
    settings["parallel"] = opts.parallel or n_points
    for tool in ("sbatch", "squeue", "scancel", "srun"):
        if shutil.which(tool) is None:
            raise UsageError(f"--executor slurm: `{tool}` is not on PATH; run the sweep on a Slurm login node "
                             f"(or --executor local on this machine)")
    return settings


class _Signalled:
    """``run()``: ``_run()`` with SIGINT/SIGTERM going to ``_on_signal`` (the previous handlers restored after)."""

    def run(self) -> int:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)


class Sweep(_Signalled):
    def __init__(self, manifest, grid, pts, opts):
        self.manifest, self.grid, self.points, self.opts = manifest, grid, pts, opts
        self.dir = manifest.dir
        self.proc: Optional[subprocess.Popen] = None
        self.signum = 0

    # -- launching ---------------------------------------------------------------------------------
    def _command(self, script: str, args: list[str]) -> list[str]:
        return sweep_jobs.launch_command(self.opts.launcher, self.opts.accelerate_config, script, args)

    def _on_signal(self, signum, frame):
        # ft.py checkpoints on SIGTERM and exits; a second signal kills the point outright.
        first = not self.signum
        self.signum = self.signum or signum
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if first else signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _launch(self, script: str, args: list[str], log_path: Path, point: Optional[str] = None) -> tuple[int, str]:
        """Run one child in its own process group (so Ctrl-C reaches it only through us); output to log_path."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as out:
            start = out.tell()
            out.write(f"\n### {datetime.now().isoformat(timespec='seconds')} {' '.join(self._command(script, args))}\n")
            out.flush()
            # The child (and, through the variable, ft.py under accelerate launch) gets SIGTERM if we die.
            env = dict(os.environ, PYTHONUNBUFFERED="1", **{procs.ENV: "1"})
            me = os.getpid()
            self.proc = subprocess.Popen(self._command(script, args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=lambda: procs.exit_with_parent(me))
            if point:  # lets a later sweep see that this point is still running if we get SIGKILLed
                self.manifest.update(point, process_group=self.proc.pid)
            code = self.proc.wait()
            sweep_jobs.wait_for_group(self.proc.pid)  # launcher gone; its workers may still be writing a checkpoint
            self.proc = None
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            tail = "\n".join(f.read().splitlines()[-25:])
        return code, tail

    # -- the sweep ---------------------------------------------------------------------------------
    def _run(self) -> int:
        m = self.manifest
        total = len(self.points)
        print(f"sweep: {total} runs in {self.dir} (logs in {self.dir / 'logs'})", flush=True)
        for i, p in enumerate(self.points, 1):
            if self.signum:
                break
            run_dir = self.dir / p.name
            status = m.point(p.name)
            if (run_dir / "metrics.json").is_file():
                if status.get("status") != "finished":
                    m.update(p.name, status="finished")
                print(f"[{i}/{total}] {p.name}: finished earlier, skipped", flush=True)
            else:
                self._train(i, total, p, run_dir)
            if self.signum:
                break
            if (run_dir / "metrics.json").is_file():
                self._evaluate(p, run_dir)
        if self.signum:
            m.save()
            print(f"sweep: interrupted (signal {self.signum}); run the same command again to resume", flush=True)
            return 128 + self.signum
        failed = m.failed()
        summary = m.counts()
        print(f"sweep: {summary}; manifest {m.path}\nreport: python report.py {self.dir}\n"
              f"tensorboard: tensorboard --logdir {self.dir}   (each point named after its folder)", flush=True)
        return 1 if failed else 0

    def _train(self, i: int, total: int, p, run_dir: Path) -> None:
        m = self.manifest
        sweeps.clear_sweep_files(run_dir)
        resume = (run_dir / "config.json").is_file()
        args = p.argv(self.grid, run_dir) + (["--resume"] if resume else [])
        print(f"[{i}/{total}] {p.name}: {'resuming' if resume else 'training'} ...", flush=True)
        m.update(p.name, status="running", started=_now())
        started = time.perf_counter()
        code, tail = self._launch("ft.py", args, self.dir / "logs" / f"{p.name}.log", point=p.name)
        seconds = round(time.perf_counter() - started, 1)
        if code == 0 and (run_dir / "metrics.json").is_file():
            final = read_json(run_dir / "metrics.json").get("final", {})
            shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items()
                              if isinstance(v, float) and not k.startswith("eval_") and k != "padding_efficiency")
            m.update(p.name, status="finished", seconds=seconds, error=None, returncode=0)
            print(f"[{i}/{total}] {p.name}: finished in {seconds:.0f} s  {shown}", flush=True)
        elif self.signum:
            m.update(p.name, status="interrupted", seconds=seconds, returncode=code)
            print(f"[{i}/{total}] {p.name}: interrupted; checkpointed for --resume", flush=True)
        else:
            error = f"exit code {code}\n{tail}"
            m.update(p.name, status="failed", seconds=seconds, returncode=code, error=error)
            if run_dir.is_dir():
                atomic_write_text(run_dir / sweeps.ERROR_FILE, error + "\n")
            last = sweep_jobs.last_error_line(tail)
            print(f"[{i}/{total}] {p.name}: FAILED (exit code {code}): {last}", flush=True)

    def _evaluate(self, p, run_dir: Path) -> None:
        """The trained adapter under every eval prompt, plus (once per sweep) the base model under each.

        Same split and examples as the run's own evaluation; jobs whose metrics.json exists are skipped.
        All jobs of a point share one process (imports cost more than evaluating a small model).
        """
        jobs = sweep_jobs.eval_jobs(run_dir, self.dir, sweeps.base_key(p, self.grid), self.opts.eval_prompts,
                                    self.opts.base_eval)  # (label, out_dir, eval.py args, base key or None)
        if not jobs:
            return
        spec = self.dir / "logs" / f".{p.name}.evals.json"
        results = spec.with_suffix(".results.json")
        results.unlink(missing_ok=True)
        spec.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec, {"jobs": [j[2] for j in jobs], "results": str(results)})
        print(f"    evaluating {p.name}: {', '.join(j[0] for j in jobs)} ...", flush=True)
        code, tail = self._launch("qlora_cls/sweep_eval.py", [str(spec)], self.dir / "logs" / f"{p.name}.evals.log")
        if self.signum:
            return
        errors = read_json(results) if results.is_file() else [f"exit code {code}: {sweep_jobs.last_error_line(tail)}"] * len(jobs)
        point_errors = {}
        for (label, out, _, key), error in zip(jobs, errors):
            if error is None and not (out / "metrics.json").is_file():
                error = "no metrics.json written"
            if key is not None:
                self.manifest.update_base(key, {"status": "failed" if error else "finished", "run": p.name,
                                                "error": error})
            elif error:
                point_errors[label] = error
            if error:
                print(f"    evaluation {label} of {p.name}: FAILED: {error}", flush=True)
        self.manifest.update(p.name, eval_errors=point_errors or None)



class SubmititSweep(_Signalled):
    """``--executor local|slurm``: every unfinished point is one submitit job (:class:`sweep_jobs.PointJob`,
    the same point command as the sequential sweep), this process records their states in the manifest.

    local: at most ``--parallel`` jobs at once, each on its slot's cores/GPUs; a signal stops every job
    (their points checkpoint) and waits for their processes to end. slurm: one job array capped at
    ``--parallel``; a signal cancels the pending tasks and sends SIGTERM to the running ones (their points
    checkpoint), then waits until Slurm lists none of them."""

    POLL_S = 1.0

    def __init__(self, manifest, grid, pts, opts, settings: dict):
        self.manifest, self.grid, self.points, self.opts, self.settings = manifest, grid, pts, opts, settings
        self.dir = manifest.dir
        self.folder = self.dir / "logs" / "submitit"
        self.signum = 0
        self.signals = 0

    def _on_signal(self, signum, frame):
        self.signum = self.signum or signum
        self.signals += 1

    def _run(self) -> int:
        m, total, ex = self.manifest, len(self.points), self.opts.executor
        local = ex == "local"
        width = len(self.settings["slots"]) if local else self.settings["parallel"]
        print(f"sweep: {total} runs in {self.dir} ({ex} executor, at most {width} at once; logs in "
              f"{self.dir / 'logs'})", flush=True)
        todo = []
        for i, p in enumerate(self.points, 1):
            run_dir = self.dir / p.name
            if (run_dir / "metrics.json").is_file() and not sweep_jobs.eval_jobs(
                    run_dir, self.dir, sweeps.base_key(p, self.grid), self.opts.eval_prompts, self._base_eval(p)):
                if m.point(p.name).get("status") != "finished":
                    m.update(p.name, status="finished")
                print(f"[{i}/{total}] {p.name}: finished earlier, skipped", flush=True)
            else:
                todo.append((i, p))
                (self.dir / "logs" / sweep_jobs.JOB_FILE.format(name=p.name)).unlink(missing_ok=True)
        # The jobs unpickle qlora_cls.sweep_jobs.PointJob wherever they start.
        path = os.environ.get("PYTHONPATH", "")
        if str(REPO) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), path) if x)
        if todo and not self.signum:
            (self._run_local if local else self._run_slurm)(todo)
        if self.signum:
            m.save()
            print(f"sweep: interrupted (signal {self.signum}); run the same command again to resume", flush=True)
            return 128 + self.signum
        print(f"sweep: {m.counts()}; manifest {m.path}\nreport: python report.py {self.dir}\n"
              f"tensorboard: tensorboard --logdir {self.dir}   (each point named after its folder)", flush=True)
        return 1 if m.failed() else 0

    # -- jobs ----------------------------------------------------------------------------------------
    def _base_eval(self, p) -> bool:
        """Whether this point's job evaluates the base model: only the first point (grid order) of its base key.
        A fresh head is drawn with the run's seed, so the base figures depend on which point's settings score
        them; the sequential sweep scores them with its first point, and points running at once must not race
        for it (a 4-point parallel test once gave 0.378 against the sequential 0.622 under one prompt)."""
        key = sweeps.base_key(p, self.grid)
        return self.opts.base_eval and next(q for q in self.points if sweeps.base_key(q, self.grid) == key) is p
    def _job(self, p, env: dict, cpus=None, watch=None) -> sweep_jobs.PointJob:
        run_dir = self.dir / p.name
        o = self.opts
        return sweep_jobs.PointJob(
            name=p.name, train=sweep_jobs.launch_command(o.launcher, o.accelerate_config, "ft.py",
                                                         p.argv(self.grid, run_dir)),
            run_dir=str(run_dir), sweep_dir=str(self.dir),
            eval_launch=sweep_jobs.launch_command(o.launcher, o.accelerate_config, "qlora_cls/sweep_eval.py", []),
            eval_prompts=list(o.eval_prompts), base_eval=self._base_eval(p), base_key=sweeps.base_key(p, self.grid),
            env=env, cpus=cpus, watch=watch)

    def _note_started(self, name: str) -> None:
        """The job has started its point: record its process group (a killed sweep's re-run waits for it)."""
        f = self.dir / "logs" / sweep_jobs.JOB_FILE.format(name=name)
        entry = self.manifest.point(name)
        if f.is_file() and entry.get("status") == "queued":
            try:
                info = read_json(f)
            except (OSError, ValueError):
                return
            self.manifest.update(name, status="running", process_group=info.get("process_group"),
                                 host=os.uname().nodename if self.opts.executor == "local" else None)

    def _finish(self, i: int, p, job) -> None:
        """Record a job that ended: its result (train state, evaluations) or why it has none."""
        m, total = self.manifest, len(self.points)
        result, error = None, None
        if job.paths.result_pickle.exists():
            try:
                result = job.result()
            except Exception as exc:  # noqa: BLE001 - the job raised: its traceback is in the submitit log
                error = f"job {job.job_id} raised: {str(exc).strip().splitlines()[-1][:300]}"
        else:
            error = f"job {job.job_id} ended without a result (killed?); see {job.paths.stdout}"
        run_dir = self.dir / p.name
        if result is None:
            if self.signum:
                m.update(p.name, status="interrupted")
                print(f"[{i}/{total}] {p.name}: interrupted; checkpointed for --resume", flush=True)
            else:
                m.update(p.name, status="failed", error=error)
                if run_dir.is_dir():
                    atomic_write_text(run_dir / sweeps.ERROR_FILE, error + "\n")
                print(f"[{i}/{total}] {p.name}: FAILED: {error}", flush=True)
            return
        state, seconds = result["train"], result.get("seconds")
        if state in ("finished", "skipped") and (run_dir / "metrics.json").is_file():
            fields = {"status": "finished", "error": None}
            if state == "finished":
                fields.update(seconds=seconds, returncode=0)
            m.update(p.name, **fields)
            final = read_json(run_dir / "metrics.json").get("final", {})
            shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items()
                              if isinstance(v, float) and not k.startswith("eval_") and k != "padding_efficiency")
            how = f"finished in {seconds:.0f} s" if state == "finished" else "finished earlier"
            print(f"[{i}/{total}] {p.name}: {how} (job {job.job_id})  {shown}", flush=True)
        elif state == "interrupted" or result.get("stopped"):
            m.update(p.name, status="interrupted", seconds=seconds, returncode=result.get("returncode"))
            print(f"[{i}/{total}] {p.name}: interrupted; checkpointed for --resume", flush=True)
        else:
            error = result.get("error") or "no metrics.json written"
            m.update(p.name, status="failed", seconds=seconds, returncode=result.get("returncode"), error=error)
            if run_dir.is_dir():
                atomic_write_text(run_dir / sweeps.ERROR_FILE, error + "\n")
            print(f"[{i}/{total}] {p.name}: FAILED (exit code {result.get('returncode')}): "
                  f"{sweep_jobs.last_error_line(error)}", flush=True)
        if "evals" in result:
            point_errors = {}
            for label, key, err in result["evals"]:
                if key is not None:
                    m.update_base(key, {"status": "failed" if err else "finished", "run": p.name, "error": err})
                elif err:
                    point_errors[label] = err
                if err:
                    print(f"    evaluation {label} of {p.name}: FAILED: {err}", flush=True)
            m.update(p.name, eval_errors=point_errors or None)

    # -- local ---------------------------------------------------------------------------------------
    def _run_local(self, todo) -> None:
        import submitit
        m, total, slots = self.manifest, len(self.points), self.settings["slots"]
        ex = submitit.LocalExecutor(folder=self.folder)
        # No limit unless --time_min (submitit's local default is 2 minutes); gpus_per_node 0: each job's
        # CUDA_VISIBLE_DEVICES is its slot's, set by the job itself.
        ex.update_parameters(timeout_min=self.settings["time_min"] or 60 * 24 * 365, gpus_per_node=0)
        me = (os.getpid(), procs.start_time(os.getpid()))
        free, queue, running = list(range(len(slots))), list(todo), {}
        while queue or running:
            if self.signum:
                self._stop_local(running)
                return
            while queue and free:
                (i, p), slot = queue.pop(0), free.pop(0)
                job = ex.submit(self._job(p, slots[slot]["env"], slots[slot]["cpus"], watch=me))
                m.update(p.name, status="queued", executor="local", job_id=job.job_id,
                         job_started=procs.start_time(int(job.job_id)), slot=slot, cpus=slots[slot]["cpus"],
                         devices=slots[slot]["env"].get("CUDA_VISIBLE_DEVICES"), started=_now())
                cores = f" on cores {','.join(map(str, slots[slot]['cpus']))}" if slots[slot]["cpus"] else ""
                gpus = slots[slot]["env"].get("CUDA_VISIBLE_DEVICES")
                print(f"[{i}/{total}] {p.name}: local job {job.job_id}{cores}{f' GPUs {gpus}' if gpus else ''}",
                      flush=True)
                running[p.name] = (i, p, job, slot)
            for name, (i, p, job, slot) in list(running.items()):
                self._note_started(name)
                if job.done():
                    self._finish(i, p, job)
                    free.append(slot)
                    del running[name]
            time.sleep(self.POLL_S)

    def _stop_local(self, running: dict) -> None:
        """SIGTERM to every job (its point checkpoints); repeated until they end, SIGKILL on a second signal or
        after 5 minutes. Then every point's process group has ended too."""
        deadline = time.monotonic() + 300
        groups = {}
        while running:
            hard = self.signals > 1 or time.monotonic() > deadline
            for name, (i, p, job, slot) in list(running.items()):
                self._note_started(name)
                pgid = self.manifest.point(name).get("process_group")
                if pgid:
                    groups[name] = pgid
                if job.done():
                    if pgid:
                        sweep_jobs.wait_for_group(pgid)
                    self._finish(i, p, job)
                    del running[name]
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(job.job_id), signal.SIGKILL if hard else signal.SIGTERM)
                    if hard and pgid:
                        os.killpg(pgid, signal.SIGKILL)
            time.sleep(self.POLL_S)
        for pgid in groups.values():  # a job killed hard leaves its point's group: wait for it too
            sweep_jobs.wait_for_group(pgid)

    # -- slurm ---------------------------------------------------------------------------------------
    def slurm_executor(self):
        return slurm_executor(self.folder, self.settings, job_name=f"sweep-{self.dir.name}")

    def _run_slurm(self, todo) -> None:
        m = self.manifest
        ex = self.slurm_executor()
        threads = self.settings.get("cpus_per_point")
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        try:
            with ex.batch():
                jobs = [ex.submit(self._job(p, env)) for _, p in todo]
        except Exception as exc:  # noqa: BLE001 - sbatch refused the submission: nothing runs
            raise UsageError(f"--executor slurm: the submission failed: {str(exc).strip().splitlines()[-1][:400]}")
        for (i, p), job in zip(todo, jobs):
            m.update(p.name, status="queued", executor="slurm", job_id=job.job_id, started=_now())
        print(f"sweep: submitted Slurm job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} points, at most "
              f"{self.settings['parallel']} at once); cancel with scancel {jobs[0].job_id.split('_')[0]}", flush=True)
        running = {p.name: (i, p, job) for (i, p), job in zip(todo, jobs)}
        missing: dict[str, int] = {}
        stop_sent, deadline = 0.0, None
        while running:
            if self.signum and deadline is None:
                deadline = time.monotonic() + 300
            if self.signum and time.monotonic() - stop_sent > 5:  # again: a pending task may just have started
                arrays = sorted({job.job_id.split("_")[0] for _, _, job in running.values()})
                hard = self.signals > 1 or time.monotonic() > deadline
                subprocess.run(["scancel", "--state=PENDING", *arrays], capture_output=True)
                subprocess.run(["scancel", *([] if hard else ["--signal=TERM"]), *arrays], capture_output=True)
                stop_sent = time.monotonic()
            try:
                active = procs.slurm_active([job.job_id for _, _, job in running.values()])
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # a busy controller: ask again
                log.warning("%s; retrying", exc)
                time.sleep(self.POLL_S * 5)
                continue
            for name, (i, p, job) in list(running.items()):
                self._note_started(name)
                if job.job_id in active:
                    missing.pop(name, None)
                    if not job.paths.result_pickle.exists():
                        continue
                    result_ready = True  # written, but the task may still be on its way out (or requeued)
                else:
                    missing[name] = missing.get(name, 0) + 1
                    result_ready = job.paths.result_pickle.exists()
                if job.job_id in active or (not result_ready and missing[name] < 3):
                    continue
                self._finish(i, p, job)
                del running[name]
            time.sleep(self.POLL_S * 2)


def slurm_executor(folder: Path, settings: dict, job_name: str = "sweep"):
    """The submitit executor of ``--executor slurm``: one task per point (one node), the point's resources,
    the array cap, ``--requeue`` and submitit's USR2 ahead of the time limit (the point checkpoints and is
    requeued)."""
    import submitit
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"name": job_name, "timeout_min": settings["time_min"], "nodes": 1, "tasks_per_node": 1,
              "slurm_array_parallelism": settings["parallel"],
              "slurm_additional_parameters": {"requeue": True, **settings.get("options", {})}}
    if settings.get("partition"):
        params["slurm_partition"] = settings["partition"]
    if settings.get("gpus_per_point"):
        params["gpus_per_node"] = settings["gpus_per_point"]
    if settings.get("cpus_per_point"):
        params["cpus_per_task"] = settings["cpus_per_point"]
    if settings.get("mem_gb"):
        params["mem_gb"] = settings["mem_gb"]
    if settings.get("setup"):
        params["slurm_setup"] = list(settings["setup"])
    ex.update_parameters(**params)
    return ex


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
