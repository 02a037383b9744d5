"""The fast evaluation path: de-quantize once (and merge LoRA), and reuse the prompt's shared prefix.

Evaluation pays two fixed costs once instead of per batch: an inference copy (``inference_copy``) shares every
unchanged tensor with the training model and de-quantizes each 4-bit layer once (float32 LoRA merged), and a
decoder's shared prompt prefix runs once (``prefix.py``); on a CPU the copy's gated MLPs and grouped-query
attention are rewritten with the same arithmetic. Not merging.py's public route: it works in place and cannot
keep the float32 stream in 16-bit compute. ``--fast_eval auto`` takes it only where the tests run it for real
(``config.VERIFIED_FAST_PATHS``). Design and figures: docs/speed-and-memory.md#fast_eval-module.
"""
from __future__ import annotations

import copy
import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .prefix import common_prefix_length, forward_rest, hf_model, is_causal_decoder, prefix_layers

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.5  # the copy may use at most this share of the free memory


class NotSupported(Exception):
    """The model has a layer the fast path does not know how to de-quantize or merge exactly."""


class DequantizedLinear(torch.nn.Linear):
    """A ``Linear4bit`` with its weight de-quantized once; casts like ``Linear4bit.forward``.

    ``Linear4bit`` computes in ``compute_dtype`` and returns the input's dtype (the float32 residual
    stream after ``prepare_model_for_kbit_training``); so does this layer.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)


def _layer_classes() -> tuple:
    """bitsandbytes' ``Linear4bit``, PEFT's ``LoraLayer`` and ``BaseTunerLayer``; for a library not imported, an
    empty tuple (``isinstance`` matches nothing). A model can hold their layers only once that library is
    imported; a merged folder is plain transformers, and predicting with it must not import either
    (tests/test_predict.py)."""
    linear4bit = ()
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb
        linear4bit = bnb.nn.Linear4bit
    if "peft" not in sys.modules:
        return linear4bit, (), ()
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    return linear4bit, LoraLayer, BaseTunerLayer


def _compute_dtype(layer) -> torch.dtype:
    return layer.compute_dtype or layer.weight.quant_state.dtype


def dequantized_weight(layer, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight a ``Linear4bit`` multiplies with, [out, in], in ``dtype`` (default: its compute dtype)."""
    import bitsandbytes.functional as bnbf
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return w.to(dtype or _compute_dtype(layer))


def _is_plain_lora(layer) -> bool:
    from peft.tuners.lora import LoraLayer
    if not isinstance(layer, LoraLayer) or getattr(layer, "merged", False):
        return False
    active = list(layer.active_adapters)
    return bool(active) and all(a in layer.lora_A and not layer.use_dora.get(a, False) for a in active) \
        and not any(getattr(layer, "lora_embedding_A", {}).get(a) is not None for a in active)


def _stream_dtype(compute_dtypes: set) -> Optional[torch.dtype]:
    """The one 16-bit compute dtype of a model's 4-bit layers, or None (float32, none, or several)."""
    return next(iter(compute_dtypes)) if len(compute_dtypes) == 1 and compute_dtypes != {torch.float32} else None


def copy_bytes(model) -> int:
    """Bytes of the tensors an inference copy would add (de-quantized and merged weights)."""
    linear4bit, LoraLayer, _ = _layer_classes()
    total = 0
    for module in model.modules():
        if isinstance(module, linear4bit):
            total += module.out_features * module.in_features * torch.finfo(_compute_dtype(module)).bits // 8
        elif isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear) \
                and not isinstance(module.get_base_layer(), linear4bit):
            total += module.get_base_layer().weight.numel() * module.get_base_layer().weight.element_size()
    return total


