"""qlora_cls.generation against independent computations on tiny random causal LMs (Llama and GPT-2 configs
with the SmolLM2 tokenizer's vocabulary): answer loss, sliding-window perplexity, left-padded generation,
metrics and the generations file. Each reference is computed one sequence at a time, unpadded, with
log_softmax / argmax by hand, so padding, batching, the label shift and the window bookkeeping are checked."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tokenizer_dir
from qlora_cls.generation import (answer_loss, corpus_perplexity, generate, generation_metrics,
                                  write_generations)


@pytest.fixture(scope="module")
def tok():
    from qlora_cls.modeling import load_tokenizer
    return load_tokenizer(str(tokenizer_dir()))


def tiny_model(kind: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    # initializer_range 0.2, not 0.02: near-uniform logits would let float noise (padding) flip an argmax.
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=256, initializer_range=0.2,
                             tie_word_embeddings=False)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    return tiny_model(request.param, len(tok))


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..len-1, one unpadded forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


# -- answer loss ------------------------------------------------------------------------------------------
class TinySplit:
    """The shape of an SFT split: rows of input_ids and labels (-100 = not scored), lengths, a collate that
    pads on the right (labels with -100)."""

    def __init__(self, rows, pad_id):
        self.input_ids = [ids for ids, _ in rows]
        self.labels = [labels for _, labels in rows]
        self.lengths = [len(ids) for ids in self.input_ids]
        self.pad_id = pad_id

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return i

    def collate(self, rows):
        width = max(self.lengths[i] for i in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = self.lengths[i]
            ids[j, :n] = torch.tensor(self.input_ids[i])
            labels[j, :n] = torch.tensor(self.labels[i])
            mask[j, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hand_split(pad_id, n=5, seed=1):
    """Prompt then answer, lengths 6..14; only the answer is labelled (one row also labels a prompt token)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n):
        prompt = torch.randint(10, 1000, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(10, 1000, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        labels = [-100] * len(prompt) + answer
        if r == 2:
            labels[1] = prompt[1]
        rows.append((prompt + answer, labels))
    return TinySplit(rows, pad_id)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_answer_loss_matches_per_token_computation(model, tok, batch_size):
    from accelerate import Accelerator
    split = hand_split(tok.pad_token_id)
    model.eval()
    total, count = 0.0, 0
    for ids, labels in zip(split.input_ids, split.labels):
        logp = token_logprobs(model, ids)
        for t in range(1, len(ids)):
            if labels[t] != -100:
                total -= float(logp[t - 1])
                count += 1
    model.train()
    out = answer_loss(model, split, batch_size, Accelerator(cpu=True))
    assert model.training
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


# -- corpus perplexity ---------------------------------------------------------------------------------------
def corpus(n=37, seed=2):
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def test_disjoint_windows_equal_per_window_nll(model):
    """stride == max_length: disjoint windows, each scoring its tokens after the first."""
    ids, L = corpus(), 8
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(ids), L):
        window = ids[start:start + L].tolist()
        if len(window) > 1:
            total -= float(token_logprobs(model, window).sum())
            count += len(window) - 1
    out = corpus_perplexity(model, ids, max_length=L, stride=L, device="cpu")
    assert out["tokens"] == count == len(ids) - math.ceil(len(ids) / L)
    assert out["nll"] == pytest.approx(total / count, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


@pytest.mark.parametrize("n,L,stride", [(30, 8, 3), (37, 8, 5), (20, 8, 7), (9, 16, 4)])
def test_overlapping_windows_equal_token_by_token(model, n, L, stride):
    """stride < max_length: every token but the first scored once, its context beginning where the guide's
    first window that reaches it begins (window k = [k*stride, k*stride + L))."""
    ids = corpus(n).tolist()
    model.eval()
    total = 0.0
    for t in range(1, n):
        k = 0
        while k * stride + L <= t:
            k += 1
        context = ids[k * stride:t]
        assert len(context) >= min(t, L - stride)
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1].double()
        total -= float(torch.log_softmax(logits, -1)[ids[t]])
    out = corpus_perplexity(model, torch.tensor([ids]), max_length=L, stride=stride, device="cpu")
    assert out["tokens"] == n - 1
    assert out["nll"] == pytest.approx(total / (n - 1), rel=1e-6)


def test_corpus_perplexity_rejects_stride_that_skips(model):
    with pytest.raises(ValueError):
        corpus_perplexity(model, corpus(), max_length=8, stride=9, device="cpu")


# -- generation ----------------------------------------------------------------------------------------------
PROMPTS = [[11, 500, 42], [7, 8, 9, 300, 301, 302, 303], [900, 20, 33, 44, 55], [600]]


def manual_greedy(model, prompt, stop_ids, max_new):
    """Argmax one token at a time on the unpadded prompt: (new tokens before the stop, stopped, produced)."""
    ids = list(prompt)
    for step in range(max_new):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stop_ids:
            return ids[len(prompt):], True, step + 1
        ids.append(nxt)
    return ids[len(prompt):], False, max_new


def test_greedy_equals_manual_loop_despite_left_padding(model, tok):
    max_new = 8
    model.eval()
    free = [manual_greedy(model, p, [], max_new)[0] for p in PROMPTS]
    # A stop id that the first prompt produces and some other prompt does not: rows end at different steps.
    others = set().union(*free[1:])
    candidates = [t for t in free[0][1:] if t not in free[1]] or [t for t in free[0] if t not in others]
    assert candidates, "the random model gave every prompt the same tokens; change the seed"
    stop_ids = [tok.eos_token_id, candidates[0]]
    model.train()
    got = generate(model, tok, PROMPTS, stop_ids, max_new_tokens=max_new, batch_size=3)
    assert model.training
    model.eval()
    stopped = []
    for prompt, result in zip(PROMPTS, got):
        new, stop, produced = manual_greedy(model, prompt, stop_ids, max_new)
        assert result == {"generation": tok.decode(new, skip_special_tokens=False), "stopped": stop,
                          "new_tokens": produced}
        stopped.append(stop)
    assert stopped[0] and not all(stopped)


def test_stopped_when_the_stop_id_is_forced(model, tok):
    """A bias on the output layer makes the stop id win at every step: every answer is empty and stopped;
    without it (a stop id the model never picks), every answer runs to max_new_tokens."""
    stop = tok.eos_token_id
    head = model.get_output_embeddings()
    bias = torch.zeros(len(tok))
    bias[stop] = 1e4
    handle = head.register_forward_hook(lambda module, args, output: output + bias)
    try:
        got = generate(model, tok, PROMPTS, [stop], max_new_tokens=5, batch_size=2)
    finally:
        handle.remove()
    assert got == [{"generation": "", "stopped": True, "new_tokens": 1}] * len(PROMPTS)
    model.eval()
    produced = set().union(*(manual_greedy(model, p, [], 5)[0] for p in PROMPTS))
    never = min(set(range(10, 1000)) - produced)
    got = generate(model, tok, PROMPTS, [never], max_new_tokens=5, batch_size=2)
    assert all(not g["stopped"] and g["new_tokens"] == 5 for g in got)


def test_sampling_is_seeded_and_leaves_the_global_rng(model, tok):
    before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, [tok.eos_token_id], 6, 2, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, PROMPTS, [tok.eos_token_id], 6, 2, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    assert a == b


# -- metrics and the file ------------------------------------------------------------------------------------
def test_metrics_by_hand():
    gens = [{"generation": "a b c", "stopped": True}, {"generation": " Hello \n", "stopped": False},
            {"generation": "y", "stopped": True}]
    refs = ["a c", "Hello", "x"]
    m = generation_metrics(gens, refs)
    # "a b c" vs "a c": LCS 2, precision 2/3, recall 1, F = 2PR/(P+R) = 0.8; "Hello": 1; "y" vs "x": 0.
    assert m["stop_rate"] == pytest.approx(2 / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["rouge_l"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)


def test_write_generations(tmp_path):
    path = tmp_path / "generations_validation.jsonl"
    path.write_text("old\n")
    gens = [{"generation": "réponse", "stopped": True, "new_tokens": 3}, {"generation": "b\nc", "stopped": False,
                                                                             "new_tokens": 9}]
    write_generations(path, ["p1", "p2"], ["r1", "r2"], gens)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"prompt": "p1", "reference": "r1", "generation": "réponse", "stopped": True},
                    {"prompt": "p2", "reference": "r2", "generation": "b\nc", "stopped": False}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


TWO_PROCESS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
from accelerate import Accelerator
from test_generation import hand_split, tiny_model
from qlora_cls.generation import answer_loss
from qlora_cls.modeling import load_tokenizer
from conftest import tokenizer_dir
tok = load_tokenizer(str(tokenizer_dir()))
acc = Accelerator()
out = answer_loss(tiny_model("llama", len(tok)), hand_split(tok.pad_token_id), 2, acc)
if acc.is_main_process:
    open(sys.argv[2], "w").write(json.dumps(dict(out, world=acc.num_processes)))
# Both processes leave together and close the process group (as ft.py's end_training does): a process that
# exited while the other was still in its last collective aborted it (SIGABRT, 2 runs of 7).
acc.wait_for_everyone()
acc.end_training()
"""


@pytest.mark.slow
def test_answer_loss_on_two_processes_counts_each_example_once(tok, tmp_path):
    """5 rows, batches of 2, 2 processes: Accelerate pads the last round with duplicates; the loss and token
    count must equal the single-process figures."""
    import os
    import subprocess

    from accelerate import Accelerator
    from conftest import REPO, TWO_PROCESSES, accelerate_launch
    script, result = tmp_path / "two.py", tmp_path / "out.json"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [*accelerate_launch(*TWO_PROCESSES), str(script), str(REPO), str(result)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(result.read_text())
    want = answer_loss(tiny_model("llama", len(tok)), hand_split(tok.pad_token_id), 2, Accelerator(cpu=True))
    assert got["world"] == 2
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
