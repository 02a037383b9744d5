"""Generative fine-tuning data: records in a chat format, tokenized once with the answer mask.

Two objectives share this module:

- ``sft``: instruction records (``instruction``/``input``/``output``) or conversations (``messages``) are
  rendered with a chat template, and the loss is on the answer only (``train_on_prompt`` for every token).
  The end-of-turn token after the answer is labelled, so the model learns to stop: the study this serves
  (issue 29) trained with pads masked by id, and since SmolLM2's pad token is its end of turn
  (``<|im_end|>``) the end of turn was masked too and answers ran to the length limit. Here labels are
  built by position and padded by position (``-100`` beyond each example), never masked by id.
- ``lm``: a plain text file tokenized once and cut into ``max_length`` blocks (``text_blocks``).

Prompts are rendered by one function (``render_prompt``) for training and for generation, so both see the
same tokens. Every bad input is refused with one ``UsageError`` line naming the file and the record.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data import Rows
from .errors import UsageError
from .prompts import PROMPTS_DIR

log = logging.getLogger(__name__)

CHAT_DIR = PROMPTS_DIR / "chat"
ROLES = ("system", "user", "assistant")
COLUMN_FLAGS = "--instruction_column/--input_column/--output_column"
FILE_SUFFIXES = (".json", ".jsonl", ".csv")
# A turn marker in a template's text: ``<|name|>`` (ChatML, Llama 3, Phi, the study's layout). Other styles
# (``[INST]``, ``<start_of_turn>``) are not looked for: they come with templates whose tokenizer has them.
MARKER = re.compile(r"<\|[^<>|\s]+\|>")
PROBE_ANSWER = "PROBE-ANSWER-7d1f"  # an answer no template writes by itself, to find what follows it


# -- reading records ---------------------------------------------------------------------------------
def read_utf8(path: str | Path, what: str = "") -> str:
    """A file's text; a byte that is not UTF-8 is refused with its offset (a BOM is allowed)."""
    data = Path(path).read_bytes()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise UsageError(f"{what}{path} is not UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset}, line "
                         f"{line}); save it as UTF-8")


def load_records(path: str, columns: Sequence[str] = ("instruction", "input", "output"),
                 split: str = "train") -> list[dict]:
    """Records as ``{"messages": [{"role", "content"}, ...]}``, the last message the assistant's answer.

    ``path``: a ``.json`` file (a list of records, or JSON Lines as ``datasets`` writes them), ``.jsonl``,
    ``.csv``, or a hub dataset id / local folder in hub layout (``split`` is read). A record with a
    ``messages`` list is a conversation and is kept as it is (its earlier turns are the prompt); any other
    is an instruction record, whose ``columns`` (instruction, input, output) become system, user and
    assistant turns. An empty input leaves the user turn out: the prompt is the system turn, then the
    assistant's turn opens (the study's format string rendered an empty ``<|beginofutterance|>user\\n\\n
    <|endofutterance|>`` there, a turn with nothing in it); an empty instruction likewise leaves the system
    turn out (a template may then write its own default system prompt, as SmolLM2's does). An input column
    that no record has, under its default name ``input``, is taken as empty everywhere (instruction/output
    data sets); under another name it is a missing field, as a typo would be.
    """
    rows, unit = _read_rows(path, split)
    if not rows:
        raise UsageError(f"{path} has no records; give instruction records ({', '.join(columns)}) or "
                         f"conversations (messages)")
    instruction, inp, output = columns
    input_optional = inp == "input" and not any(isinstance(r, dict) and inp in r for _, r in rows)
    records = []
    for number, row in rows:
        where = f"{path} {unit} {number}"
        if not isinstance(row, dict):
            raise UsageError(f"{where} is a JSON {type(row).__name__}, not an object with fields "
                             f"({', '.join(columns)}, or messages)")
        if "messages" in row and instruction not in row:
            records.append({"messages": _conversation(row["messages"], where)})
            continue
        needed = [instruction, output] if input_optional else [instruction, inp, output]
        missing = [c for c in needed if c not in row]
        if missing:
            has = ", ".join(map(str, row)) or "none"
            raise UsageError(f"{where} has no field {', '.join(missing)} (it has: {has}); "
                             f"name the fields with {COLUMN_FLAGS}, or give conversations with messages")
        text = {c: "" if row.get(c) is None else str(row[c]) for c in columns}
        if not text[output].strip():
            raise UsageError(f"{where} has an empty answer ({output}); every record needs one to train on")
        turns = [{"role": "system", "content": text[instruction]}, {"role": "user", "content": text[inp]}]
        turns = [t for t in turns if t["content"].strip()]
        if not turns:
            raise UsageError(f"{where} has an empty {instruction} and {inp}: there is no prompt for its answer")
        records.append({"messages": turns + [{"role": "assistant", "content": text[output]}]})
    return records


