"""sweep.py: a 2 x 2 sweep on the tiny model, interrupted and resumed; failures; bad grids; final protocol."""
import json
import sys

import pytest

import ft
import sweep
from conftest import REPO, sweep_flags, tiny_args

POINTS = ["prompt=none,seed=1", "prompt=none,seed=2", "prompt=perfect,seed=1", "prompt=perfect,seed=2"]


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_points(tiny_sweep):
    d = tiny_sweep["dir"]
    assert tiny_sweep["first_code"] == 128 + 15, tiny_sweep["first_log"][-3000:]
    first = tiny_sweep["first_manifest"]["points"]
    assert first["prompt=none,seed=1"]["status"] == "finished"
    assert first["prompt=perfect,seed=2"]["status"] == "pending"  # never started
    assert tiny_sweep["second_code"] == 0
    manifest = json.loads((d / "sweep.json").read_text())
    assert list(manifest["points"]) == POINTS
    assert all(manifest["points"][p]["status"] == "finished" for p in POINTS)
    assert manifest["grid"]["swept"] == {"prompt": [["none"], ["perfect"]], "seed": [["1"], ["2"]]}
    # finished before the interruption -> not trained again
    for name, mtime in tiny_sweep["first_mtimes"].items():
        assert (d / name / "metrics.json").stat().st_mtime_ns == mtime, name
    # the interrupted point continued in its own folder (with --resume) instead of starting elsewhere
    second_log = (d / "logs" / "prompt=none,seed=2.log").read_text()
    # (it was stopped at step 2 by the fixture: ft.py checkpoints on SIGTERM; the second pass continues it)
    assert first["prompt=none,seed=2"]["status"] == "interrupted"
    assert "--resume" in second_log and "resumed from checkpoint-00000002 (step 2)" in second_log
    interrupted = d / "prompt=none,seed=2"
    assert [json.loads(x)["step"] for x in (interrupted / "train_log.jsonl").read_text().splitlines()] == [2, 4, 6]
    first_cmd = [line for line in second_log.splitlines() if line.startswith("### ")][0]
    assert "accelerate.commands.launch" in first_cmd  # the first pass went through accelerate launch
    for p in POINTS:
        run = d / p
        cfg = json.loads((run / "config.json").read_text())["config"]
        assert cfg["prompt"] == p.split(",")[0].split("=")[1] and cfg["seed"] == int(p[-1])
        assert cfg["max_steps"] == 6 and cfg["results_path"] == str(run)
        steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
        assert sorted(set(steps)) == [2, 4, 6]
        for prompt in ("none", "perfect"):  # every adapter under every eval prompt, same examples
            e = json.loads((run / "evals" / f"validation-{prompt}" / "metrics.json").read_text())
            assert e["prompt"] == prompt and e["examples"] == 37 and not e["base_only"]
        assert list(run.glob("events.out.tfevents.*"))  # one logdir per point, named after its folder
    for prompt in ("none", "perfect"):  # the base model once per sweep and prompt
        e = json.loads((d / "base" / f"validation-{prompt}-base" / "metrics.json").read_text())
        assert e["base_only"] and e["examples"] == 37
    # the adapter evaluated under its own prompt reproduces the run's final metrics
    run = d / "prompt=perfect,seed=1"
    final = json.loads((run / "metrics.json").read_text())["final"]
    e = json.loads((run / "evals/validation-perfect/metrics.json").read_text())["metrics"]
    assert e == {k: final[k] for k in e}


@pytest.mark.slow
def test_tensorboard_names_runs_by_folder_and_hparams_lead_with_the_swept_values(tiny_sweep):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2
    # `tensorboard --logdir <sweep_dir>`: one run per point, named exactly as its folder
    mux = EventMultiplexer().AddRunsFromDirectory(str(tiny_sweep["dir"]))
    mux.Reload()
    assert sorted(mux.Runs()) == sorted(POINTS)
    acc = mux.GetAccumulator("prompt=perfect,seed=2")
    content = acc.PluginTagToContent("hparams")
    data = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in content.values()]
    hparams = {k: v for s in data if s.HasField("session_start_info") for k, v in s.session_start_info.hparams.items()}
    assert hparams["prompt"].string_value == "perfect" and hparams["seed"].number_value == 2
    infos = [h for s in data if s.HasField("experiment") for h in s.experiment.hparam_infos]
    # the swept fields first, then what tells runs apart; not all 46 settings
    assert [h.name for h in infos] == ["prompt", "seed", "model", "task", "method", "r", "lora_alpha",
                                       "target_modules", "lr"]
    # TensorBoard shows the columns marked `differs` first and by default: the swept ones
    assert [h.name for h in infos if h.differs] == ["prompt", "seed"]
    assert hparams["target_modules"].string_value == "q_proj,v_proj"  # the preset as resolved
    assert hparams["method"].string_value == "qlora-4bit-nf4"
    # the baseline is a scalar beside the metric, constant over the run
    baseline = json.loads((tiny_sweep["dir"] / "prompt=perfect,seed=2" / "metrics.json").read_text())["baseline"]
    from tensorboard.util import tensor_util
    values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("eval/baseline_accuracy")]
    assert values and all(abs(v - baseline["metrics"]["accuracy"]) < 1e-6 for v in values)


