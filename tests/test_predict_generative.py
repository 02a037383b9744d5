"""predict.py on generative runs (ft.py --objective sft | lm): one generation per input row, streamed in input order.

Oracles, independent of predict.py and of qlora_cls.generation: plain transformers ``model.generate`` (greedy, one
prompt at a time, no padding) of the adapter loaded with PEFT on the float32 base, and of the folder merge.py
wrote, on prompts rendered here with the tokenizer's ``apply_chat_template`` from hand-built turns."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

import merge
import predict
from generative_runs import INSTRUCTIONS, WIKITEXT, finished_run

NEW = 10  # --max_new_tokens of these tests (the runs were trained with 12)


def _records(n: int = 5, start: int = 1000) -> list[dict]:
    """Held-out instruction records (the runs trained on the first 40), with an id."""
    rows = json.loads(INSTRUCTIONS.read_text())[start:start + n]
    return [{"id": f"r{start + i}", **r} for i, r in enumerate(rows)]


def _turns(record: dict) -> list[dict]:
    """A record as the chat turns training renders (system = instruction, user = input, left out when empty)."""
    turns = [{"role": "system", "content": record["instruction"]}, {"role": "user", "content": record["input"]}]
    return [t for t in turns if t["content"].strip()]


def _plain_generate(model, tok, text: str, stop_ids: list[int]) -> tuple[str, bool]:
    """Greedy transformers generation of one unpadded prompt, cut at the first stop token."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    hits = [i for i, t in enumerate(new) if t in stop_ids]
    return tok.decode(new[:hits[0]] if hits else new, skip_special_tokens=False), bool(hits)


