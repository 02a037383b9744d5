"""The fast evaluation path equals the plain one, and never touches the training model.

Oracle: ``predict(..., fast=False)``, the path every earlier test and run used (the 4-bit training
model run as is). LoRA B is filled with random values so the merged deltas are not zero. The tests run on the
device ``Accelerator()`` picks (the CPU here); what only the CPU copy does (fused gated MLPs, grouped-query
attention) is asserted only there. The same checks on CUDA: tests/test_gpu.py (`make gpu-check`).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ft
from conftest import build_tiny_architecture, tiny_args

LOGIT_TOL = 1e-5  # measured: <= 1e-7 on the tiny models, 3.3e-6 on SmolLM2-135M over 408 MRPC examples (float32)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-eval-models")
    return {arch: str(build_tiny_architecture(arch, root / arch, seed=2)) for arch in ("llama", "gpt2", "roberta")}


def _setup(model_dir: str, mrpc: str, compute: str = "float32", n: int = 40, load_in_4bit: bool = True):
    from accelerate import Accelerator

    from qlora_cls.config import TrainConfig
    from qlora_cls.data import DataSource
    from qlora_cls.pipeline import build_model, prepare_data, tokenizer_for
    from qlora_cls.prompts import load_template
    cfg = TrainConfig(model_dir=model_dir, dataset=mrpc, bnb_4bit_compute_dtype=compute, load_in_4bit=load_in_4bit,
                      target_modules=["attention"])
    accelerator = Accelerator()
    cfg.resolve_auto(accelerator.device.type)
    model_path, tokenizer = tokenizer_for(cfg)
    data = prepare_data(DataSource.from_config(cfg), load_template("perfect", "mrpc"), tokenizer, ["validation"],
                        512, {"validation": n}, accelerator)
    torch.manual_seed(0)
    model = build_model(cfg, model_path, tokenizer, 2, accelerator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, data.batchers["validation"], accelerator


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("arch,compute", [("llama", "float32"), ("gpt2", "float32"), ("roberta", "float32"),
                                          ("llama", "bfloat16")])
def test_fast_path_equals_plain_path(arch, compute, tiny_models, mrpc):
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models[arch], mrpc, compute)
    before, types_before = _state(model), [type(m) for m in model.modules()]
    plain, _ = predict(model, batcher, 8, accelerator)
    fast, stats = predict(model, batcher, 8, accelerator, fast=True)
    assert (fast.argmax(1) == plain.argmax(1)).all()
    assert np.abs(fast - plain).max() <= LOGIT_TOL
    assert stats["eval_dequantized"] is True and stats["eval_dequantized_layers"] > 0
    if arch == "roberta":  # bidirectional: the prefix's states depend on the rest, nothing is reused
        assert stats["eval_prefix_tokens"] == 0
    else:
        # hand-counted: the template's "Does sentence 1 mean the same as sentence 2? Sentence 1:" is shared
        ids = batcher.input_ids
        expected = next(i for i in range(len(ids[0])) if len({tuple(x[:i + 1]) for x in ids}) > 1)
        assert stats["eval_prefix_tokens"] == expected > 5
    if accelerator.device.type == "cpu":  # rewrites for a CPU's caches and kernels; a GPU runs the modules as they are
        assert stats["eval_fused_gated_mlps"] == (2 if arch == "llama" else 0)  # GPT-2 and RoBERTa: no gated MLP
        assert stats["eval_gqa_attention"] == (arch == "llama")  # 4 query heads over 2 key/value heads; others 1:1
    else:
        assert "eval_fused_gated_mlps" not in stats and "eval_gqa_attention" not in stats
    if compute == "float32":  # LoRA merged into its float32 layer; in bf16 it stays a LoRA layer (exact)
        assert stats["eval_merged_lora_layers"] > 0 and stats["eval_kept_lora_layers"] == 0
    else:
        assert stats["eval_merged_lora_layers"] == 0 and stats["eval_kept_lora_layers"] > 0
    # the training model is untouched: same tensors, same module types (4-bit layers still 4-bit)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types_before


# --eval_stream_dtype compute in bf16: every op rounds to bf16 (8 bits of mantissa) instead of float32, so
# logits move by a few bf16 ulps per layer: measured 2.3e-3 (tiny Llama, logits up to 0.26) and 3.3e-4
# (tiny RoBERTa) here; 3.7e-2 on SmolLM2 (30 layers, logits up to 1.9) with argmax equal on 96 of 96.
STREAM_TOL = 1e-2


@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_stream_in_compute_dtype_rounds_like_bf16_and_leaves_the_training_model_alone(arch, tiny_models, mrpc):
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models[arch], mrpc, "bfloat16")
    plain, _ = predict(model, batcher, 8, accelerator)
    # after the plain pass: bitsandbytes' Linear4bit.forward itself casts its bias to the input's dtype in place
    before = _state(model)
    dtypes_before = {k: v.dtype for k, v in before.items()}
    fast, _ = predict(model, batcher, 8, accelerator, fast=True)
    stream, stats = predict(model, batcher, 8, accelerator, fast=True, stream_dtype="compute")
    assert stats["eval_stream_tensors_in_compute_dtype"] > 0
    diff = np.abs(stream - plain).max()
    assert 0 < diff <= STREAM_TOL and np.abs(fast - plain).max() < diff  # it did compute differently, within bf16
    margin = np.abs(plain[:, 1] - plain[:, 0])
    assert (stream.argmax(1) == plain.argmax(1))[margin > 2 * STREAM_TOL].all()
    after = _state(model)  # the shared float32 tensors were replaced in the copy, not converted in place
    changed = [k for k in before if not (torch.equal(before[k], after[k]) and after[k].dtype == dtypes_before[k])]
    assert not changed, changed[:3]


def test_the_memory_check_counts_the_streams_new_tensors(tiny_models, mrpc):
    """stream_bytes (what the memory check adds) = the bytes of the tensors the conversion really created."""
    from qlora_cls import fast_eval
    model, _, _ = _setup(tiny_models["llama"], mrpc, "bfloat16")  # Llama: no biases in the 4-bit layers
    clone, _ = fast_eval.inference_copy(model)
    old = {p.data_ptr() for p in clone.parameters()}
    assert fast_eval.stream_in_compute_dtype(clone) > 0
    created = sum(p.numel() * p.element_size() for p in clone.parameters() if p.data_ptr() not in old)
    assert created == fast_eval.stream_bytes(model) > 0


def test_stream_in_compute_dtype_changes_nothing_in_float32(tiny_models, mrpc):
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models["llama"], mrpc, "float32")
    fast, _ = predict(model, batcher, 8, accelerator, fast=True)
    stream, stats = predict(model, batcher, 8, accelerator, fast=True, stream_dtype="compute")
    assert stats["eval_stream_tensors_in_compute_dtype"] == 0 and np.array_equal(fast, stream)


def test_prefix_only_when_the_copy_does_not_fit(tiny_models, mrpc, monkeypatch):
    from qlora_cls import fast_eval
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models["llama"], mrpc)
    need = fast_eval.copy_bytes(model)
    # hand-computed: 2 layers x (q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128 x2, down 128x64) x 4 bytes
    assert need == 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128) * 4
    monkeypatch.setattr(fast_eval, "free_bytes", lambda device: 2 * need - 1)  # just under twice the copy
    plain, _ = predict(model, batcher, 8, accelerator)
    fast, stats = predict(model, batcher, 8, accelerator, fast=True)
    assert stats["eval_dequantized"] is False and stats["eval_prefix_tokens"] > 0
    assert np.abs(fast - plain).max() <= LOGIT_TOL and (fast.argmax(1) == plain.argmax(1)).all()
    monkeypatch.setattr(fast_eval, "free_bytes", lambda device: 2 * need)
    assert predict(model, batcher, 8, accelerator, fast=True)[1]["eval_dequantized"] is True


def test_other_peft_layers_fall_back_to_the_plain_weights(tiny_models, mrpc):
    """A DoRA layer is not merged by the fast path: the 4-bit model runs as is, with the prefix reuse."""
    from peft import LoraConfig, TaskType, get_peft_model

    from qlora_cls.config import TrainConfig
    from qlora_cls.evaluation import predict
    from qlora_cls.modeling import load_base_model, load_tokenizer
    _, batcher, accelerator = _setup(tiny_models["llama"], mrpc)
    cfg = TrainConfig(model_dir=tiny_models["llama"], bnb_4bit_compute_dtype="float32")
    torch.manual_seed(0)
    base = load_base_model(cfg, cfg.model_dir, 2, load_tokenizer(cfg.model_dir).pad_token_id,
                           {"": accelerator.device})
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"],
                                            use_dora=True, init_lora_weights=False))
    plain, _ = predict(model, batcher, 8, accelerator)
    fast, stats = predict(model, batcher, 8, accelerator, fast=True)
    assert stats["eval_dequantized"] is False and stats["eval_prefix_tokens"] > 0
    assert np.abs(fast - plain).max() <= LOGIT_TOL


def test_sixteen_bit_base_merges_lora_without_changing_it(tiny_models, mrpc):
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models["llama"], mrpc, load_in_4bit=False)
    before = _state(model)
    plain, _ = predict(model, batcher, 8, accelerator)
    fast, stats = predict(model, batcher, 8, accelerator, fast=True)
    assert stats["eval_merged_lora_layers"] == 8 and np.abs(fast - plain).max() <= LOGIT_TOL
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_gated_mlp_in_chunks_computes_what_the_module_it_replaces_does(compute, tiny_models, mrpc, monkeypatch):
    from qlora_cls import fast_eval
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models["llama"], mrpc, compute)
    monkeypatch.setattr(fast_eval, "CHUNK_BYTES", 4 * 128 * 5)  # 5 rows of the 128-wide product per chunk
    unfused, fused = fast_eval.inference_copy(model)[0], fast_eval.inference_copy(model)[0]
    assert fast_eval.fuse_gated_mlps(fused) == 2
    layers = zip(fast_eval.hf_model(unfused).model.layers, fast_eval.hf_model(fused).model.layers)
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))  # 74 rows: 15 chunks, the last partial
    x = x.to(accelerator.device)
    with torch.inference_mode():
        for old, new in layers:
            assert type(new.mlp) is fast_eval.GatedMLP
            want, got = old.mlp(x), new.mlp(x)
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    info = {"eval_fast_path": True, "eval_dequantized": "yes: copies built above"}
    a, _ = predict(model, batcher, 8, accelerator, fast=True, prepared=(unfused, info))
    b, _ = predict(model, batcher, 8, accelerator, fast=True, prepared=(fused, info))
    assert np.array_equal(a, b)


def test_gated_mlp_workspace_serves_shrinking_and_growing_batches_exactly(tiny_models, mrpc):
    """One workspace serves every layer and batch: a small batch after a big one (a stale tail in the buffers)
    and a bigger one after that (the buffers regrow) compute what the unfused module does."""
    from qlora_cls import fast_eval
    model, _, _ = _setup(tiny_models["llama"], mrpc, "bfloat16")
    unfused, fused = fast_eval.inference_copy(model)[0], fast_eval.inference_copy(model)[0]
    assert fast_eval.fuse_gated_mlps(fused) == 2
    old_layers, new_layers = fast_eval.hf_model(unfused).model.layers, fast_eval.hf_model(fused).model.layers
    assert new_layers[0].mlp.workspace is new_layers[1].mlp.workspace
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for rows in (40, 7, 90):
            x = torch.randn(1, rows, 64, generator=generator).to(new_layers[0].mlp.weight.device)
            for old, new in zip(old_layers, new_layers):
                assert torch.equal(new.mlp(x), old.mlp(x))


def test_grouped_query_attention_equals_transformers_sdpa_and_leaves_the_model_alone(tiny_models, mrpc):
    """The tiny llama has 4 query heads over 2 key/value heads; with the swap its copy runs SDPA's own grouped
    attention instead of transformers' repeat_kv, and must give the same logits; the training model keeps sdpa."""
    from qlora_cls import fast_eval
    from qlora_cls.evaluation import predict
    model, batcher, accelerator = _setup(tiny_models["llama"], mrpc, "bfloat16")
    plain_copy, gqa_copy = fast_eval.inference_copy(model)[0], fast_eval.inference_copy(model)[0]
    calls = []
    real = fast_eval.sdpa_gqa_attention

    def counting(*args, **kwargs):
        calls.append(args[4] is not None)  # called with a mask
        return real(*args, **kwargs)
    assert fast_eval.use_gqa_attention(gqa_copy, model)
    from transformers import AttentionInterface
    AttentionInterface.register(fast_eval.GQA_ATTENTION, counting)
    try:
        info = {"eval_fast_path": True, "eval_dequantized": "yes: copies built above"}
        a, _ = predict(model, batcher, 8, accelerator, fast=True, prepared=(plain_copy, info))
        b, _ = predict(model, batcher, 8, accelerator, fast=True, prepared=(gqa_copy, info))
    finally:
        AttentionInterface.register(fast_eval.GQA_ATTENTION, real)
    assert any(calls)  # the grouped path ran on masked batches (the prefix's own pass has no mask)
    assert np.array_equal(a, b)
    assert fast_eval.hf_model(model).config._attn_implementation == "sdpa"
    assert fast_eval.hf_model(plain_copy).config._attn_implementation == "sdpa"