def free_bytes(device: torch.device) -> Optional[int]:
    """Free memory where the copy would live; None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _set(root, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.inference_mode()
def inference_copy(model) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` for inference: 4-bit layers de-quantized, float32 LoRA layers merged.

    Raises NotSupported for PEFT layers other than plain LoRA. ``model`` itself is not changed.
    """
    linear4bit, _, BaseTunerLayer = _layer_classes()
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, shared)
    clone.eval()
    merged = dequantized = kept_lora = 0
    for name, module in list(clone.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if not _is_plain_lora(module):
            raise NotSupported(f"{type(module).__module__}.{type(module).__name__} at {name}")
        base = module.get_base_layer()
        is4 = isinstance(base, linear4bit)
        if not is4 and type(base) is not torch.nn.Linear:
            raise NotSupported(f"LoRA over {type(base).__name__} at {name}")
        dtype = _compute_dtype(base) if is4 else base.weight.dtype
        if dtype == torch.float32:
            weight = dequantized_weight(base, torch.float32) if is4 else base.weight.detach().clone()
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).to(torch.float32)
            new = DequantizedLinear(weight, None if base.bias is None else base.bias.detach(), torch.float32)
            _set(clone, name, new)
            merged += 1
        else:  # 16-bit compute: keep the LoRA layer (exact), de-quantize its base once
            if is4:
                module.base_layer = DequantizedLinear(dequantized_weight(base), base.bias, dtype)
                dequantized += 1
            kept_lora += 1
    for name, module in list(clone.named_modules()):
        if isinstance(module, linear4bit):
            _set(clone, name, DequantizedLinear(dequantized_weight(module), module.bias, _compute_dtype(module)))
            dequantized += 1
    return clone, {"merged_lora_layers": merged, "dequantized_layers": dequantized + merged, "kept_lora_layers": kept_lora}


# -- gated MLPs on a CPU -----------------------------------------------------------------------------------
CHUNK_BYTES = 1 << 20  # float32 working set of one chunk of the activation product: about a core's L2 cache


