import json

import pytest

from conftest import REPO
from qlora_cls.cli import parse_dataclass, strict_bool
from qlora_cls.config import TrainConfig
from qlora_cls.errors import UsageError


def parse(argv):
    return parse_dataclass(TrainConfig, argv, "ft.py", "")


def test_defaults_are_the_reference_experiment():
    cfg = parse([])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert cfg.target_modules == ["attention-qv"]
    # ... which on the reference architecture (Llama-3-8B's config, shapes only) is q_proj and v_proj
    from qlora_cls.modeling import meta_model, plan_model
    plan = plan_model(meta_model(str(REPO / "bench/configs/llama3-8b"), 2), cfg.target_modules)
    assert plan.target_modules == ("q_proj", "v_proj") and plan.head == ("score",)
    assert cfg.load_in_4bit and cfg.bnb_4bit_use_double_quant and cfg.bnb_4bit_quant_type == "nf4"
    assert (cfg.optim, cfg.lr, cfg.batch_size, cfg.warmup_ratio, cfg.seed) == ("adamw_8bit", 3e-4, 8, 0.06, 42)
    assert cfg.model_dir is None  # the embedded SmolLM2


@pytest.mark.parametrize("word,value", [("false", False), ("False", False), ("0", False), ("no", False),
                                        ("true", True), ("1", True), ("yes", True)])
def test_booleans_mean_what_they_say(word, value):
    assert parse(["--load_in_4bit", word]).load_in_4bit is value


def test_bad_boolean_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--load_in_4bit", "maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--load_in_4bit" in err and "maybe" in err and len(err.strip().splitlines()) == 1


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit):
        parse(["--lora_rank", "4"])
    assert "--lora_rank" in capsys.readouterr().err


def test_lora_flags_are_not_ignored():
    cfg = parse(["--r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--target_modules", "q_proj", "k_proj"])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (16, 32, 0.05, ["q_proj", "k_proj"])
    from qlora_cls.modeling import ModelPlan, lora_config
    lc = lora_config(cfg, ModelPlan(head=("score",), target_modules=tuple(cfg.target_modules)))
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, set(lc.target_modules)) == (16, 32, 0.05, {"q_proj", "k_proj"})


@pytest.mark.parametrize("argv,needle", [
    (["--r", "0"], "--r"), (["--lr", "-1"], "--lr"), (["--batch_size", "0"], "--batch_size"),
    (["--lora_dropout", "1"], "--lora_dropout"), (["--task", "nope"], "unknown --task"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio"), (["--eval_batch_size", "0"], "--eval_batch_size"),
])
def test_invalid_values_rejected(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse(argv)


def test_bad_dtype_name_rejected(capsys):
    with pytest.raises(SystemExit):
        parse(["--bnb_4bit_compute_dtype", "float8"])
    assert "float8" in capsys.readouterr().err


def test_config_file_then_cli_wins(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("r: 4\nlr: 0.001\nload_in_4bit: 'false'\ntarget_modules: [q_proj, k_proj, v_proj, o_proj]\n")
    cfg = parse(["--config", str(f), "--r", "32"])
    assert cfg.r == 32 and cfg.lr == 0.001 and cfg.load_in_4bit is False
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"epochs": 3}))
    assert parse(["--config", str(j)]).epochs == 3