def test_a_module_with_gated_names_that_computes_otherwise_is_kept():
    from qlora_cls import fast_eval
    lin = lambda i, o: fast_eval.DequantizedLinear(torch.randn(o, i), None, torch.float32)

    class Swapped(torch.nn.Module):  # act on up instead of gate
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = lin(8, 16), lin(8, 16), lin(16, 8), torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))
    root = torch.nn.ModuleDict({"mlp": Swapped()})
    with torch.inference_mode():
        assert fast_eval.fuse_gated_mlps(root) == 0
    assert type(root["mlp"]) is Swapped


def test_common_prefix_length_by_hand():
    from qlora_cls.prefix import common_prefix_length
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every example keeps one token of its own
    assert common_prefix_length([[7, 1], [8, 1]]) == 0
    assert common_prefix_length([[5, 6, 7]]) == 2
    assert common_prefix_length([]) == 0


def test_decoders_and_encoders_told_apart():
    import transformers as tf

    from qlora_cls.prefix import is_causal_decoder
    for config in (tf.LlamaConfig(), tf.MistralConfig(), tf.Qwen2Config(), tf.GemmaConfig(), tf.GPT2Config()):
        assert is_causal_decoder(config), config.model_type
    for config in (tf.BertConfig(), tf.RobertaConfig(), tf.DistilBertConfig(), tf.DebertaV2Config()):
        assert not is_causal_decoder(config), config.model_type


