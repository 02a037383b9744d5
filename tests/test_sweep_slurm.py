"""sweep.py --executor slurm against a real single-node Slurm (Debian's slurm-wlm + munge), started by the fixture
on this host with its own configuration: a capped job array, a point preempted (submitit's USR2) that checkpoints,
is requeued and resumes, and a cancelled sweep that leaves no job and no process."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port
from test_sweep_parallel import processes_mentioning, wait_until_gone

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # `make test-slurm`


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"tests/test_sweep_slurm.py needs Slurm and munge (missing {', '.join(missing)}): as root, "
                    f"`make test-slurm` installs them (apt-get install slurm-wlm munge, Debian/Ubuntu)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("tests/test_sweep_slurm.py starts slurmd, which needs root; run it as root", pytrace=False)
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf.write_text(f"""ClusterName=qlora-test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=60
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
        if out and out[0] == "idle":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the test Slurm did not come up: {(root / 'slurmctld.log').read_text()[-1500:]}", pytrace=False)
    yield {"conf": conf, "root": root}
    for name in ("slurmd", "slurmctld"):
        pid_file = root / f"{name}.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _squeue() -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True).stdout.splitlines()


def _args(d: Path, model: str, dataset: str, *extra: str) -> list[str]:
    return ["--sweep_dir", str(d), "--executor", "slurm", "--launcher", "python", "--eval_prompts", "none",
            "--base_eval", "false", "--slurm_cpus_per_point", "1", "--time_min", "30", "--model_dir", model,
            "--dataset", dataset, "--max_eval_samples", "16", "--log_every", "2", "--eval_batch_size", "16", *extra]


def test_slurm_array_runs_capped_and_a_preempted_point_resumes(slurm, tiny_model, mrpc, tmp_path):
    d = tmp_path / "s"
    args = _args(d, tiny_model, mrpc, "--seed", "1", "2", "3", "4", "--parallel", "2", "--max_train_samples", "400",
                 "--max_steps", "30")
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    # preempt seed=1 once it trains: submitit's own signal (what `--signal=USR2@90` sends before the limit)
    deadline = time.monotonic() + 300
    most_running = 0
    while proc.poll() is None and not (d / "seed=1" / "train_log.jsonl").is_file() and time.monotonic() < deadline:
        most_running = max(most_running, sum(line.endswith("RUNNING") for line in _squeue()))
        time.sleep(0.1)
    job = json.loads((d / "sweep.json").read_text())["points"]["seed=1"]["job_id"]
    # (scancel may exit non-zero when the task ends while being signalled; the resume below is the check)
    subprocess.run(["scancel", "--signal=USR2", job])
    try:  # a requeued job waits for its begin time (Slurm delays requeues by about two minutes)
        while proc.poll() is None and time.monotonic() < deadline + 600:
            most_running = max(most_running, sum(line.endswith("RUNNING") for line in _squeue()))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "sweep.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert most_running <= 2  # the array's cap
    manifest = json.loads((d / "sweep.json").read_text())["points"]
    arrays = {p["job_id"].split("_")[0] for p in manifest.values()}
    assert len(arrays) == 1 and sorted(p["job_id"].split("_")[1] for p in manifest.values()) == ["0", "1", "2", "3"]
    script = (d / "logs" / "submitit" / f"{arrays.pop()}_submission.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --cpus-per-task=1", "#SBATCH --time=30", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@90"):
        assert line in script, line
    for s in (1, 2, 3, 4):
        run = d / f"seed={s}"
        assert manifest[f"seed={s}"]["status"] == "finished" and manifest[f"seed={s}"]["executor"] == "slurm"
        steps = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
        assert steps == list(range(2, 31, 2)), (s, steps)  # every step logged once
        assert (run / "evals" / "validation-none" / "metrics.json").is_file()
    text = (d / "logs" / "seed=1.log").read_text()
    cmds = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(cmds) == 2 and cmds[1].endswith("--resume") and "resumed from checkpoint-" in text, cmds
    assert not _squeue() and not processes_mentioning(str(d))


def test_cancelled_slurm_sweep_leaves_no_job_and_no_process(slurm, tiny_model, mrpc, tmp_path):
    d = tmp_path / "s"
    args = _args(d, tiny_model, mrpc, "--seed", "1", "2", "3", "--parallel", "2", "--max_train_samples", "400",
                 "--max_steps", "50")
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (d / "seed=1" / "train_log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=400)
    log.close()
    out = (tmp_path / "sweep.log").read_text()
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert not _squeue()  # the pending point cancelled, the running ones ended
    assert not wait_until_gone(str(d), 60)
    manifest = json.loads((d / "sweep.json").read_text())["points"]
    assert manifest["seed=1"]["status"] == "interrupted"
    assert any((d / "seed=1" / "checkpoints").glob("checkpoint-*/progress.json"))  # checkpointed on SIGTERM
    assert manifest["seed=3"]["status"] == "interrupted"  # cancelled while pending: never started
