"""merge.py on generative runs (ft.py --objective sft | lm): an AutoModelForCausalLM folder that plain transformers
loads (no PEFT, no bitsandbytes) and that generates what the adapter generates.

Oracles: the run's own generations_validation.jsonl (written by ft.py with the training model), the adapter
reloaded through transformers + PEFT (logits), the bare base (the merge must move the logits far more than the
tolerance), and for --objective lm the run's own sliding-window perplexity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import merge
from generative_runs import MAX_NEW_TOKENS, finished_run

# Measured on the tiny Llama (float32 compute): max |merged - adapter| logit 3.6e-7 (16-bit LoRA with the added
# markers), 4.0e-7 (4-bit QLoRA merged into the de-quantized base); the adapters moved the logits by 1.1 and 0.23.
LOGIT_TOL = 1e-5


def plain(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def adapter_model(run: Path, bare: bool = False):
    """The run's adapter on its base (4-bit or not) as ft.py loaded it (qlora_cls.modeling.load_base_model: on a CPU
    a 4-bit base needs its weight-repacking guard to compute exactly), through PEFT; bare: the base alone."""
    from peft import PeftModel

    from qlora_cls.modeling import load_base_model
    from qlora_cls.runs import load_run_config
    cfg, records = load_run_config(run)
    tok = AutoTokenizer_of(run)
    base = load_base_model(cfg, cfg.model_dir, None, tok.pad_token_id, {"": "cpu"},
                           vocab_size=len(tok) if records["resolved"]["added_tokens"] else None)
    return (base if bare else PeftModel.from_pretrained(base, run / "adapter")).eval()


def logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([x])).logits[0].float() for x in ids])


def written(run: Path, name: str = "generations_validation.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.mark.parametrize("name,merged_into", [("lora-utterances", "original-16bit"), ("qlora", "dequantized-4bit")])
def test_merged_folder_generates_what_the_adapter_generated(name, merged_into, tmp_path_factory, tmp_path):
    from qlora_cls.generation import generate
    run = finished_run(tmp_path_factory, name)
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    info = json.loads((out / "qlora_cls.json").read_text())
    assert info["objective"] == "sft" and info["merged_into"] == merged_into
    assert info["stop_ids"] == resolved["stop_ids"] and info["added_tokens"] == resolved["added_tokens"]
    assert not (out / "prompt.txt").exists() and (out / "README.md").is_file()

    model, tok = plain(out)
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith(("peft.", "bitsandbytes."))]
    assert model.get_input_embeddings().num_embeddings == len(tok) == len(AutoTokenizer_of(run))
    assert model.generation_config.eos_token_id == resolved["stop_ids"]
    for marker in resolved["added_tokens"]:  # the chat template's new turn markers: one id each, in the template
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1 and marker in tok.chat_template
    runs = written(run)
    prompts = [tok(w["prompt"], add_special_tokens=False)["input_ids"] for w in runs]
    # the merged tokenizer renders a record's prompt as training did
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False) \
        == AutoTokenizer_of(run).apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                     tokenize=False)
    gens = generate(model, tok, prompts, info["stop_ids"], MAX_NEW_TOKENS, 4)
    assert [g["generation"] for g in gens] == [w["generation"] for w in runs]
    assert [g["generation"] for g in gens] != [b["generation"] for b in written(run, "generations_validation_base.jsonl")]
    # the folder's README: its plain-transformers snippet runs as written
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(snippet.replace("max_new_tokens=128", "max_new_tokens=3"), scope)
    assert scope["out"].shape[1] > scope["ids"].shape[1]

    texts = [tok(w["prompt"] + w["generation"], add_special_tokens=False)["input_ids"] for w in runs]
    adapter = logits(adapter_model(run), texts)
    diff = (logits(model, texts) - adapter).abs().max().item()
    moved = (logits(adapter_model(run, bare=True), texts) - adapter).abs().max().item()
    print(f"{name}: max |merged - adapter| logit {diff:.2e}; the adapter moved the logits by {moved:.2e}")
    assert diff <= LOGIT_TOL and moved > 1000 * LOGIT_TOL


def AutoTokenizer_of(run: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(run / "adapter")


def test_merged_lm_run_has_the_runs_perplexity(tmp_path_factory, tmp_path):
    from qlora_cls.generation import corpus_perplexity
    run = finished_run(tmp_path_factory, "lm")
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    cfg = json.loads((run / "config.json").read_text())["config"]
    model, tok = plain(out)
    ids = torch.tensor(tok(Path(cfg["validation_file"]).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    final = json.loads((run / "metrics.json").read_text())["final"]
    got = corpus_perplexity(model, ids, cfg["max_length"], cfg["stride"] or cfg["max_length"] // 2, "cpu")
    assert got["perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)
    assert json.loads((out / "qlora_cls.json").read_text())["objective"] == "lm"


def test_merged_generative_folder_is_refused_by_the_classification_readers(tmp_path_factory, tmp_path, capsys):
    import predict
    run = finished_run(tmp_path_factory, "qlora")
    out = merge.main(["--results_path", str(run), "--output_dir", str(tmp_path / "merged")])
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"text": "hi"}\n')
    for target in (out, run):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            predict.main(["--results_path", str(target), "--input", str(rows), "--output", str(tmp_path / "p.csv")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and ("--objective sft run" in err[0] or "merged sft model" in err[0])
    assert not (tmp_path / "p.csv").exists()
