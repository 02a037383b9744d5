"""ft.py --objective sft | lm on tiny causal LMs: what the run folder holds, and a reload as a user would do it
(plain transformers + PEFT) generating exactly what the run wrote."""
import json
from pathlib import Path

import pytest
import torch

import ft
from conftest import SHARED, build_tiny_architecture, build_tiny_model

INSTRUCTIONS = Path(SHARED) / "data" / "instructions" / "instruction-data.json"
WIKITEXT = Path(SHARED) / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sft") / "train.json"
    path.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:40]))
    return str(path)


def sft_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--objective", "sft", "--model_dir", model, "--train_file", data, "--results_path", str(out),
            "--eval_holdout", "8", "--max_steps", "2", "--batch_size", "4", "--eval_batch_size", "4", "--log_every", "1",
            "--generate_examples", "4", "--max_new_tokens", "6", "--max_length", "128", *extra]


def reload_and_generate(run: Path, model_dir: str, prompts: list, stop_ids: list, four_bit: bool):
    """The adapter on its base through transformers and PEFT only, greedy generations of ``prompts``. The base is
    loaded as the run loaded it (its compute dtype; 4-bit: the same quantization, norms and embeddings in float32
    as PEFT's prepare_model_for_kbit_training leaves them): a tiny random model's greedy choices are near ties."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora_cls.generation import generate
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    dtype = getattr(torch, json.loads((run / "config.json").read_text())["config"]["bnb_4bit_compute_dtype"])
    quant = json.loads((run / "quant_config.json").read_text())
    kwargs = {"quantization_config": BitsAndBytesConfig(**quant)} if four_bit else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    if four_bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, run / "adapter")
    return generate(model, tok, prompts, stop_ids, 6, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("four_bit", [True, False])
def test_two_sft_steps_then_a_reload_generates_the_same(arch, four_bit, records, tmp_path):
    model = str(build_tiny_architecture(arch, tmp_path / arch, causal_lm=True))
    run = tmp_path / "run"
    # The plain path, so that the reload (plain transformers + PEFT) is the same computation, token for token.
    summary = ft.main(sft_args(model, records, run, "--method", "qlora" if four_bit else "lora", "--fast_eval", "false"))
    assert summary["run"]["steps"] == 2 and summary["objective"] == "sft"
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["target_modules"] == {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                                          "bloom": ["query_key_value"]}[arch]
    for name in ("answer_perplexity", "stop_rate", "rouge_l"):
        assert name in summary["final"] and name in summary["baseline"]["metrics"]
    # The base model's generations beside the adapter's, on the same prompts.
    written = [json.loads(line) for line in (run / "generations_validation.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (run / "generations_validation_base.jsonl").read_text().splitlines()]
    assert len(written) == len(base) == 4 and [w["prompt"] for w in written] == [b["prompt"] for b in base]
    assert {"prompt", "reference", "generation", "stopped"} <= set(written[0])

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    prompts = [tok(w["prompt"], add_special_tokens=False)["input_ids"] for w in written]
    again = reload_and_generate(run, model, prompts, resolved["stop_ids"], four_bit)
    assert [g["generation"] for g in again] == [w["generation"] for w in written]


@pytest.mark.slow
def test_answer_only_loss_trains_the_end_of_turn_on_the_embedded_model(records, tmp_path):
    """A few real steps of SmolLM2: the answer perplexity falls from the base model's, and the run records the
    base model beside it; its end of turn is SmolLM2's <|im_end|>, which is also its pad token."""
    from qlora_cls.modeling import embedded_model_dir
    run = tmp_path / "run"
    summary = ft.main(sft_args(str(embedded_model_dir()), records, run, "--max_steps", "6", "--lr", "1e-3"))
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["end_of_turn"] == "<|im_end|>"
    final, base = summary["final"], summary["baseline"]["metrics"]
    assert final["answer_perplexity"] < base["answer_perplexity"]
    assert summary["vs_baseline"]["answer_perplexity"]["change"] < 0