@pytest.mark.slow
def test_failing_point_is_recorded_and_others_continue(tiny_model, mrpc, tmp_path, capsys):
    d = tmp_path / "s"
    fixed = sweep_flags(tiny_model, mrpc)[2:]  # all but --model_dir, which is swept: one missing, one real
    args = ["--sweep_dir", str(d), "--launcher", "python", "--eval_prompts", "--base_eval", "false",
            "--model_dir", str(tmp_path / "missing"), tiny_model, *fixed]
    with pytest.raises(SystemExit) as exc:
        sweep.main(args)
    assert exc.value.code == 1
    manifest = json.loads((d / "sweep.json").read_text())["points"]
    bad, good = manifest.values()
    assert bad["status"] == "failed" and "no such folder" in bad["error"] and bad["returncode"] == 2
    assert good["status"] == "finished"
    assert "FAILED" in capsys.readouterr().out


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        sweep.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sweep.py: error:"), err
    return err[0]


def test_bad_grids_fail_before_anything_runs(tmp_path, capsys):
    d = str(tmp_path / "s")
    assert "unknown field 'lora_rank'" in _usage_error(["--sweep_dir", d, "--lora_rank", "4", "8"], capsys)
    assert "ft.py --help" in _usage_error(["--sweep_dir", d, "--lora_rank", "4", "8"], capsys)
    assert "empty grid" in _usage_error(["--sweep_dir", d, "--seed", "1"], capsys)
    assert "empty grid" in _usage_error(["--sweep_dir", d], capsys)
    assert "invalid int value: 'x'" in _usage_error(["--sweep_dir", d, "--seed", "1", "x"], capsys)
    assert "--lr must be a positive" in _usage_error(["--sweep_dir", d, "--lr", "1e-4", "-1"], capsys)
    assert "unknown prompt 'nope'" in _usage_error(["--sweep_dir", d, "--prompt", "none", "nope"], capsys)
    assert "set by sweep.py" in _usage_error(["--sweep_dir", d, "--results_path", "a", "b"], capsys)
    assert "same value twice" in _usage_error(["--sweep_dir", d, "--seed", "1", "1"], capsys)
    grid = tmp_path / "grid.yaml"
    grid.write_text("prompt: [none, perfect]\nrank: [4, 8]\n")
    assert "unknown field 'rank'" in _usage_error(["--sweep_dir", d, "--grid", str(grid)], capsys)
    grid.write_text("")
    assert "is empty" in _usage_error(["--sweep_dir", d, "--grid", str(grid)], capsys)
    grid.write_text("r: [4, eight]\n")
    assert "eight" in _usage_error(["--sweep_dir", d, "--grid", str(grid)], capsys)
    assert not (tmp_path / "s").exists()  # nothing was created


def test_grid_forms(tmp_path, capsys):
    from qlora_cls import sweeps
    grid = tmp_path / "grid.yaml"
    grid.write_text("target_modules: [[q_proj, v_proj], [q_proj, k_proj, v_proj, o_proj]]\n"
                    "lr: [1.0e-4, 3.0e-4]\ntrain_splits: [train, validation]\ngradient_checkpointing: false\n")
    g = sweeps.make_grid(["--seed", "7", "--r", "4", "8"], str(grid))
    assert g.swept == {"target_modules": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]],
                       "lr": [["0.0001"], ["0.0003"]], "r": [["4"], ["8"]]}
    assert g.fixed == ["--train_splits", "train", "validation", "--gradient_checkpointing", "false", "--seed", "7"]
    names = [p.name for p in sweeps.points(g)]
    assert len(names) == 8 and names[0] == "target_modules=q_proj+v_proj,lr=0.0001,r=4"
    cli = sweeps.make_grid(["--target_modules", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj", "--seed", "1", "2"],
                           None)
    assert cli.swept["target_modules"] == g.swept["target_modules"]
    configs = sweeps.validate(g, sweeps.points(g), tmp_path)
    assert configs[-1].target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and configs[-1].r == 8
    assert configs[0].train_splits == ["train", "validation"] and configs[0].lr == 1e-4
    presets = sweeps.make_grid(["--target_modules", "attention-qv", "attention", "all-linear"], None)
    assert presets.swept == {"target_modules": [["attention-qv"], ["attention"], ["all-linear"]]}
    # --dry_run lists the points and runs nothing
    assert sweep.main(["--sweep_dir", str(tmp_path / "dry"), "--dry_run", "--r", "4", "8"]) == 0
    assert "r=4: ft.py" in capsys.readouterr().out and not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_resuming_with_a_different_grid_is_refused(tiny_sweep, capsys, tiny_model, mrpc):
    d = str(tiny_sweep["dir"])
    before = (tiny_sweep["dir"] / "sweep.json").read_text()
    err = _usage_error(["--sweep_dir", d, "--prompt", "none", "perfect", "--seed", "1", "2",
                        *sweep_flags(tiny_model, mrpc)[:-2], "--eval_batch_size", "8"], capsys)
    assert "holds a different sweep" in err and "eval_batch_size" in err
    assert (tiny_sweep["dir"] / "sweep.json").read_text() == before


@pytest.mark.slow
def test_final_protocol_trains_on_validation_and_selects_no_epoch(tiny_model, mrpc, tmp_path, caplog):
    caplog.set_level("INFO", logger="ft")
    run = tmp_path / "final"
    summary = ft.main(tiny_args(tiny_model, mrpc, run, "--train_splits", "train", "validation",
                                "--max_train_samples", "16", "--epochs", "2", "--max_steps", "8"))
    assert summary["eval_split"] == "test" and summary["final"]["split"] == "test"
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1]
    assert summary["best_epoch"] is None and not summary["has_adapter_best"]
    assert not (run / "adapter_best").exists() and (run / "predictions_test.csv").is_file()
    assert "no best-epoch selection" in caplog.text
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["train_examples"] == 32