def test_training_is_identical_with_the_fast_path_on_and_off(tiny_models, mrpc, tmp_path):
    """Two epochs with an evaluation between them: the later losses, gradient norms and weights do not move.
    The "true" run is the default (auto, on where verified: the CPU), or opts in where auto is off."""
    from safetensors.torch import load_file
    from qlora_cls.config import fast_path_default
    on = [] if fast_path_default("fast_eval", "cuda" if torch.cuda.is_available() else "cpu") else ["--fast_eval", "true"]
    runs = {}
    for flag in ("true", "false"):
        run = tmp_path / f"fast-{flag}"
        ft.main(tiny_args(tiny_models["llama"], mrpc, run, "--max_steps", "10", "--log_every", "1", "--lr", "5e-3",
                          *(on if flag == "true" else ["--fast_eval", flag]), "--seed", "4"))
        runs[flag] = run
    logs = {f: [json.loads(x) for x in (r / "train_log.jsonl").read_text().splitlines()] for f, r in runs.items()}
    assert len(logs["true"]) == 10
    assert [(e["loss"], e["grad_norm"]) for e in logs["true"]] == [(e["loss"], e["grad_norm"]) for e in logs["false"]]
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summaries = {f: json.loads((r / "metrics.json").read_text()) for f, r in runs.items()}
    assert len(summaries["true"]["epochs"]) == 2  # 6 steps per epoch: an evaluation after step 6, one after 10
    for e_fast, e_plain in zip(summaries["true"]["epochs"], summaries["false"]["epochs"]):
        assert e_fast["accuracy"] == e_plain["accuracy"] and e_fast["eval_fast_path"] is True
        assert "eval_fast_path" not in e_plain
    for f in ("true", "false"):
        assert json.loads((runs[f] / "config.json").read_text())["config"]["fast_eval"] == (f == "true")


