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


def test_compute_dtype_auto_resolves_per_device():
    cfg = parse([])
    cfg.resolve_compute_dtype("cpu")
    assert cfg.bnb_4bit_compute_dtype == "float32"
    cfg = parse([])
    cfg.resolve_compute_dtype("cuda")
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"
    cfg = parse(["--bnb_4bit_compute_dtype", "bfloat16"])
    cfg.resolve_compute_dtype("cpu")
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"


def test_bare_boolean_flag_means_true():
    assert parse(["--resume", "--load_in_4bit", "false", "--results_path", "r"]).resume is True
    assert parse(["--skip_nonfinite"]).skip_nonfinite is True


def test_shipped_accelerate_config_parses():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig
    cfg = ClusterConfig.from_yaml_file(str(Path(__file__).resolve().parent.parent / "accelerate_config.yaml"))
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.num_processes > 1