def test_final_protocol_refuses_selecting_on_trained_data(tiny_model, mrpc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ft.main(tiny_args(tiny_model, mrpc, tmp_path / "r", "--train_splits", "train", "validation",
                          "--eval_split", "validation"))
    assert exc.value.code == 2
    assert "it is also trained on" in capsys.readouterr().err


def test_point_left_running_by_a_killed_sweep_is_not_started_twice(tmp_path, capsys):
    import os
    args = ["--sweep_dir", str(tmp_path / "s"), "--seed", "1", "2", "--model_dir", str(tmp_path / "m")]
    assert sweep.main([*args, "--dry_run"]) == 0
    from qlora_cls import sweeps
    g = sweeps.make_grid(["--seed", "1", "2", "--model_dir", str(tmp_path / "m")], None)
    pts = sweeps.points(g)
    m = sweeps.Manifest.open(tmp_path / "s", g, pts, sweeps.validate(g, pts, tmp_path / "s"), [])
    m.update("seed=1", status="running", process_group=os.getpgrp())  # a live group: this test's own
    assert "seed=1 is still running" in _usage_error(args, capsys)


def test_a_finished_point_left_as_a_zombie_is_not_running():
    """In a container whose PID 1 reaps late, an ended point is a zombie that still answers kill(pid, 0)."""
    import os
    import subprocess
    import time

    from qlora_cls.procs import group_alive
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait for it to end without reaping it (no wait()/poll())
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    os.killpg(child.pid, 0)  # the zombie still answers the signal test ...
    assert not group_alive(child.pid)  # ... but is not counted as running
    assert group_alive(os.getpgrp())  # this test's own group is
    child.wait()


@pytest.mark.slow
def test_sigkilled_sweep_leaves_no_orphan_and_resumes(tiny_model, mrpc, tmp_path):
    """kill -9 of sweep.py mid-point: the point gets SIGTERM, checkpoints and ends within a minute; the
    same command then resumes it from that checkpoint and finishes."""
    import signal
    import subprocess
    import time

    from qlora_cls.procs import group_alive
    d = tmp_path / "s"
    args = ["--sweep_dir", str(d), "--launcher", "python", "--eval_prompts", "--base_eval", "false",
            "--seed", "1", "2", "--model_dir", tiny_model, "--dataset", mrpc, "--max_train_samples", "400",
            "--max_eval_samples", "16", "--max_steps", "50", "--log_every", "2"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT)
        point_log = d / "seed=1" / "train_log.jsonl"
        deadline = time.monotonic() + 300
        while proc.poll() is None and not point_log.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    pgid = json.loads((d / "sweep.json").read_text())["points"]["seed=1"]["process_group"]
    deadline = time.monotonic() + 60
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(pgid), f"point process group {pgid} outlived its sweep"
    assert json.loads((d / "sweep.json").read_text())["points"]["seed=1"]["status"] == "running"  # as left
    assert any((d / "seed=1" / "checkpoints").glob("checkpoint-*/progress.json"))  # written on SIGTERM
    assert not (d / "seed=1" / "metrics.json").exists()
    assert sweep.main(args) == 0
    manifest = json.loads((d / "sweep.json").read_text())
    assert all(p["status"] == "finished" for p in manifest["points"].values())
    second = (d / "logs" / "seed=1.log").read_text()
    assert "--resume" in second and "resumed from checkpoint-" in second
    steps = [json.loads(line)["step"] for line in (d / "seed=1" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 51, 2))  # every step logged once, none lost or repeated
