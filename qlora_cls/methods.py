"""What is trained (``--method``): building it on the base model, saving it, loading it back, sizing it.

qlora/lora (LoRA on a 4-bit/16-bit base), dora, ia3, adapter (bottleneck adapters, which PEFT lacks) and full;
the head always trains in full precision. PEFT methods save as stock PEFT; adapter and full save
``weights.safetensors`` + ``qlora_cls_method.json``. ``--param_budget`` picks the largest size that fits.
Details: docs/methods.md#methods-module.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import trainable_state
from .errors import UsageError
from .fast_dropout import use_fast_dropout
from .files import atomic_write_json
from .modeling import (ModelPlan, matches_target, block_outputs, head_modules, is_linear, load_adapter, lora_config,
                       meta_model, parameter_counts, plan_model, task_type, unique_suffixes)

log = logging.getLogger(__name__)

LORA_FAMILY = ("qlora", "lora", "dora")
PEFT_METHODS = LORA_FAMILY + ("ia3",)
SIZE_FIELD = {"qlora": "r", "lora": "r", "dora": "r", "adapter": "adapter_bottleneck"}  # what --param_budget sets
WEIGHTS_FILE = "weights.safetensors"
METHOD_FILE = "qlora_cls_method.json"
PEFT_FILE = "adapter_config.json"


# -- the bottleneck adapter -----------------------------------------------------------------------------
class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(norm(h))))`` in float32 (cast back to ``h``'s dtype); ``up`` is zero at init."""

    def __init__(self, width: int, bottleneck: int, layernorm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layernorm else None
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return h + self.up(nn.functional.gelu(self.down(x))).to(h.dtype)


class AdaptedModule(nn.Module):
    """A base layer (kept as is: a Linear4bit keeps its CPU repack guard) followed by its adapter."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.base_layer(*args, **kwargs))


def _out_width(module) -> int:
    return module.out_features if hasattr(module, "out_features") else module.nf  # nn.Linear / GPT-2 Conv1D


def adapter_targets(model) -> list[str]:
    """Full names of the modules adapters follow: each block's attention output and FFN output projection."""
    found = block_outputs(model)
    layers = getattr(model.config, "num_hidden_layers", None)
    for kind, names in found.items():
        if not names or (layers is not None and len(names) != layers):
            raise UsageError(f"--method adapter: found {len(names)} {kind} output projections in "
                             f"{type(model).__name__} with {layers} layers; this architecture's blocks are not "
                             f"recognised (supported: Llama-style, GPT-2, BERT-style encoders)")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # the model's own order
    return sorted(found["attention"] + found["ffn"], key=order.__getitem__)


def add_adapters(model, bottleneck: int, layernorm: bool, targets: Optional[list[str]] = None) -> list[str]:
    """Wrap each target module (in place) with a ``BottleneckAdapter`` on the module's device; returns the names."""
    targets = adapter_targets(model) if targets is None else targets
    for full in targets:
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        weight = base.weight
        adapter = BottleneckAdapter(_out_width(base), bottleneck, layernorm)
        if weight.device.type != "meta":
            adapter = adapter.to(weight.device)
        setattr(parent, child, AdaptedModule(base, adapter))
    return targets


# -- plan: what is trained, resolved from the architecture (meta device) ---------------------------------------
def plan(cfg, model) -> ModelPlan:
    """Head + targets as config.json records them: LoRA/DoRA/(IA)^3 targets (presets resolved), the adapters'
    modules as PEFT-style suffixes, nothing for full (every weight)."""
    if cfg.method in PEFT_METHODS:
        return plan_model(model, cfg.target_modules)
    head = tuple(head_modules(model))
    if cfg.method == "adapter":
        names = [n for n, _ in model.named_modules()]
        return ModelPlan(head=head, target_modules=tuple(unique_suffixes(adapter_targets(model), names)))
    return ModelPlan(head=head, target_modules=())


def peft_config(cfg, model, plan_: ModelPlan, new_token_ids=()):
    """The PEFT config of a PEFT method for this model (GPT-2's 16-bit Conv1D targets need fan_in_fan_out)."""
    from peft import IA3Config
    from transformers.pytorch_utils import Conv1D
    conv1d = any(isinstance(m, Conv1D) for full, m in model.named_modules()
                 if any(matches_target(t, full) for t in plan_.target_modules))
    if cfg.method in LORA_FAMILY:
        config = lora_config(cfg, plan_, fan_in_fan_out=conv1d, new_token_ids=new_token_ids)
        config.use_dora = cfg.method == "dora"
        return config
    ffn = set(block_outputs(model)["ffn"])
    # A target is a feed-forward one (scaled on its input) when every module it names is an FFN output.
    feedforward = [t for t in plan_.target_modules
                   if all(full in ffn for full, m in model.named_modules() if is_linear(m) and matches_target(t, full))]
    return IA3Config(task_type=task_type(plan_), target_modules=list(plan_.target_modules),
                     feedforward_modules=feedforward, modules_to_save=list(plan_.head) or None, fan_in_fan_out=conv1d)


def add_trainable(model, cfg, plan_: Optional[ModelPlan] = None, new_token_ids=()):
    """The base model (``modeling.load_base_model``) made trainable by ``cfg.method``; the head always trains.
    ``new_token_ids``: tokens a chat template added, whose embedding rows train too (LoRA family only)."""
    plan_ = plan_ or plan(cfg, model)
    if cfg.method in PEFT_METHODS:
        from peft import get_peft_model
        model = get_peft_model(model, peft_config(cfg, model, plan_, new_token_ids))
        if cfg.fast_cpu_dropout and cfg.method in LORA_FAMILY:
            use_fast_dropout(model)
        return model
    _own_method(model, cfg.method, plan_.head, cfg.adapter_bottleneck, cfg.adapter_layernorm)
    return model


def _own_method(model, method: str, head, bottleneck: int, layernorm: bool, wrapped=None) -> None:
    """adapter / full: which parameters train (adapters + head, or all), adapters added in place."""
    model.requires_grad_(method == "full")
    if method == "adapter":
        add_adapters(model, bottleneck, layernorm, wrapped)
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.requires_grad_(True)
    for name in head:
        getattr(model, name).requires_grad_(True)


# -- saving and loading ------------------------------------------------------------------------------------
def save_trainable(model, folder: Path, cfg, state_dict: Optional[dict] = None) -> None:
    """Write the trained weights into ``folder`` (the caller makes it atomic): PEFT's format for the PEFT
    methods, else ``weights.safetensors`` (every trainable parameter, head included) + ``qlora_cls_method.json``."""
    folder = Path(folder)
    if cfg.method in PEFT_METHODS:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        return
    weights = trainable_state(model)
    if state_dict is not None:  # ZeRO-3: the gathered copy of the sharded parameters
        weights = {n: state_dict[n].detach().to("cpu", copy=True).contiguous() for n in weights}
    save_file(weights, folder / WEIGHTS_FILE)
    record = {"format": "qlora-cls", "method": cfg.method, "head_modules": head_modules(model),
              "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
              "parameters": len(weights), "trainable": sum(v.numel() for v in weights.values())}
    if cfg.method == "adapter":
        record.update(bottleneck=cfg.adapter_bottleneck, layernorm=cfg.adapter_layernorm,
                      wrapped=[n for n, m in model.named_modules() if isinstance(m, AdaptedModule)])
    atomic_write_json(folder / METHOD_FILE, record)


def has_saved_weights(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / PEFT_FILE).is_file() or ((folder / METHOD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file())


def load_saved(model, folder: str):
    """The saved weights of ``folder`` on the freshly loaded base model, for evaluation (no grad)."""
    folder = Path(folder)
    if (folder / PEFT_FILE).is_file():
        return load_adapter(model, str(folder))
    record = json.loads((folder / METHOD_FILE).read_text())
    _own_method(model, record["method"], record["head_modules"], record.get("bottleneck"), record.get("layernorm"),
                record.get("wrapped"))
    weights = load_file(folder / WEIGHTS_FILE)
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trained:  # exactly what training trained: nothing left at its fresh init
        odd = sorted(set(weights) ^ trained)
        raise UsageError(f"{folder / WEIGHTS_FILE} does not match a --method {record['method']} model of this base "
                         f"({len(odd)} parameters differ, e.g. {', '.join(odd[:3])}); was it trained on another model?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    model.requires_grad_(False)
    return model.eval()


def config_record(cfg, model) -> tuple[str, dict]:
    """The run folder's record of the method's settings: lora_config.json (LoRA, DoRA), ia3_config.json,
    adapter_settings.json or full_settings.json."""
    if cfg.method in PEFT_METHODS:
        d = model.peft_config["default"].to_dict()
        name = "ia3_config.json" if cfg.method == "ia3" else "lora_config.json"
        return name, {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}
    head = head_modules(model)
    if cfg.method == "adapter":
        return "adapter_settings.json", {
            "method": "adapter", "bottleneck": cfg.adapter_bottleneck, "layernorm": cfg.adapter_layernorm,
            "activation": "gelu", "init": "up-projection zero (identity at start)", "head_modules": head,
            "wrapped": [n for n, m in model.named_modules() if isinstance(m, AdaptedModule)]}
    return "full_settings.json", {"method": "full", "trained": "every parameter", "head_modules": head}


# -- counting on the meta device, and --param_budget ------------------------------------------------------
def meta_trainable(cfg, model_path: str, num_labels: int):
    """The trainable model of ``cfg`` on the meta device (no weights read): counts and shapes as in training."""
    from accelerate import init_empty_weights
    arch = meta_model(model_path, num_labels, cfg.trust_remote_code)
    with init_empty_weights():
        return add_trainable(arch, cfg, plan(cfg, arch))


def count_trainable(cfg, model_path: str, num_labels: int) -> int:
    return parameter_counts(meta_trainable(cfg, model_path, num_labels))["trainable"]


def _largest_size(cfg, model_path: str, num_labels: int) -> int:
    """Full rank for LoRA/DoRA (the smallest side of any target), the hidden width for adapters."""
    arch = meta_model(model_path, num_labels, cfg.trust_remote_code)
    if cfg.method == "adapter":
        return min(_out_width(arch.get_submodule(n)) for n in adapter_targets(arch))
    targets = plan(cfg, arch).target_modules
    sides = [min(m.weight.shape) for full, m in arch.named_modules()
             if is_linear(m) and any(matches_target(t, full) for t in targets)]
    return min(sides)


def resolve_param_budget(cfg, model_path: str, num_labels: int) -> Optional[dict]:
    """``--param_budget``: set the method's size field to the largest that fits; returns what config.json records.

    The count is linear in the size (every LoRA target adds r x (in + out); every adapter 2 x width x b + b),
    so two meta-device counts predict it; the prediction and its neighbour are then counted exactly.
    """
    import dataclasses
    budget = cfg.param_budget
    if budget is None:
        return None
    field = SIZE_FIELD.get(cfg.method)

    def count(size: int) -> int:
        return count_trainable(dataclasses.replace(cfg, **{field: size}) if field else cfg, model_path, num_labels)

    if field is None:  # ia3, full: nothing to choose
        n = count(0)
        if n > budget:
            raise UsageError(f"--param_budget {budget:,}: --method {cfg.method} has no size to choose and trains "
                             f"{n:,} parameters (head included); raise the budget or choose another method")
        return {"budget": budget, "field": None, "value": None, "trainable": n}
    smallest = count(1)
    if smallest > budget:
        raise UsageError(f"--param_budget {budget:,}: even --{field} 1 trains {smallest:,} parameters with --method "
                         f"{cfg.method} (head included); raise the budget, or choose fewer --target_modules")
    per_step = count(2) - smallest
    cap = _largest_size(cfg, model_path, num_labels)
    size = min(cap, 1 + (budget - smallest) // per_step)
    n = count(size)
    while n > budget:  # the prediction is exact for these methods; this keeps it right if one is not linear
        size -= 1
        n = count(size)
    while size < cap and count(size + 1) <= budget:
        size += 1
        n = count(size)
    setattr(cfg, field, size)
    above = count(size + 1) if size < cap else None
    log.info("--param_budget %s: --%s %d trains %s parameters (head included)%s", f"{budget:,}", field, size, f"{n:,}",
             f"; {size + 1} would train {above:,}" if above is not None else f" (capped at {cap}: full size)")
    return {"budget": budget, "field": field, "value": size, "trainable": n, "next_trainable": above, "cap": cap}


def run_tag(cfg) -> str:
    """Part of the default run-folder name: ``r8`` for qlora (as before --method), ``dora-r8``, ``adapter-b64``..."""
    if cfg.method == "qlora":
        return f"r{cfg.r}"
    if cfg.method in LORA_FAMILY:
        return f"{cfg.method}-r{cfg.r}"
    return f"adapter-b{cfg.adapter_bottleneck}" if cfg.method == "adapter" else cfg.method
