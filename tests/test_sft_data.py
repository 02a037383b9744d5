"""SFT data (qlora_cls/sft.py): records, chat formats, the answer mask, text blocks. No model weights: the
embedded SmolLM2 tokenizer only (its pad token is its end of turn, <|im_end|>, as in the study)."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from conftest import REPO
from qlora_cls import sft
from qlora_cls.errors import UsageError

SHARED = REPO.parent / "shared" / "data"  # conftest stops in one line when it is missing
INSTRUCTIONS = SHARED / "instructions" / "instruction-data.json"
WIKITEXT_VALID = SHARED / "wikitext-2" / "valid.txt"

RECORD = {"messages": [{"role": "system", "content": "Spell it right."}, {"role": "user", "content": "teh cat"},
                       {"role": "assistant", "content": "the cat"}]}
P = None  # a prompt position: label -100


@pytest.fixture(scope="module")
def base_tokenizer():
    from qlora_cls.modeling import embedded_model_dir, load_tokenizer
    return load_tokenizer(str(embedded_model_dir()))


@pytest.fixture
def tok(base_tokenizer):
    return copy.deepcopy(base_tokenizer)  # chat_format changes its tokenizer (template, added markers)


def labelled(tokenizer, split, i=0):
    """(token string, labelled?) for each position of example i."""
    tokens = tokenizer.convert_ids_to_tokens(split.input_ids[i])
    return [(t, lab != -100) for t, lab in zip(tokens, split.labels[i])]


def test_label_mask_token_by_token_smollm2(tok):
    fmt = sft.chat_format(tok, None)
    assert (fmt.name, fmt.end_of_turn, fmt.added_tokens) == ("tokenizer", "<|im_end|>", [])
    split = sft.encode([RECORD], tok, fmt, max_length=64)
    expected = [  # written by hand: the prompt is masked, the answer, its <|im_end|> and the newline are trained
        ("<|im_start|>", 0), ("system", 0), ("Ċ", 0), ("Sp", 0), ("ell", 0), ("Ġit", 0), ("Ġright", 0), (".", 0),
        ("<|im_end|>", 0), ("Ċ", 0),
        ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("te", 0), ("h", 0), ("Ġcat", 0), ("<|im_end|>", 0), ("Ċ", 0),
        ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
        ("the", 1), ("Ġcat", 1), ("<|im_end|>", 1), ("Ċ", 1)]
    assert labelled(tok, split) == [(t, bool(b)) for t, b in expected]
    labelled_ids = [i for i, lab in zip(split.input_ids[0], split.labels[0]) if lab != -100]
    assert split.labels[0][-4:] == labelled_ids  # labels are the ids themselves (the model shifts them)
    assert split.prompt_ids[0] == split.input_ids[0][:22]
    assert split.prompts[0] == sft.render_prompt(tok, RECORD["messages"])
    assert split.prompts[0].endswith("<|im_start|>assistant\n")
    assert split.references == ["the cat"] and split.lengths == [26]


def test_end_of_turn_is_labelled_although_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    fmt = sft.chat_format(tok, None)
    long = {"messages": RECORD["messages"][:2] + [{"role": "assistant", "content": "the cat, the dog and the bird"}]}
    split = sft.encode([RECORD, long], tok, fmt, max_length=64)
    batch = split([0, 1])
    n = split.lengths[0]
    assert batch["input_ids"].shape[1] == split.lengths[1] > n
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert batch["input_ids"][0, n - 2] == eot and batch["labels"][0, n - 2] == eot  # the end of turn: trained
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()  # right padding, same id
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert fmt.end_of_turn_id(tok) == eot


def test_train_on_prompt_labels_everything(tok):
    fmt = sft.chat_format(tok, None)
    split = sft.encode([RECORD], tok, fmt, max_length=64, train_on_prompt=True)
    assert split.labels[0] == split.input_ids[0]


def test_truncation_drops_examples_without_answer_with_one_warning(tok, caplog):
    fmt = sft.chat_format(tok, None)
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    with caplog.at_level(logging.WARNING, logger="qlora_cls.sft"):
        split = sft.encode([long_prompt, RECORD, long_prompt, RECORD], tok, fmt, max_length=24)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 of 4 examples" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert split.idx == [1, 3] and len(split) == 2
    assert all(n == 24 for n in split.lengths)  # cut from the right: "the cat" kept, the end of turn cut
    assert labelled(tok, split)[-2:] == [("the", True), ("Ġcat", True)]
    with pytest.raises(UsageError, match="cuts every example's answer away"):
        sft.encode([long_prompt], tok, fmt, max_length=24)


def test_utterances_markers_become_special_tokens(tok):
    size = len(tok)
    fmt = sft.chat_format(tok, "utterances")
    assert fmt.added_tokens == ["<|beginofutterance|>", "<|endofutterance|>"]
    assert len(tok) == size + 2 and fmt.end_of_turn == "<|endofutterance|>"
    assert tok.chat_template == fmt.template == (REPO / "prompts" / "chat" / "utterances.jinja").read_text()
    for marker in fmt.added_tokens:
        ids = tok("x" + marker + "y", add_special_tokens=False)["input_ids"]
        assert ids[1:2] == [tok.convert_tokens_to_ids(marker)]
    # The layout, character for character.
    assert tok.apply_chat_template(RECORD["messages"], tokenize=False) == (
        "<|beginofutterance|>system\nSpell it right.\n<|endofutterance|>\n<|beginofutterance|>user\nteh cat\n"
        "<|endofutterance|>\n<|beginofutterance|>assistant\nthe cat<|endofutterance|>\n")
    split = sft.encode([RECORD], tok, fmt, max_length=64)
    b, e = "<|beginofutterance|>", "<|endofutterance|>"
    expected = [(b, 0), ("system", 0), ("Ċ", 0), ("Sp", 0), ("ell", 0), ("Ġit", 0), ("Ġright", 0), (".", 0),
                ("Ċ", 0), (e, 0), ("Ċ", 0), (b, 0), ("user", 0), ("Ċ", 0), ("te", 0), ("h", 0), ("Ġcat", 0),
                ("Ċ", 0), (e, 0), ("Ċ", 0), (b, 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
                ("the", 1), ("Ġcat", 1), (e, 1), ("Ċ", 1)]
    assert labelled(tok, split) == [(t, bool(x)) for t, x in expected]
    assert sft.chat_format(tok, "utterances").added_tokens == []  # a second call adds nothing


def test_template_by_path_and_unknown_name(tok, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text((REPO / "prompts" / "chat" / "utterances.jinja").read_text())
    assert sft.chat_format(tok, str(path)).end_of_turn == "<|endofutterance|>"
    with pytest.raises(UsageError, match="no such template; give one of utterances"):
        sft.chat_format(tok, "nope")


def test_template_without_answer_slot_is_refused(tok, tmp_path):
    path = tmp_path / "noanswer.jinja"
    path.write_text("{% for m in messages %}<|turn|>{{ m['role'] }}\n{% endfor %}")
    with pytest.raises(UsageError, match="never writes the assistant's content") as exc:
        sft.chat_format(tok, str(path))
    assert "\n" not in str(exc.value)


def test_tokenizer_without_template_names_the_flag(tok):
    tok.chat_template = None
    with pytest.raises(UsageError, match="--chat_template utterances"):
        sft.chat_format(tok, None)


def test_template_rendering_the_prompt_differently_is_refused(tok, tmp_path):
    path = tmp_path / "odd.jinja"  # the generation prompt opens the turn with a word the full text lacks
    path.write_text("{% for m in messages %}<|t|>{{ m['role'] }}: {{ m['content'] }}<|e|>{% endfor %}"
                    "{% if add_generation_prompt %}<|t|>answer:{% endif %}")
    fmt = sft.chat_format(tok, str(path))
    with pytest.raises(UsageError, match="renders the prompt differently with and without the answer"):
        sft.encode([RECORD], tok, fmt, max_length=64)


def write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_instruction_records_from_json_jsonl_csv(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 + 1", "output": "2"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    expected = [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "1 + 1"},
                              {"role": "assistant", "content": "2"}]},
                {"messages": [{"role": "system", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text('instruction,input,output\nAdd.,1 + 1,2\nSay hi.,,hi\n')
    for name in ("a.json", "a.csv"):
        assert sft.load_records(str(tmp_path / name)) == expected
    assert sft.load_records(write(tmp_path / "a.jsonl", rows)) == expected
    renamed = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in rows]
    assert sft.load_records(write(tmp_path / "b.jsonl", renamed), columns=("q", "ctx", "a")) == expected
    no_input = [{"instruction": "Say hi.", "output": "hi"}]  # no record has the default input column
    assert sft.load_records(write(tmp_path / "c.jsonl", no_input)) == expected[1:]


def test_conversations_are_kept(tmp_path):
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}
    assert sft.load_records(write(tmp_path / "c.jsonl", [conv])) == [conv]


def test_hub_layout_folder(tmp_path):
    from datasets import Dataset
    (tmp_path / "hub").mkdir()
    Dataset.from_dict({"instruction": ["Add."], "input": ["1 + 1"], "output": ["2"]}).to_parquet(
        tmp_path / "hub" / "train.parquet")
    assert sft.load_records(str(tmp_path / "hub"))[0]["messages"][-1] == {"role": "assistant", "content": "2"}


def conversation(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = {"instruction": "Add.", "input": "1 + 1", "output": "2"}
BAD = {  # name: (rows, what the one line must say)
    "missing field": ([GOOD, {"instruction": "Add.", "input": "1"}],
                      ["line 2", "no field output", "it has: instruction, input",
                       "--instruction_column/--input_column/--output_column"]),
    "empty answer": ([GOOD, GOOD, {"instruction": "Add.", "input": "1", "output": "  "}], ["line 3", "empty answer"]),
    "no assistant turn": ([conversation(("system", "s"), ("user", "u"))], ["line 1", "no assistant turn"]),
    "not ending with the assistant": ([conversation(("user", "u"), ("assistant", "a"), ("user", "v"))],
                                      ["line 1", "ends with a user turn", "must be the assistant's"]),
    "unknown role": ([conversation(("user", "u"), ("bot", "b"), ("assistant", "a"))],
                     ["line 1", "message 2", "unknown role 'bot'", "system, user, assistant"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_one_line(tmp_path, case):
    rows, words = BAD[case]
    path = write(tmp_path / "data.jsonl", rows)
    with pytest.raises(UsageError) as exc:
        sft.load_records(path)
    message = str(exc.value)
    assert "\n" not in message and path in message
    for w in words:
        assert w in message, (w, message)


def test_bad_record_in_json_list_and_csv_names_the_record(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "input": "", "output": ""}]))
    with pytest.raises(UsageError, match=r"d\.json record 3 has an empty answer"):
        sft.load_records(str(tmp_path / "d.json"))
    (tmp_path / "d.csv").write_text("instruction,answer\nAdd.,2\n")
    with pytest.raises(UsageError, match=r"d\.csv row 1 has no field output \(it has: instruction, answer\)"):
        sft.load_records(str(tmp_path / "d.csv"))


def test_non_utf8_file_gives_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "Tea", "input": "", "output": "x"}\n'
                     b'{"instruction": "Caf\xe9", "input": "", "output": "x"}\n')  # 0xe9 is byte 51 + 20
    with pytest.raises(UsageError) as exc:
        sft.load_records(str(path))
    assert str(exc.value) == f"{path} is not UTF-8 text (byte 0xe9 at byte offset 71, line 2); save it as UTF-8"


def test_real_instruction_data_loads_1100_records():
    records = sft.load_records(str(INSTRUCTIONS))
    assert len(records) == 1100
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "system" for r in records)
    assert records[2]["messages"] == [{"role": "system", "content": "Convert 45 kilometers to meters."},
                                      {"role": "assistant", "content": "45 kilometers is 45000 meters."}]


def test_text_blocks_concatenate_back_to_the_stream(base_tokenizer):
    blocks = sft.text_blocks(str(WIKITEXT_VALID), base_tokenizer, max_length=512)
    stream = blocks.ids.tolist()
    assert [t for b in blocks.input_ids for t in b] == stream
    assert blocks.labels == blocks.input_ids
    assert all(n == 512 for n in blocks.lengths[:-1]) and 0 < blocks.lengths[-1] <= 512
    assert len(blocks) == -(-len(stream) // 512)
    assert base_tokenizer.decode(stream[:6]) == WIKITEXT_VALID.read_text()[:len(base_tokenizer.decode(stream[:6]))]
    batch = blocks([0, len(blocks) - 1])
    assert batch["input_ids"].shape == (2, 512) and (batch["labels"][1, blocks.lengths[-1]:] == -100).all()


def test_text_blocks_limit_keeps_the_first_blocks_of_the_stream(base_tokenizer, tmp_path):
    """--max_eval_samples / --max_train_samples on text: the first N blocks, and the scored stream cut with them."""
    text = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    stream = base_tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = sft.text_blocks(str(tmp_path / "t.txt"), base_tokenizer, max_length=32, limit=3)
    assert cut.ids.tolist() == stream[:96]
    assert [len(b) for b in cut.input_ids] == [32, 32, 32]
    whole = sft.text_blocks(str(tmp_path / "t.txt"), base_tokenizer, max_length=32)
    assert whole.ids.tolist() == stream and len(whole.input_ids) == -(-len(stream) // 32)


def test_text_blocks_refuses_empty_and_non_utf8(base_tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(UsageError, match="has no text"):
        sft.text_blocks(str(tmp_path / "empty.txt"), base_tokenizer, 128)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff")
    with pytest.raises(UsageError, match="byte offset 3, line 2"):
        sft.text_blocks(str(tmp_path / "bad.txt"), base_tokenizer, 128)


def test_prompt_tokens_stay_those_generation_sees_when_bpe_merges_across_the_boundary(tok, tmp_path):
    path = tmp_path / "space.jinja"  # the prompt ends with a space that the answer's first word would absorb
    path.write_text("{% for m in messages %}{% if m['role'] == 'assistant' %}Answer: {{ m['content'] }}<|e|>"
                    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}Answer: {% endif %}")
    fmt = sft.chat_format(tok, str(path))
    record = {"messages": [{"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris"}]}
    split = sft.encode([record], tok, fmt, max_length=64)
    whole = tok(split.prompts[0] + "Paris<|e|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(whole)[-3:] == [":", "ĠParis", "<|e|>"]  # tokenized whole: space + word merge
    # encode keeps the prompt's own tokens (ending in the lone space) and trains the word after them
    assert labelled(tok, split)[-5:] == [("Answer", False), (":", False), ("Ġ", False),
                                         ("Paris", True), ("<|e|>", True)]
    assert split.input_ids[0][:len(split.prompt_ids[0])] == split.prompt_ids[0]
