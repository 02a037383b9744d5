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


def _cpu_with(monkeypatch, flags: set[str], isa_cap=None):
    from qlora_cls import hardware
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    for var in hardware.ISA_CAP_VARS:
        monkeypatch.delenv(var, raising=False)
    if isa_cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)


@pytest.mark.parametrize("flags,isa_cap,expected", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, None, "bfloat16"),  # AMX: bf16 ~1.7x faster
    ({"avx2", "avx512f", "avx512_bf16"}, None, "float32"),  # AVX512-BF16 alone: bf16 steps measured 1.4x slower
    ({"avx2", "avx512f"}, None, "float32"),  # oneDNN emulates bf16
    ({"avx2"}, None, "float32"),  # torch's reference bf16 kernel: ~25x slower steps
    ({"avx512_bf16", "amx_bf16"}, "AVX512_CORE_BF16", "float32"),  # oneDNN kept off the AMX tiles
    ({"avx512_bf16", "amx_bf16"}, "avx512_core_amx", "bfloat16"),
])
def test_compute_dtype_auto_resolves_per_device(monkeypatch, flags, isa_cap, expected):
    _cpu_with(monkeypatch, flags, isa_cap)
    cfg = parse([])
    cfg.resolve_compute_dtype("cpu")
    assert cfg.bnb_4bit_compute_dtype == expected
    cfg = parse([])
    cfg.resolve_compute_dtype("cuda")
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"
    cfg = parse(["--bnb_4bit_compute_dtype", "bfloat16"])
    cfg.resolve_compute_dtype("cpu")
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"
    cfg = parse(["--bnb_4bit_compute_dtype", "float32"])
    cfg.resolve_compute_dtype("cuda")
    assert cfg.bnb_4bit_compute_dtype == "float32"


def test_compute_dtype_auto_is_float32_with_onednn_off(monkeypatch):
    import torch
    _cpu_with(monkeypatch, {"avx512_bf16", "amx_bf16"})
    with torch.backends.mkldnn.flags(enabled=False):  # torch's bf16 GEMM is then its slow reference kernel
        cfg = parse([])
        cfg.resolve_compute_dtype("cpu")
    assert cfg.bnb_4bit_compute_dtype == "float32"


@pytest.mark.parametrize("argv,value", [([], "auto"), (["--gradient_checkpointing"], True),
                                        (["--gradient_checkpointing", "false"], False),
                                        (["--gradient_checkpointing", "Auto"], "auto"),
                                        (["--gradient_checkpointing", "1"], True)])
def test_gradient_checkpointing_auto_or_strict_boolean(argv, value):
    cfg = parse(argv)
    assert cfg.gradient_checkpointing == value and type(cfg.gradient_checkpointing) is type(value)
    cfg.resolve_compute_dtype("cpu")  # auto: off on a CPU, decided with the compute dtype
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

    from qlora_cls import hardware, memory
    accelerator = types.SimpleNamespace(device=torch.device("cuda", 0), num_processes=1,
                                        state=types.SimpleNamespace(deepspeed_plugin=None), distributed_type="NO")
    import qlora_cls.preflight as preflight
    monkeypatch.setattr(preflight, "zero_stage", lambda acc: 0)
    need = memory.estimate(TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="bfloat16",
                                       gradient_checkpointing=False), tiny_model, 2, 100, 100)["per_process_bytes"]
    for capacity, expected in ((need / hardware.GPU_MEMORY_SHARE * 1.01, False),
                               (need / hardware.GPU_MEMORY_SHARE * 0.99, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, c=capacity: types.SimpleNamespace(total_memory=int(c)))
        cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="bfloat16")
        hardware.resolve_gradient_checkpointing(cfg, tiny_model, 2, 100, accelerator)
        assert cfg.gradient_checkpointing is expected
    cfg = TrainConfig(model_dir=tiny_model, bnb_4bit_compute_dtype="bfloat16", gradient_checkpointing=False)
    hardware.resolve_gradient_checkpointing(cfg, tiny_model, 2, 100, accelerator)  # explicit values stay
    assert cfg.gradient_checkpointing is False


def test_auto_under_resume_keeps_what_the_run_was_started_with(tmp_path, monkeypatch):
    """A run saved before the defaults changed (float32 + checkpointing on a CPU) resumes with them."""
    from dataclasses import asdict
    _cpu_with(monkeypatch, {"avx512_bf16", "amx_bf16"})
    old = TrainConfig(bnb_4bit_compute_dtype="float32", gradient_checkpointing=True, results_path=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"config": asdict(old)}))
    cfg = parse(["--results_path", str(tmp_path), "--resume"])
    cfg.resolve_compute_dtype("cpu")
    assert (cfg.bnb_4bit_compute_dtype, cfg.gradient_checkpointing) == ("float32", True)
    cfg = parse(["--results_path", str(tmp_path)])  # a new run (no --resume) decides afresh
    cfg.resolve_compute_dtype("cpu")
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
