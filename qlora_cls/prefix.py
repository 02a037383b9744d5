"""The prompt's shared prefix: leading tokens every example has, computed once per batch instead of per example.

In a causal decoder the template's leading tokens hold the same keys and values in every example, so they run once,
at batch size 1, and the rest attends to that cache expanded over the batch: once per evaluation (``fast_eval``)
and once per training batch with gradients (``training_prefix``: exact without dropout; with LoRA dropout one mask
shared on the prefix, same expected gradient). ``training_prefix`` says why it does not apply (encoders, gradient
checkpointing, distributed launches). The prefix is the longest common *token* prefix, capped one token short of
the shortest example. Details: docs/speed-and-memory.md#prefix-module.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def common_prefix_length(sequences) -> int:
    """Longest common token prefix of all sequences, at most the shortest length minus one."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return max(n, 0)


def is_causal_decoder(config) -> bool:
    """Causal self-attention only: a causal-LM class exists for the model type and no masked-LM class
    (BERT-style models have both: they are encoders that can be configured as decoders)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    kind = getattr(config, "model_type", None)
    return (not getattr(config, "is_encoder_decoder", False) and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def hf_model(model):
    """The transformers model under a PeftModel (LoRA layers are modules inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prefix_layers(hf, prefix_ids: torch.Tensor) -> Optional[list]:
    """The prefix's key/value cache, per layer ``(key, value, sliding window or None)``, batch 1; None when the
    model returns no cache (a remote-code decoder)."""
    out = getattr(hf, hf.base_model_prefix)(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                                            use_cache=True)
    if out.past_key_values is None:
        return None
    return [(k, v, s) for k, v, s in out.past_key_values]


def expanded_cache(hf, layers: list, batch: int):
    """The batch-1 prefix cache ``layers`` (``prefix_layers``) as a ``DynamicCache`` of ``batch`` rows (views, no
    copy; the forward that extends it concatenates into new tensors)."""
    from transformers import DynamicCache
    return DynamicCache(ddp_cache_data=[(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]),
                                         *([s] if s is not None else [])) for k, v, s in layers], config=hf.config)


def forward_rest(hf, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list, **kwargs):
    """``hf(input_ids, attention_mask, **kwargs)`` given the first ``P`` positions' cache ``layers`` (batch 1,
    P = their length): only positions P.. run. Padding is on the right, so the head pools each example's last
    real token from the rest, as it would from the whole row."""
    p, (b, width) = layers[0][0].shape[-2], input_ids.shape
    cache = expanded_cache(hf, layers, b)
    mask = torch.cat([attention_mask.new_ones(b, p), attention_mask[:, p:]], dim=1)
    positions = torch.arange(p, width, device=input_ids.device).unsqueeze(0).expand(b, -1)
    return hf(input_ids=input_ids[:, p:], attention_mask=mask, position_ids=positions, past_key_values=cache,
              **kwargs)


@dataclass
class TrainingPrefix:
    """What ft.py's loop shares per batch: ``tokens`` (0 = nothing) and why."""
    tokens: int
    reason: str

    def forward(self, autocast: Callable = contextlib.nullcontext) -> Callable:
        """The loop's ``forward(model, batch)``: ``model(**batch)``, or with the prefix run once per batch.

        ``autocast``: the accelerator's (``Accelerator.autocast``): accelerate puts mixed-precision autocast
        on the wrapped model's own forward, which the shared path calls around."""
        p = self.tokens
        if not p:
            return lambda model, batch: model(**batch)

        def shared(model, batch):
            hf = hf_model(model)
            ids = batch["input_ids"]
            with autocast():
                layers = prefix_layers(hf, ids[:1, :p])  # every row starts with these p tokens
                return forward_rest(hf, ids, batch["attention_mask"], layers, labels=batch["labels"], use_cache=False)
        return shared


def training_prefix(cfg, config, input_ids, launch: Optional[str] = None) -> TrainingPrefix:
    """Decide ``--share_prefix`` (after ``TrainConfig.resolve_auto``) for a run: the shared tokens of the training
    rows ``input_ids``, or 0 and why; True where it cannot apply is a UsageError. ``launch``: accelerate's
    distributed type when the model is wrapped (DDP, DeepSpeed, FSDP), None for one plain process."""
    from .errors import UsageError
    if cfg.share_prefix is False:
        return TrainingPrefix(0, "off (--share_prefix false, as given or as auto resolved on a device where it is "
                                 "not verified yet)")
    if not is_causal_decoder(config):
        why = f"{config.model_type} is not a causal decoder (its prefix tokens attend to the whole example)"
    elif cfg.gradient_checkpointing:
        why = "gradient checkpointing is on (transformers drops a checkpointed layer's key/value cache in training)"
    elif launch is not None:
        why = (f"the model is wrapped for {launch} (DDP and DeepSpeed synchronise gradients through the wrapper's "
               f"forward, which the shared path bypasses)")
    else:
        p = common_prefix_length(input_ids)
        if p:
            return TrainingPrefix(p, f"{p} leading tokens shared by every training example run once per batch")
        why = "the training examples share no leading tokens"
    if cfg.share_prefix is True:
        raise UsageError(f"--share_prefix true cannot apply: {why}; use --share_prefix auto or false")
    return TrainingPrefix(0, f"off: {why}")