def test_new_turn_markers_are_trained_and_saved_with_the_adapter(records, tmp_path):
    model = str(build_tiny_model(tmp_path / "llama"))
    run = tmp_path / "run"
    ft.main(sft_args(model, records, run, "--chat_template", "utterances"))
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["added_tokens"] == ["<|beginofutterance|>", "<|endofutterance|>"]
    method = json.loads((run / "config.json").read_text())["run"]["method"]  # what the model card says was run
    assert "classification head" not in method and method.endswith("the answer tokens and their end of turn")
    assert resolved["end_of_turn"] == "<|endofutterance|>"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    assert tok.convert_tokens_to_ids("<|endofutterance|>") == resolved["stop_ids"][0] >= 49152
    assert "<|beginofutterance|>" in tok.chat_template
    from safetensors.torch import load_file
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("token_adapter" in k or "trainable_tokens" in k for k in saved), sorted(saved)[:5]
    # The model card is the run's, not PEFT's empty template, and its stock-PEFT snippet runs as written
    # (the base grows to the saved tokenizer's vocabulary, the new rows come from the adapter).
    card = (run / "adapter" / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "More Information Needed" not in card and "end of turn `<|endofutterance|>`" in card
    assert f"{metrics['baseline']['metrics']['answer_perplexity']:.4f}" in card
    assert f"{metrics['final']['answer_perplexity']:.4f}" in card
    snippet = card.split("```python\n")[1].split("```")[0].replace("max_new_tokens=128", "max_new_tokens=3")
    scope: dict = {}
    exec(snippet, scope)
    assert scope["model"].get_input_embeddings().weight.shape[0] == len(scope["tokenizer"]) == len(tok)
    assert scope["out"].shape[1] > scope["ids"].shape[1]


def test_own_format_methods_model_card_snippet_generates(records, tmp_path):
    """--method adapter is not a PEFT format: the card's snippet rebuilds the model with qlora-cls and generates."""
    run = tmp_path / "run"
    ft.main(sft_args(str(build_tiny_model(tmp_path / "llama")), records, run, "--method", "adapter"))
    card = (run / "adapter" / "README.md").read_text()
    assert "AutoPeftModel" not in card and "load_saved(base" in card
    scope: dict = {}
    exec(card.split("```python\n")[1].split("```")[0].replace("max_new_tokens=128", "max_new_tokens=3"), scope)
    assert scope["out"].shape[1] > scope["ids"].shape[1]


@pytest.mark.slow
def test_lm_objective_lowers_the_sliding_window_perplexity(tmp_path):
    model = str(build_tiny_model(tmp_path / "llama"))
    text = WIKITEXT / "valid.txt"
    train, held = tmp_path / "train.txt", tmp_path / "test.txt"
    lines = text.read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join(lines[:120]), encoding="utf-8")
    held.write_text("\n".join(lines[120:160]), encoding="utf-8")
    summary = ft.main(["--objective", "lm", "--model_dir", model, "--train_file", str(train), "--validation_file",
                       str(held), "--results_path", str(tmp_path / "run"), "--max_length", "64", "--max_steps", "8",
                       "--batch_size", "4", "--lr", "3e-3", "--log_every", "4"])
    assert summary["final"]["perplexity"] < summary["baseline"]["metrics"]["perplexity"]
    assert "classification head" not in summary["run"]["method"]
    assert summary["run"]["method"].endswith("the LM loss on every token of the text")
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert card.count(f"{summary['final']['perplexity']:.4f}") == 1 and "| the base model (before training) | " in card


@pytest.mark.parametrize("extra,line", [
    (["--objective", "lm"], "--objective lm trains on plain text: give --train_file and --validation_file"),
    (["--objective", "sft"], "--objective sft needs instruction records or conversations"),
])
def test_generative_objectives_refuse_missing_data_in_one_line(extra, line, tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ft.main(["--model_dir", tiny_model, "--results_path", str(tmp_path / "r"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fast_copy_generates_what_the_training_model_generates(records):
    """--fast_eval's inference copy (4-bit weights de-quantized once) answers as the 4-bit LoRA model itself does,
    on the embedded model (real weights, so greedy choices are not near ties), and leaves its LoRA gradients intact
    (the CPU repack trap: modeling.disable_cpu_weight_repacking)."""
    from accelerate import Accelerator

    from qlora_cls import sft
    from qlora_cls.config import TrainConfig
    from qlora_cls.fast_eval import inference_model
    from qlora_cls.generation import generate
    from qlora_cls.modeling import embedded_model_dir, load_tokenizer
    from qlora_cls.pipeline import build_model
    path = str(embedded_model_dir())
    tok = load_tokenizer(path)
    cfg = TrainConfig(model_dir=path, objective="sft", train_file=records, lora_dropout=0.0,
                      gradient_checkpointing=False, bnb_4bit_compute_dtype="bfloat16")
    torch.manual_seed(0)
    model = build_model(cfg, path, tok, None, Accelerator(cpu=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    split = sft.encode(sft.load_records(records)[:6], tok, sft.chat_format(tok, None), 256)
    batch = split(list(range(4)))

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = grads()
    copy, info = inference_model(model, torch.device("cpu"))
    assert info["eval_dequantized"].startswith("yes")
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    fast = generate(copy, tok, split.prompt_ids, stop, 12, 3)
    plain = generate(model, tok, split.prompt_ids, stop, 12, 3)
    assert [g["generation"] for g in fast] == [g["generation"] for g in plain]
    after = grads()
    assert all(after[n].abs().sum() > 0 and torch.allclose(after[n], before[n]) for n in before if "lora_A" in n)