def test_fast_paths_are_on_by_default_only_where_verified():
    """auto = on for the device kinds in VERIFIED_FAST_PATHS (the CPU, where this suite runs them), off elsewhere
    until `make gpu-check` verifies them there; true opts in anywhere; false stays off. A pure function of the
    device kind: no torch.cuda involved."""
    from qlora_cls.config import VERIFIED_FAST_PATHS, EvalConfig, PredictConfig, TrainConfig
    assert VERIFIED_FAST_PATHS == {"fast_eval": {"cpu"}, "share_prefix": {"cpu"}}
    for device, fast, share in (("cpu", True, "auto"), ("cuda", False, False), ("mps", False, False),
                                ("xpu", False, False)):
        cfg = TrainConfig(bnb_4bit_compute_dtype="float32")
        assert (cfg.fast_eval, cfg.share_prefix) == ("auto", "auto")  # the defaults, before the device is known
        cfg.resolve_auto(device)
        assert (cfg.fast_eval, cfg.share_prefix) == (fast, share), device  # share auto: prefix.py decides the rest
        for other in (EvalConfig(results_path="run"), PredictConfig(results_path="run", input="-")):
            other.resolve_auto(device)
            assert other.fast_eval is fast, (type(other).__name__, device)
    cfg = TrainConfig(bnb_4bit_compute_dtype="float32", fast_eval="true", share_prefix=True)
    cfg.resolve_auto("cuda")
    assert cfg.fast_eval is True and cfg.share_prefix is True
    cfg = TrainConfig(bnb_4bit_compute_dtype="float32", fast_eval=False, share_prefix="false")
    cfg.resolve_auto("cpu")
    assert cfg.fast_eval is False and cfg.share_prefix is False
    ecfg = EvalConfig(results_path="run", fast_eval="yes")
    ecfg.resolve_auto("cuda")
    assert ecfg.fast_eval is True