def _conversation(messages, where: str) -> list[dict]:
    """A conversation's turns, checked: known roles, string contents, the assistant's answer last."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: messages must be a non-empty list of {{role, content}} turns")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: message {i} must be an object with a string role and content, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise UsageError(f"{where}: message {i} has the unknown role {m['role']!r}; "
                             f"valid roles: {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UsageError(f"{where}: the conversation has no assistant turn; its last turn must be the assistant's "
                         f"answer (the text trained on)")
    if messages[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the conversation ends with a {messages[-1]['role']} turn; its last turn must be "
                         f"the assistant's answer (the text trained on)")
    if not messages[-1]["content"].strip():
        raise UsageError(f"{where}: the conversation's last (assistant) turn is an empty answer")
    if len(messages) == 1:
        raise UsageError(f"{where}: the conversation is the assistant's answer alone; it needs a turn before it "
                         f"(the prompt)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_rows(path: str, split: str) -> tuple[list[tuple[int, object]], str]:
    """(number, row) pairs and what a number counts ("record", "line", "row")."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix not in FILE_SUFFIXES:
            raise UsageError(f"{path}: unknown data file type {suffix or '(no suffix)'}; give .json (a list of "
                             f"records), .jsonl, .csv, a hub dataset id or a folder in hub layout")
        text = read_utf8(p)
        if suffix == ".csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            return [(n, {k: v for k, v in row.items() if k is not None}) for n, row in enumerate(reader, 1)], "row"
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})")
            return list(enumerate(data, 1)), "record"
        if suffix == ".json" and "\n" in text.strip():  # JSON Lines, unless it is one object over several lines
            try:
                one = json.loads(text)
            except json.JSONDecodeError:
                one = None
            if isinstance(one, dict):
                raise UsageError(f"{path} is one JSON object (fields: {', '.join(map(str, one))}), not records; "
                                 f"give a JSON list of records or JSON Lines (one record per line)")
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path} line {n} is not valid JSON ({exc.msg}, column {exc.colno}); JSON "
                                     f"Lines need one complete record per line")
        return rows, "line"
    if suffix in FILE_SUFFIXES:
        raise UsageError(f"{path}: no such file")
    from .hub import check_dataset_source
    check_dataset_source(path)
    import datasets
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"could not load split {split!r} of dataset {path}: {type(exc).__name__}: {first}")
    return list(enumerate(ds, 1)), f"({split}) record"


# -- chat format -------------------------------------------------------------------------------------
@dataclass
class ChatFormat:
    name: str  # "tokenizer" (its own template), a name under prompts/chat/, or a .jinja path
    template: str  # the Jinja text, also set as tokenizer.chat_template
    end_of_turn: str  # what the template writes right after an answer, up to the end of its first special token
    added_tokens: list[str]  # markers added to the tokenizer: the caller resizes the embeddings when not empty

    def end_of_turn_id(self, tokenizer) -> int:
        """The token that ends an answer (generation's stop token): the last token of ``end_of_turn``."""
        return tokenizer(self.end_of_turn, add_special_tokens=False)["input_ids"][-1]