class Workspace:
    """The buffers the fused MLPs of one inference copy share: they run one after another, so one gate/up
    product and one activation product, sized for the biggest batch so far, serve every layer and batch.

    Why: re-allocating a long batch's products at every layer page-faults on every fresh page; kept buffers
    double the slow shapes' GEMM rate, identical logits (docs/speed-and-memory.md#fast_evalworkspace)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [rows, cols] buffer; its contents are whatever the last user left."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * cols or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(rows * cols, dtype=dtype, device=device)
        return buf[:rows * cols].view(rows, cols)


class GatedMLP(torch.nn.Module):
    """``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2, Gemma, ...) over de-quantized weights, for a CPU.

    The same arithmetic in the same dtypes as the module it replaces (gate and up as one stacked product, the
    element-wise part over cache-sized chunks of rows, ``CHUNK_BYTES``; products in a shared ``Workspace``);
    ``fuse_gated_mlps`` checks each replacement on a probe input. Figures: docs/speed-and-memory.md#fast_evalgatedmlp.
    """

    def __init__(self, gate: DequantizedLinear, up: DequantizedLinear, down: DequantizedLinear, act,
                 workspace: Workspace):
        torch.nn.Module.__init__(self)
        self.width = gate.out_features
        self.weight = torch.nn.Parameter(torch.cat([gate.weight, up.weight]), requires_grad=False)
        self.bias = None if gate.bias is None else torch.nn.Parameter(torch.cat([gate.bias, up.bias]),
                                                                       requires_grad=False)
        self.down, self.act, self.compute_dtype = down, act, gate.compute_dtype
        self.workspace = workspace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xc = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        rows = xc.shape[0]
        gu = self.workspace.get("gate_up", rows, 2 * self.width, self.compute_dtype, x.device)
        if self.bias is None:  # F.linear's own product (mm / addmm with the transposed weight), into gu
            torch.mm(xc, self.weight.t(), out=gu)
        else:
            torch.addmm(self.bias, xc, self.weight.t(), out=gu)
        h = self.workspace.get("hidden", rows, self.width, self.compute_dtype, x.device)
        step = max(1, CHUNK_BYTES // (4 * self.width))
        for s in range(0, rows, step):
            g, u = gu[s:s + step, :self.width].to(x.dtype), gu[s:s + step, self.width:].to(x.dtype)
            h[s:s + step] = self.act(g).mul_(u)  # the assignment rounds to the compute dtype, as down's cast does
        return self.down(h).to(x.dtype).reshape(*shape[:-1], -1)  # down's output is new: nothing aliases gu or h


def fuse_gated_mlps(clone) -> int:
    """Replace every gated MLP of the copy whose three projections are ``DequantizedLinear`` (no LoRA kept on
    them) by a ``GatedMLP``, if the two agree on a probe input; returns how many were replaced."""
    fused = 0
    generator = torch.Generator().manual_seed(0)
    workspace = Workspace()
    for name, module in list(clone.named_modules()):
        parts = [getattr(module, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        act = getattr(module, "act_fn", None)
        if act is None or not all(type(m) is DequantizedLinear for m in parts) \
                or len({m.compute_dtype for m in parts}) != 1 or (parts[0].bias is None) != (parts[1].bias is None):
            continue
        new = GatedMLP(*parts, act, workspace)
        probe = torch.randn(3, parts[0].in_features, generator=generator).to(parts[0].weight.device)
        want, got = module(probe), new(probe)
        if got.shape == want.shape and (got - want).abs().max() <= 1e-3 * want.abs().max() + 1e-6:
            _set(clone, name, new)
            fused += 1
        else:  # a module with these names that computes something else: keep it
            log.info("fast evaluation: %s (%s) is not down(act(gate(x)) * up(x)); kept", name, type(module).__name__)
    return fused


# -- grouped-query attention on a CPU ------------------------------------------------------------------
GQA_ATTENTION = "qlora_cls_sdpa_gqa"  # registered with transformers' AttentionInterface / AttentionMaskInterface


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention with SDPA's own grouped-query attention (``enable_gqa=True``).

    Why: with a padding mask on a CPU transformers copies every key/value head over its query group before SDPA,
    which takes the groups itself: same kernel, equal outputs, faster (docs/speed-and-memory.md#fast_evalsdpa_gqa_attention).
    Anything this does not cover (no mask, one query, a position bias, a paged cache, softcapping,
    attention sinks) goes to transformers' function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    plain = (getattr(module, "num_key_value_groups", 1) == 1 or attention_mask is None or query.shape[2] == 1
             or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap", "s_aux"))
             or kwargs.get("output_attentions"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # With a mask, transformers' function passes is_causal=False too (the mask holds the causal pattern).
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=False,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(clone, model) -> bool:
    """Switch the copy (never ``model``) from ``sdpa`` to ``sdpa_gqa_attention``, where the model uses grouped
    queries through transformers' attention interface; returns whether it did."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    hf, original = hf_model(clone), hf_model(model)
    config = hf.config
    # transformers has no public getter for the implementation in use: config._attn_implementation is what
    # its own attention modules read at every forward.
    if (config is original.config or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "num_key_value_heads", None) in (None, config.num_attention_heads)
            or not hasattr(hf, "set_attn_implementation")):
        return False
    AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)  # the same boolean masks as sdpa
    try:
        hf.set_attn_implementation(GQA_ATTENTION)
    except (ValueError, ImportError) as exc:  # a model class that refuses it keeps sdpa
        log.info("fast evaluation: %s keeps sdpa attention (%s)", type(hf).__name__, exc)
        return False
    return config._attn_implementation == GQA_ATTENTION


# -- shared prefix: qlora_cls/prefix.py -----------------------------------------------------------------
@dataclass
class Runner:
    """Turns a padded batch into logits, on whichever model and with whichever prefix was decided."""
    model: torch.nn.Module
    prefix_cache: list = field(default_factory=list)  # per layer (key, value, sliding window or None), batch 1
    info: dict = field(default_factory=dict)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.prefix_cache:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return forward_rest(hf_model(self.model), input_ids, attention_mask, self.prefix_cache, use_cache=True).logits


