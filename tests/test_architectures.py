"""Any architecture: decoders (Llama, Mistral, Qwen2, Gemma, GPT-2) and encoders (BERT, RoBERTa, DistilBERT,
DeBERTa-v2), each a tiny random model saved without a head, in 4 bit and in 16 bit.

For each: the head stays out of quantization and is trained (gradients reach every LoRA and head weight,
also after an evaluation forward: the CPU repack trap), ft.py trains 2 steps, and eval.py reloads the
adapter to the run's own predictions. The expected heads are written out by hand per architecture.
"""
import filecmp
import json

import pytest
import torch

import eval as eval_cli
import ft
from conftest import ARCHITECTURES, build_tiny_architecture

pytestmark = pytest.mark.slow

HEADS = {"llama": ["score"], "mistral": ["score"], "qwen2": ["score"], "gemma": ["score"], "gpt2": ["score"],
         "bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"],
         "deberta-v2": ["pooler", "classifier"]}
# What the default preset (attention-qv) must mean in each family's own names.
QUERY_VALUE = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
               "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
               "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
               "deberta-v2": ["query_proj", "value_proj"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = str(build_tiny_architecture(arch, root / arch))
        return cache[arch]
    return get


@pytest.mark.parametrize("four_bit", [True, False], ids=["4bit", "16bit"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_reach_lora_and_head_also_after_eval(models, arch, four_bit):
    import bitsandbytes as bnb
    from qlora_cls.config import TrainConfig
    from qlora_cls.methods import add_trainable
    from qlora_cls.modeling import load_base_model, load_tokenizer

    path = models(arch)
    cfg = TrainConfig(model_dir=path, load_in_4bit=four_bit, lora_dropout=0.0, gradient_checkpointing=False)
    cfg.resolve_auto("cpu")
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = add_trainable(load_base_model(cfg, path, 2, tok.pad_token_id, {"": "cpu"}), cfg)
    linear4 = [n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if isinstance(m, bnb.nn.Linear4bit)]
    assert bool(linear4) == four_bit
    assert not [n for n in linear4 if n.split(".")[0] in HEADS[arch]]  # the head is never quantized
    with torch.no_grad():  # non-zero B so gradients reach A (and the layers below) through every layer
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    enc = tok(["a short one", "a much longer sentence about cats and dogs"], padding=True, return_tensors="pt")
    batch = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([0, 1]))

    def grads():
        model.train()
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks (GPT-2 and the encoders drop out inside the base model)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    first = grads()
    lora = [n for n in first if "lora_A" in n or "lora_B" in n]
    head = [n for n in first if "modules_to_save" in n]
    assert lora and {n.split("base_model.model.")[1].split(".")[0] for n in head} == set(HEADS[arch])
    zero = [n for n in lora + head if first[n].abs().sum() == 0 and not n.endswith(".bias")]
    assert not zero, zero
    model.eval()
    with torch.inference_mode():  # what evaluation does; on AVX512-BF16 CPUs bitsandbytes would repack here
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    second = grads()
    for n in first:
        torch.testing.assert_close(second[n], first[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("four_bit", ["true", "false"], ids=["4bit", "16bit"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_train_save_reload_equal(models, glue_fixture, tmp_path, arch, four_bit):
    run = tmp_path / "run"
    summary = ft.main(["--model_dir", models(arch), "--dataset", glue_fixture, "--results_path", str(run),
                       "--max_steps", "2", "--max_eval_samples", "12", "--eval_batch_size", "5",
                       "--load_in_4bit", four_bit])
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["head_modules"] == HEADS[arch] and resolved["target_modules"] == QUERY_VALUE[arch]
    assert resolved["not_quantized"] == (HEADS[arch] if four_bit == "true" else None)
    if four_bit == "true":
        assert json.loads((run / "quant_config.json").read_text())["llm_int8_skip_modules"] == HEADS[arch]
    from safetensors.torch import load_file
    saved = load_file(run / "adapter/adapter_model.safetensors")
    for head in HEADS[arch]:  # the head is inside adapter/, in full precision (a 4-bit weight would be uint8)
        weights = [v for k, v in saved.items() if f".{head}." in k and k.endswith("weight")]
        assert weights and all(v.dtype == torch.float32 and v.dim() == 2 for v in weights), head
    assert any("lora_A" in k for k in saved) and any("lora_B" in k for k in saved)
    result = eval_cli.main(["--results_path", str(run), "--max_eval_samples", "12"])
    metrics = {k: summary["final"][k] for k in result["metrics"]}
    assert result["metrics"] == metrics and set(metrics) == {"accuracy", "f1"}
    assert filecmp.cmp(run / "predictions_validation.csv", run / "evals/validation-perfect/predictions.csv",
                       shallow=False)
