"""Multi-node launch: two "machines" on one host (`accelerate launch --num_machines 2 --machine_rank 0|1`, one CPU
process each, gloo) train together and match one machine with two processes; the Slurm template's commands."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, tiny_args

TEMPLATE = REPO / "accelerate_configs" / "multi_node.sbatch"


def _launch(launch_flags: list[str], run: Path, dump: Path, model: str, dataset: str) -> subprocess.Popen:
    dump.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RANK_DUMP_DIR=str(dump))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
           "--dynamo_backend", "no", *launch_flags, str(REPO / "tests" / "ft_rank_dump.py"),
           *tiny_args(model, dataset, run, "--max_steps", "3", "--log_every", "1")]
    return subprocess.Popen(cmd, cwd=run.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_machines_on_one_host_match_one_machine_with_two_processes(tiny_model, mrpc, tmp_path):
    from safetensors.torch import load_file
    one = tmp_path / "one-machine"
    _finish(_launch(["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())], one,
                    tmp_path / "dump1", tiny_model, mrpc))
    two = tmp_path / "two-machines"
    port = free_port()
    machines = [_launch(["--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
                        two, tmp_path / "dump2", tiny_model, mrpc) for rank in (0, 1)]
    for proc in machines:
        _finish(proc)
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["environment"]["world_size"] == 2
    # the same training: per-step losses, final metrics, predictions and every rank's final weights
    logs = [[json.loads(line) for line in (r / "train_log.jsonl").read_text().splitlines()] for r in (one, two)]
    assert [e["step"] for e in logs[1]] == [e["step"] for e in logs[0]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    finals = [json.loads((r / "metrics.json").read_text())["final"] for r in (one, two)]
    for k in ("accuracy", "f1"):
        assert finals[1][k] == pytest.approx(finals[0][k], abs=1e-12)
    assert (two / "predictions_validation.csv").read_text() == (one / "predictions_validation.csv").read_text() \
        or _close_csv(one / "predictions_validation.csv", two / "predictions_validation.csv")
    for rank in (0, 1):
        a = load_file(tmp_path / "dump1" / f"rank{rank}.safetensors")
        b = load_file(tmp_path / "dump2" / f"rank{rank}.safetensors")
        assert a.keys() == b.keys() and all(((a[k] - b[k]).abs().max() <= 1e-6) for k in a), rank


def _close_csv(a: Path, b: Path) -> bool:
    ra, rb = (p.read_text().splitlines() for p in (a, b))
    assert len(ra) == len(rb)
    for x, y in zip(ra[1:], rb[1:]):
        xs, ys = x.split(","), y.split(",")
        assert xs[:3] == ys[:3]  # idx, label, prediction
        assert [float(v) for v in xs[3:]] == pytest.approx([float(v) for v in ys[3:]], abs=1e-6)
    return True


def test_sbatch_template_gives_each_node_its_rank_and_the_first_host_as_main(tmp_path):
    """Runs the template with a stand-in `srun` that starts its command once per node (SLURM_NODEID 0 and 1) and a
    stand-in python that records its arguments; `scontrol` is Slurm's own where installed, else a stand-in that
    expands the node list the test gives."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\n"
                                  "while [[ \"$1\" == --* ]]; do shift; done\n"
                                  "for n in 0 1; do SLURM_NODEID=$n SLURM_PROCID=$n \"$@\" || exit 1; done\n")
    (bin_dir / "fakepython").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                        "with open(os.environ['RECORD'], 'a') as f:\n"
                                        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    if not subprocess.run(["bash", "-c", "command -v scontrol"], capture_output=True).returncode == 0:
        (bin_dir / "scontrol").write_text("#!/bin/bash\necho node07; echo node08\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    record = tmp_path / "commands.jsonl"
    run = tmp_path / "run"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="node[07-08]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", PYTHON=str(bin_dir / "fakepython"), RECORD=str(record))
    env.pop("MAIN_PORT", None)
    subprocess.run(["bash", str(TEMPLATE), "--model_dir", "m", "--results_path", str(run)], cwd=REPO, env=env,
                   check=True, timeout=60)
    commands = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(commands) == 2
    for rank, cmd in enumerate(commands):
        assert cmd[:2] == ["-m", "accelerate.commands.launch"]
        flags = dict(zip(cmd[2:-5:2], cmd[3:-5:2]))
        assert flags == {"--config_file": "accelerate_configs/multi_node.yaml", "--num_machines": "2",
                         "--machine_rank": str(rank), "--main_process_ip": "node07", "--main_process_port": "29500",
                         "--num_processes": "8"}
        assert cmd[-5:] == ["ft.py", "--model_dir", "m", "--results_path", str(run)]
    # a requeued job (the run folder holds a started, unfinished run) resumes it
    run.mkdir()
    (run / "config.json").write_text("{}")
    record.unlink()
    subprocess.run(["bash", str(TEMPLATE), "--model_dir", "m", "--results_path", str(run)], cwd=REPO, env=env,
                   check=True, timeout=60)
    assert all(json.loads(line)[-1] == "--resume" for line in record.read_text().splitlines())
    # the #SBATCH header asks for what the command assumes: one task per node, SIGTERM ahead of the limit, requeue
    header = [line for line in TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH")]
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --signal=TERM@120", "#SBATCH --requeue"):
        assert line in header