def stream_bytes(model) -> int:
    """Bytes ``stream_in_compute_dtype`` would add for ``model`` (its float32 tensors outside LoRA, in the
    4-bit layers' 16-bit compute dtype); 0 when that dtype is float32."""
    linear4bit = _layer_classes()[0]
    dtype = _stream_dtype({_compute_dtype(m) for m in model.modules() if isinstance(m, linear4bit)})
    if dtype is None:
        return 0
    bits = torch.finfo(dtype).bits
    return sum(p.numel() * bits // 8 for n, p in model.named_parameters() if p.dtype == torch.float32 and "lora_" not in n)


def stream_in_compute_dtype(clone) -> int:
    """The copy's other float32 weights (embeddings, norms, head) as new tensors in its 16-bit compute dtype,
    so the residual stream runs in that dtype, as a model loaded in bf16 for inference does; LoRA weights stay
    float32 (their small update would round away in a bf16 weight). Returns the tensors converted (0 when the
    compute dtype is float32). The tensors are replaced, never converted in place: the copy shares them with
    the training model, which must not change (``Module.to`` would convert the shared ones in place)."""
    dtype = _stream_dtype({m.compute_dtype for m in clone.modules() if isinstance(m, DequantizedLinear)})
    if dtype is None:
        return 0
    converted = 0
    for name, module in clone.named_modules():
        if "lora_" in name or isinstance(module, DequantizedLinear):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.dtype == torch.float32:
                setattr(module, pname, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
                converted += 1
    return converted


@torch.inference_mode()
def inference_model(model, device: torch.device, zero3: bool = False,
                    stream_dtype: str = "float32") -> tuple[torch.nn.Module, dict]:
    """The model the fast path runs: an inference copy when memory allows (see the module docstring), else
    ``model`` itself; with what was decided. Build it once and pass it to ``prepare`` to reuse it over several
    evaluations of unchanged weights (predict.py's chunks); the training loop builds one per evaluation.

    ``stream_dtype="compute"``: the copy's residual stream in the compute dtype (``stream_in_compute_dtype``).
    """
    info: dict = {"eval_fast_path": True}
    runner_model = model
    need = copy_bytes(model) + (stream_bytes(model) if stream_dtype == "compute" else 0)
    free = free_bytes(device)
    if zero3:
        info["eval_dequantized"] = "no: ZeRO-3 shards the weights"
    elif need == 0:
        info["eval_dequantized"] = "nothing to de-quantize or merge"
    elif free is None or need > MEMORY_FRACTION * free:
        info["eval_dequantized"] = (f"no: the copy needs {need / 2**20:.0f} MiB, more than half of the "
                                    f"{'unknown' if free is None else f'{free / 2**20:.0f} MiB'} free")
    else:
        try:
            runner_model, counts = inference_copy(model)
            if stream_dtype == "compute":
                counts["stream_tensors_in_compute_dtype"] = stream_in_compute_dtype(runner_model)
            if device.type == "cpu":  # for a CPU's caches and kernels; a GPU runs the modules as they are
                counts["fused_gated_mlps"] = fuse_gated_mlps(runner_model)
                counts["gqa_attention"] = int(use_gqa_attention(runner_model, model))
            info.update({f"eval_{k}": v for k, v in counts.items()})
            info["eval_dequantized"] = f"yes: {need / 2**20:.0f} MiB copy ({free / 2**20:.0f} MiB free)"
        except NotSupported as exc:
            info["eval_dequantized"] = f"no: {exc} is not plain LoRA"
    if info["eval_dequantized"].startswith("no"):
        log.info("fast evaluation: weights not de-quantized once (%s)", info["eval_dequantized"])
    return runner_model, info


@torch.inference_mode()
def prepare(model, input_ids, device: torch.device, zero3: bool = False, autocast=None,
            prepared: Optional[tuple] = None, stream_dtype: str = "float32") -> Runner:
    """Decide the fast path for one evaluation of ``model`` on examples ``input_ids`` (lists of ids).

    ``prepared``: what ``inference_model`` returned for ``model`` earlier (its weights unchanged since)."""
    import contextlib
    runner_model, info = prepared if prepared is not None else inference_model(model, device, zero3, stream_dtype)
    runner = Runner(runner_model, info=dict(info))
    hf = hf_model(runner_model)
    p = common_prefix_length(input_ids) if is_causal_decoder(hf.config) else 0
    if p > 0:
        with autocast() if autocast else contextlib.nullcontext():
            layers = prefix_layers(hf, torch.tensor([list(input_ids[0][:p])], device=device))
        if layers is None:  # a (remote-code) decoder that returns no cache: nothing to reuse
            log.info("fast evaluation: %s returned no key/value cache; the prefix is not reused", type(hf).__name__)
            p = 0
        else:
            runner.prefix_cache = layers
    runner.info["eval_prefix_tokens"] = p
    return runner