def _peft_model(run: Path):
    """The run's adapter on its float32 base through PEFT alone (the chat template's markers resized in first,
    under the run's seed, as ft.py did)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = json.loads((run / "config.json").read_text())["config"]
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    torch.manual_seed(cfg["seed"])
    base = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    if len(tok) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tok), mean_resizing=True)
    return PeftModel.from_pretrained(base, run / "adapter").eval(), tok


def _merged_model(run: Path, out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = merge.main(["--results_path", str(run), "--output_dir", str(out)])
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_csv(path: Path, rows, columns) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "lora-utterances")  # its own chat template, markers added to the vocabulary


def test_sft_generations_equal_plain_transformers_for_jsonl_and_csv(sft_run, tmp_path):
    run = sft_run
    stop_ids = json.loads((run / "config.json").read_text())["resolved"]["stop_ids"]
    records = _records()
    conversation = [{"role": "user", "content": "Name three colours."}]
    jsonl_rows = records + [{"id": "c1", "messages": conversation},  # a final assistant turn is the answer: left out
                            {"id": "c2", "messages": conversation + [{"role": "assistant", "content": "Red."}]}]
    out_jsonl = tmp_path / "out.jsonl"
    summary = predict.main(["--results_path", str(run), "--input", str(_write_jsonl(tmp_path / "in.jsonl", jsonl_rows)),
                            "--output", str(out_jsonl), "--max_new_tokens", str(NEW), "--chunk_size", "3",
                            "--batch_size", "2"])
    got = _read_jsonl(out_jsonl)
    assert summary["rows"] == summary["predicted"] == len(got) == len(jsonl_rows)
    assert [g["id"] for g in got] == [r["id"] for r in jsonl_rows]  # input order across chunks
    assert list(got[0]) == ["id", "instruction", "input", "messages", "generation", "stopped"]
    assert got[0]["instruction"] == records[0]["instruction"] and got[-1]["messages"] == jsonl_rows[-1]["messages"]

    peft, tok = _peft_model(run)
    merged, merged_tok = _merged_model(run, tmp_path / "merged")
    all_turns = [_turns(r) for r in records] + [conversation, conversation]
    for model, t in ((peft, tok), (merged, merged_tok)):
        expected = [_plain_generate(model, t, t.apply_chat_template(turns, add_generation_prompt=True, tokenize=False),
                                    stop_ids) for turns in all_turns]
        assert [(g["generation"], g["stopped"]) for g in got] == expected
    assert got[-1]["generation"] == got[-2]["generation"]
    # the adapter matters: the bare base answers otherwise
    base = peft.get_base_model()
    with peft.disable_adapter():
        bare = [_plain_generate(base, tok, tok.apply_chat_template(t, add_generation_prompt=True, tokenize=False),
                                stop_ids)[0] for t in all_turns[:3]]
    assert bare != [g["generation"] for g in got[:3]]

    # the same records as CSV (the output column ignored): the same generations, one row per input row
    out_csv = tmp_path / "out.csv"
    predict.main(["--results_path", str(run), "--input",
                  str(_write_csv(tmp_path / "in.csv", records, ["id", "instruction", "input", "output"])),
                  "--output", str(out_csv), "--max_new_tokens", str(NEW)])
    rows = _read_csv(out_csv)
    assert list(rows[0]) == ["id", "instruction", "input", "generation", "stopped"]
    assert [(r["id"], r["generation"], r["stopped"]) for r in rows] == \
        [(g["id"], g["generation"], "true" if g["stopped"] else "false") for g in got[:len(records)]]


def test_lm_continuations_equal_plain_transformers(tmp_path_factory, tmp_path):
    run = finished_run(tmp_path_factory, "lm")
    lines = [x for x in WIKITEXT.read_text(encoding="utf-8").splitlines() if len(x.split()) > 8][200:204]
    texts = [" ".join(x.split()[:12]) for x in lines]
    out = tmp_path / "out.csv"
    predict.main(["--results_path", str(run), "--input", str(_write_jsonl(tmp_path / "in.jsonl",
                                                                          [{"text": t} for t in texts])),
                  "--output", str(out), "--max_new_tokens", str(NEW)])
    got = _read_csv(out)
    assert list(got[0]) == ["text", "generation", "stopped"] and [g["text"] for g in got] == texts
    peft, tok = _peft_model(run)
    expected = [_plain_generate(peft, tok, t, [tok.eos_token_id]) for t in texts]
    assert [(g["generation"], g["stopped"] == "true") for g in got] == expected


def test_bad_rows_skipped_and_an_interrupted_stream_leaves_nothing(sft_run, tmp_path, monkeypatch, capsys):
    run = sft_run
    rows = _records(4)
    del rows[1]["instruction"]
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exc:
        predict.main(["--results_path", str(run), "--input", str(inp), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "line 2 lacks column(s) instruction" in err and "--skip_bad_rows" in err
    assert not out.exists()

    summary = predict.main(["--results_path", str(run), "--input", str(inp), "--output", str(out), "--skip_bad_rows",
                            "--max_new_tokens", "3", "--chunk_size", "2"])
    got = _read_jsonl(out)
    assert summary["skipped_rows"] == [2] and len(got) == 4 and [g["id"] for g in got] == [r["id"] for r in rows]
    assert got[1]["generation"] == "" and got[1]["stopped"] is None and all(g["generation"] for g in got[2:])

    # a failure in the second chunk: the existing output is kept whole and no temporary file is left behind
    from qlora_cls import generation
    real, calls = generation.generate, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", fail_second)
    before = out.read_text()
    with pytest.raises(RuntimeError, match="interrupted"):
        predict.main(["--results_path", str(run), "--input", str(inp), "--output", str(out), "--skip_bad_rows",
                      "--overwrite", "--max_new_tokens", "3", "--chunk_size", "2"])
    assert out.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_bad_generation_flags_are_one_line(tmp_path_factory, tmp_path, capsys):
    """A generation flag out of its range: one line, exit 2, nothing written."""
    run = finished_run(tmp_path_factory, "lm")
    capsys.readouterr()  # the training's own output, when this test is the first to need the run
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"text": "The"}])
    for flags, words in ((["--top_p", "1.5"], "--top_p must be in (0, 1]"),
                         (["--max_new_tokens", "0"], "--max_new_tokens must be > 0")):
        with pytest.raises(SystemExit) as exc:
            predict.main(["--results_path", str(run), "--input", str(inp), "--output", str(tmp_path / "o.csv")] + flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and words in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