def available_chat_templates() -> list[str]:
    return sorted(p.stem for p in CHAT_DIR.glob("*.jinja"))


def chat_format(tokenizer, template: Optional[str]) -> ChatFormat:
    """The chat format for ``template`` (None: the tokenizer's own), set on ``tokenizer``.

    Markers are the ``<|...|>`` strings of the template's text (see ``MARKER``); one that is not already
    a token the tokenizer matches whole (its added vocabulary) becomes a special token, so it is one id
    and never split or merged with its neighbours. The end of turn is found by rendering a probe answer.
    """
    if template is None:
        text, name = tokenizer.chat_template, "tokenizer"
        if isinstance(text, dict):
            text = text.get("default")
        if not text:
            names = " or ".join(available_chat_templates()) or "NAME"
            raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat template; give one "
                             f"with --chat_template {names} or a .jinja file")
    else:
        name = template
        path = Path(template) if template.endswith(".jinja") or "/" in template else CHAT_DIR / f"{template}.jinja"
        if not path.is_file():
            raise UsageError(f"--chat_template {template}: no such template; give one of "
                             f"{', '.join(available_chat_templates())} (prompts/chat/) or a path to a .jinja file")
        text = read_utf8(path, "--chat_template ")
    added_vocab = tokenizer.get_added_vocab()
    new = sorted({m for m in MARKER.findall(text) if m not in added_vocab})
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    tokenizer.chat_template = text
    probe = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as exc:
        raise UsageError(f"chat template {name} cannot render a user and an assistant turn: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc).strip() else ''}")
    at = rendered.find(PROBE_ANSWER)
    if at < 0:
        raise UsageError(f"chat template {name} never writes the assistant's content (no answer slot such as "
                         f"{{{{ message['content'] }}}} for the assistant role); there is nothing to train on")
    tail = rendered[at + len(PROBE_ANSWER):]
    stops = set(tokenizer.all_special_tokens) | {t for t in tokenizer.get_added_vocab() if MARKER.fullmatch(t)}
    found = [(tail.find(s), -len(s), s) for s in stops if s and s in tail]
    if not found:
        raise UsageError(f"chat template {name} writes {tail!r} after an answer, no special token: generation "
                         f"could not stop; end the assistant's turn with a marker such as <|endofturn|>")
    pos, neg_len, _ = min(found)
    return ChatFormat(name=name, template=text, end_of_turn=tail[:pos - neg_len], added_tokens=new)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Every turn before the answer, then the opening of the assistant's turn: the text the model continues,
    in training and in generation alike."""
    return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)


# -- tokenized splits --------------------------------------------------------------------------------
class SFTSplit(Rows):
    """Tokenized examples in memory, as a map-style ``Dataset``, with their collator.

    The interface of ``data.TokenizedSplit`` (``lengths`` for the length-grouped sampler, ``split(rows)``
    to collate rows). ``collate`` pads on the right to the longest example: ``input_ids`` with the pad id,
    ``labels`` with -100, by position, so an end-of-turn token that is also the pad token stays labelled.
    ``idx`` is each example's 0-based record index (examples may be dropped by ``encode``).
    """

    def __init__(self, tokenizer, input_ids: list[list[int]], labels: list[list[int]],
                 prompt_ids: list[list[int]], references: list[str], prompts: list[str], idx: list[int]):
        from transformers import DataCollatorForSeq2Seq
        self.input_ids, self.labels = input_ids, labels
        self.lengths = [len(x) for x in input_ids]
        self.prompt_ids, self.references, self.prompts, self.idx = prompt_ids, references, prompts, idx
        self.collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def encode(records: list[dict], tokenizer, fmt: ChatFormat, max_length: int,
           train_on_prompt: bool = False) -> SFTSplit:
    """Tokenize each record's full conversation; the prompt's positions get label -100 (unless
    ``train_on_prompt``), the answer and the end of turn after it keep their ids.

    Prompt and full text are tokenized without the tokenizer's own special tokens (the template writes any
    BOS it wants). When the full text's tokens do not start with the prompt's (a merge across the
    boundary), the prompt's tokens are kept and the rest tokenized alone, so training continues the very
    tokens generation starts from. Sequences are cut to ``max_length`` from the right; an example left
    without any answer token is dropped (one warning line gives the count), never trained with zero loss.
    """
    if max_length < 1:
        raise UsageError(f"--max_length {max_length}: give a positive number of tokens")
    prompts = [render_prompt(tokenizer, r["messages"]) for r in records]
    fulls = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    for i, (prompt, full) in enumerate(zip(prompts, fulls)):
        if not full.startswith(prompt):
            raise UsageError(f"chat template {fmt.name} renders the prompt differently with and without the answer "
                             f"(record {i + 1}: {prompt[-40:]!r} vs {full[len(prompt) - 40:len(prompt)]!r}); "
                             f"training and generation would see different text")
    prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"] if records else []
    full_ids = tokenizer(fulls, add_special_tokens=False, verbose=False)["input_ids"] if records else []
    kept = {k: [] for k in ("input_ids", "labels", "prompt_ids", "references", "prompts", "idx")}
    dropped = cut = 0
    for i, (p, ids) in enumerate(zip(prompt_ids, full_ids)):
        if ids[:len(p)] != p:
            ids = p + tokenizer(fulls[i][len(prompts[i]):], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= len(p) or len(p) >= max_length:
            dropped += 1
            continue
        cut += len(ids) > max_length
        ids = ids[:max_length]
        labels = list(ids) if train_on_prompt else [-100] * len(p) + ids[len(p):]
        for k, v in (("input_ids", ids), ("labels", labels), ("prompt_ids", p),
                     ("references", records[i]["messages"][-1]["content"]), ("prompts", prompts[i]), ("idx", i)):
            kept[k].append(v)
    if dropped:
        log.warning("dropped %d of %d examples: --max_length %d cut their answers away entirely (their prompts are "
                    "%d tokens or longer); raise --max_length to keep them", dropped, len(records), max_length,
                    max_length)
    if cut:
        log.info("%d examples' answers are cut by --max_length %d: their end of turn is not trained", cut, max_length)
    if records and not kept["input_ids"]:
        raise UsageError(f"--max_length {max_length} cuts every example's answer away; raise it (the shortest "
                         f"prompt is {min(map(len, prompt_ids))} tokens)")
    return SFTSplit(tokenizer, **kept)


class TextBlocks(SFTSplit):
    """A text file as consecutive ``max_length`` blocks (labels = inputs), and ``ids``: the whole token
    stream, for a sliding-window perplexity over the corpus."""
    ids: torch.Tensor


def text_blocks(path: str, tokenizer, max_length: int, limit: Optional[int] = None) -> TextBlocks:
    """The UTF-8 text file tokenized once (no special tokens added) and cut into blocks of ``max_length``
    tokens; the last, shorter block is kept, so the blocks concatenate back to the stream. ``limit``
    (--max_train_samples / --max_eval_samples): only the first ``limit`` blocks, and the stream cut with them."""
    if max_length < 1:
        raise UsageError(f"--max_length {max_length}: give a positive number of tokens")
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file (--objective lm needs a UTF-8 text file)")
    text = read_utf8(path)
    if not text.strip():
        raise UsageError(f"{path} has no text (--objective lm needs a UTF-8 text file to train on)")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = ids[:limit * max_length] if limit else ids
    blocks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    split = TextBlocks(tokenizer, blocks, [list(b) for b in blocks], [], [], [], list(range(len(blocks))))
    split.ids = torch.tensor(ids, dtype=torch.long)
    return split