def test_config_file_unknown_field_and_wrong_type(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rank: 4\n")
    with pytest.raises(UsageError, match="rank"):
        parse(["--config", str(f)])
    f.write_text("r: four\n")
    with pytest.raises(UsageError, match="--r"):
        parse(["--config", str(f)])


def test_strict_bool_function():
    assert strict_bool("off") is False
    with pytest.raises(ValueError):
        strict_bool("maybe")


def _measured(monkeypatch, tmp_path, float32_gflops, bfloat16_gflops):
    """A CPU whose probe GEMMs run at these rates (a fresh cache home, so nothing cached decides)."""
    import torch
    from qlora_cls import hardware
    monkeypatch.setenv("QLORA_CLS_HOME", str(tmp_path / "home"))
    rates = {torch.float32: float32_gflops, torch.bfloat16: bfloat16_gflops}
    monkeypatch.setattr(hardware, "gemm_gflops", lambda dtype, repeats=5: rates[dtype])


@pytest.mark.parametrize("float32_gflops,bfloat16_gflops,expected", [
    (175, 1000, "bfloat16"),  # Intel with AMX-BF16: steps 1.8x faster in bf16
    (55, 430, "bfloat16"),  # AMD EPYC, AVX512-BF16 without AMX: steps 2.4x faster in bf16
    (175, 102, "float32"),  # the same Intel with oneDNN capped at AVX512-BF16: steps 1.4x slower
    (175, 17, "float32"),  # torch's reference bf16 kernel (no AVX512, or oneDNN off)
    (100, 149, "float32"), (100, 150, "bfloat16"),  # bf16 must be 1.5x as fast: it also costs precision
])
def test_compute_dtype_auto_resolves_per_device(monkeypatch, tmp_path, float32_gflops, bfloat16_gflops, expected):
    _measured(monkeypatch, tmp_path, float32_gflops, bfloat16_gflops)
    cfg = parse([])
    cfg.resolve_auto("cpu")
    assert cfg.bnb_4bit_compute_dtype == expected
    cfg = parse([])
    cfg.resolve_auto("cuda")
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"
    cfg = parse(["--bnb_4bit_compute_dtype", "bfloat16"])
    cfg.resolve_auto("cpu")
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"
    cfg = parse(["--bnb_4bit_compute_dtype", "float32"])
    cfg.resolve_auto("cuda")
    assert cfg.bnb_4bit_compute_dtype == "float32"


def test_cpu_name_tells_apart_cpus_that_report_the_same_model_name():
    """Two machines here both reported ``model name: AMD EPYC`` and ran bf16 GEMMs 2.4x apart: the probe cache
    (keyed by this name) must not hand one machine's measurement to the other."""
    from qlora_cls.hardware import cpuinfo_fields

    def cpu_name(text):
        from qlora_cls.hardware import cpu_name
        return cpu_name(cpuinfo_fields(text))
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n"
             "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu avx512_bf16\n")
    genoa = block.format(n=0, model=17) + "\n" + block.format(n=1, model=99)  # only the first CPU's block counts
    other = block.format(n=0, model=2)
    assert cpu_name(genoa) == "AMD EPYC (family 25 model 17 stepping 1)"
    assert cpu_name(other) == "AMD EPYC (family 25 model 2 stepping 1)"
    assert cpu_name("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"  # no signature lines: the name alone
    assert cpu_name("processor\t: 0\nfeatures\t: fp asimd\n") is None  # an ARM cpuinfo without a name
    assert cpuinfo_fields(genoa)["flags"] == "fpu avx512_bf16" and cpuinfo_fields(genoa)["model"] == "17"


def test_the_cpu_probe_measures_once_per_set_up_and_reads_its_cache(monkeypatch, tmp_path):
    import torch
    from qlora_cls import hardware
    monkeypatch.setenv("QLORA_CLS_HOME", str(tmp_path))
    first = hardware.cpu_dtype_probe()
    assert not first["cached"] and first["float32_gflops"] > 0 and first["bfloat16_gflops"] > 0
    assert first["choice"] == ("bfloat16" if first["bfloat16_gflops"] >= 1.5 * first["float32_gflops"] else "float32")
    saved = json.loads((tmp_path / "cpu_compute_dtype.json").read_text())
    assert list(saved) == [first["key"]] and f"threads {torch.get_num_threads()}" in first["key"]
    again = hardware.cpu_dtype_probe()
    assert again["cached"] and again["float32_gflops"] == first["float32_gflops"]
    # The cached figures decide (nothing is measured again): swap them and the choice follows.
    saved[first["key"]] = {"float32_gflops": 100.0, "bfloat16_gflops": 1000.0, "shape": [1, 1, 1]}
    (tmp_path / "cpu_compute_dtype.json").write_text(json.dumps(saved))
    assert hardware.cpu_dtype_probe()["choice"] == "bfloat16"
    saved[first["key"]] = {"float32_gflops": 1000.0, "bfloat16_gflops": 100.0, "shape": [1, 1, 1]}
    (tmp_path / "cpu_compute_dtype.json").write_text(json.dumps(saved))
    assert hardware.cpu_dtype_probe()["choice"] == "float32"


def test_compute_dtype_auto_is_float32_with_onednn_off(monkeypatch, tmp_path):
    """oneDNN off is another set-up (its own measurement): torch's reference bf16 kernel is slow on any CPU."""
    import torch
    from qlora_cls import hardware
    monkeypatch.setenv("QLORA_CLS_HOME", str(tmp_path))
    with torch.backends.mkldnn.flags(enabled=False):
        probe = hardware.cpu_dtype_probe()
        cfg = parse([])
        cfg.resolve_auto("cpu")
    assert "onednn=False" in probe["key"] and probe["bfloat16_gflops"] < probe["float32_gflops"]
    assert cfg.bnb_4bit_compute_dtype == "float32"


@pytest.mark.parametrize("argv,value", [([], "auto"), (["--gradient_checkpointing"], True),
                                        (["--gradient_checkpointing", "false"], False),
                                        (["--gradient_checkpointing", "Auto"], "auto"),
                                        (["--gradient_checkpointing", "1"], True)])
def test_gradient_checkpointing_auto_or_strict_boolean(argv, value):
    cfg = parse(argv)
    assert cfg.gradient_checkpointing == value and type(cfg.gradient_checkpointing) is type(value)
    cfg.resolve_auto("cpu")  # auto: off on a CPU, decided with the compute dtype
    assert cfg.gradient_checkpointing is (value if isinstance(value, bool) else False)


def test_gradient_checkpointing_bad_word_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse(["--gradient_checkpointing", "maybe"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--gradient_checkpointing" in err and len(err.strip().splitlines()) == 1
    f = tmp_path / "run.yaml"
    f.write_text("gradient_checkpointing: sometimes\n")
    with pytest.raises(UsageError, match="--gradient_checkpointing: 'sometimes' is not auto or a boolean"):
        parse(["--config", str(f)])
    f.write_text("gradient_checkpointing: false\n")
    assert parse(["--config", str(f)]).gradient_checkpointing is False
    with pytest.raises(UsageError, match="--gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="maybe")


def test_gradient_checkpointing_auto_on_a_gpu_follows_the_memory_estimate(monkeypatch, tiny_model):
    """On a GPU, auto = on when the dry-run estimate without checkpointing exceeds half the device's memory."""
    import types

    import torch

    from qlora_cls import memory
    accelerator = types.SimpleNamespace(device=torch.device("cuda", 0), num_processes=1,
                                        state=types.SimpleNamespace(deepspeed_plugin=None), distributed_type="NO")
    monkeypatch.setattr(memory, "zero_stage", lambda acc: 0)
    need = memory.estimate(TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="bfloat16",
                                       gradient_checkpointing=False), tiny_model, 2, 100, 100)["per_process_bytes"]
    for capacity, expected in ((need / memory.GPU_MEMORY_SHARE * 1.01, False),
                               (need / memory.GPU_MEMORY_SHARE * 0.99, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, c=capacity: types.SimpleNamespace(total_memory=int(c)))
        cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="bfloat16")
        memory.resolve_gradient_checkpointing(cfg, tiny_model, 2, 100, accelerator)
        assert cfg.gradient_checkpointing is expected
    cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="bfloat16", gradient_checkpointing=False)
    memory.resolve_gradient_checkpointing(cfg, tiny_model, 2, 100, accelerator)  # explicit values stay
    assert cfg.gradient_checkpointing is False


def test_auto_under_resume_keeps_what_the_run_was_started_with(tmp_path, monkeypatch):
    """A run saved before the defaults changed (float32 + checkpointing on a CPU) resumes with them."""
    from dataclasses import asdict
    _measured(monkeypatch, tmp_path, 175, 1000)
    old = TrainConfig(bnb_4bit_compute_dtype="float32", gradient_checkpointing=True, results_path=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"config": asdict(old)}))
    cfg = parse(["--results_path", str(tmp_path), "--resume"])
    cfg.resolve_auto("cpu")
    assert (cfg.bnb_4bit_compute_dtype, cfg.gradient_checkpointing) == ("float32", True)
    cfg = parse(["--results_path", str(tmp_path)])  # a new run (no --resume) decides afresh
    cfg.resolve_auto("cpu")
    assert (cfg.bnb_4bit_compute_dtype, cfg.gradient_checkpointing) == ("bfloat16", False)


def test_bare_boolean_flag_means_true():
    assert parse(["--resume", "--load_in_4bit", "false", "--results_path", "r"]).resume is True
    assert parse(["--skip_nonfinite"]).skip_nonfinite is True


def test_shipped_accelerate_config_parses():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig
    cfg = ClusterConfig.from_yaml_file(str(Path(__file__).resolve().parent.parent / "accelerate_config.yaml"))
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.num_processes > 1


def test_command_line_wins_over_config_file_even_at_the_default(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("r: 4\nload_in_4bit: false\nmax_steps: 7\n")
    cfg = parse(["--config", str(f), "--r", "8", "--max_steps", "none"])  # 8 is also the field's default
    assert (cfg.r, cfg.load_in_4bit, cfg.max_steps) == (8, False, None)
    # the spellings HfArgumentParser adds mean the same fields
    assert parse(["--no_group_by_length"]).group_by_length is False
    assert parse(["--load-in-4bit", "off", "--lora-alpha", "4"]).lora_alpha == 4
