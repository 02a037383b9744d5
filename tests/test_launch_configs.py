"""Every shipped launch config parses with Accelerate's and DeepSpeed's own parsers, and says how to launch it."""
from __future__ import annotations

import json

import pytest

from conftest import REPO

ACCELERATE_CONFIGS = [REPO / "accelerate_config.yaml", *sorted((REPO / "accelerate_configs").glob("*.yaml"))]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_the_expected_configs_ship():
    names = {p.name for p in ACCELERATE_CONFIGS} | {p.name for p in DS_CONFIGS}
    assert {"accelerate_config.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml",
            "multi_node.yaml", "zero2.json", "zero3.json", "zero3_offload.json"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses_and_starts_with_its_launch_command(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    head = path.read_text().split("compute_environment")[0]
    assert f"accelerate launch --config_file {path.relative_to(REPO)}" in head
    if str(config.distributed_type).endswith("DEEPSPEED"):
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), ds_file
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert config.deepspeed_config["zero3_init_flag"] == (stage == 3)  # ZeRO-3 + 4-bit needs ZeRO init
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port and config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_parses_after_our_auto_values_are_filled(path):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    from qlora_cls.config import TrainConfig
    from qlora_cls.preflight import _fill_deepspeed_auto

    raw = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"):
        assert raw[key] == "auto", f"{path.name}: {key} must be 'auto' so ft.py's flags stay the source of truth"
    stage = raw["zero_optimization"]["stage"]
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=stage == 3)
    plugin.set_mixed_precision("no")
    cfg = TrainConfig(batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5)
    _fill_deepspeed_auto(cfg, plugin, world_size=1)
    hidden = 64  # what accelerate fills from the model when it prepares it
    plugin.deepspeed_config_process(must_match=False, **{
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden})
    assert "auto" not in json.dumps(plugin.deepspeed_config)
    parsed = DeepSpeedConfig(plugin.deepspeed_config)  # DeepSpeed's own parser and batch-size assertion
    assert parsed.zero_optimization_stage == stage
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps, parsed.train_batch_size) == (4, 2, 8)
    assert parsed.gradient_clipping == 0.5
    assert (path.name in (REPO / "ds_configs" / "README.md").read_text())


def test_a_fixed_deepspeed_batch_size_that_disagrees_is_refused(tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    from qlora_cls.config import TrainConfig
    from qlora_cls.errors import UsageError
    from qlora_cls.preflight import _fill_deepspeed_auto

    raw = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    raw["train_batch_size"] = 32
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(raw))
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    with pytest.raises(UsageError, match="train_batch_size 32 != --batch_size 8 x --gradient_accumulation_steps 1 x 2"):
        _fill_deepspeed_auto(TrainConfig(), plugin, world_size=2)
