"""--classifier label_words: each label's words scored after the prompt by the causal LM itself (qlora_cls/label_words.py).

Oracles are computed here, apart from the module: the score of a label is the sum of its tokens' log-probabilities
in one plain forward of the whole sequence ``tokenizer(prompt + " " + words)`` (torch ``log_softmax``), the
training mask is read token by token against that tokenization, and reloads are compared with what the run wrote.
"""
import csv
import json

import numpy as np
import pytest
import torch

import eval as eval_cli
import ft
import merge
import predict
from conftest import tiny_args

WORDS = ["not equivalent", "equivalent", "maybe so, yes"]  # 2, 1 and 4 tokens: multi-token, different lengths
PROMPTS = ["Does sentence 1 mean the same as sentence 2? Sentence 1: the cat sat Sentence 2: a cat sat",
           "Short",
           "A much longer prompt that goes on and on about the river, the old house and the red film "]


def _independent_scores(model, tok, prompts, words):
    """(prompts, words) summed log-probabilities and token counts, one full forward per (prompt, label)."""
    scores, counts = np.zeros((len(prompts), len(words))), np.zeros((len(prompts), len(words)))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            context = prompt.rstrip()
            n = len(tok(context)["input_ids"])
            for k, word in enumerate(words):
                full = tok(context + " " + word)["input_ids"]
                assert full[:n] == tok(context)["input_ids"]  # the prompt's tokens are a prefix here
                assert tok.decode(full[n:]) == " " + word
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
                scores[i, k] = sum(float(logp[t - 1, full[t]]) for t in range(n, len(full)))
                counts[i, k] = len(full) - n
    return scores, counts


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    from transformers import AutoModelForCausalLM

    from qlora_cls.modeling import load_tokenizer
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), load_tokenizer(tiny_model)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_scores_equal_summed_token_log_probs_of_a_plain_forward(tiny_lm, batch_size, normalize):
    from accelerate import Accelerator

    from qlora_cls import label_words
    model, tok = tiny_lm
    ids, cands = label_words.encode(tok, PROMPTS, WORDS, 512)
    split = label_words.LabelWordSplit(tok, ids, cands, [0, 1, 2], [0, 1, 2], WORDS, normalize)
    assert split.multi_token
    scores, stats = label_words.predict(model, split, batch_size, Accelerator(cpu=True))
    expected, counts = _independent_scores(model, tok, PROMPTS, WORDS)
    assert sorted({int(c) for c in counts.ravel()}) == [1, 2, 4]  # the cases the cache continuation must handle
    np.testing.assert_allclose(scores, expected / counts if normalize else expected, rtol=0, atol=2e-4)
    assert stats["eval_seconds"] > 0


@pytest.mark.parametrize("words", [WORDS, ["no", "yes"]])  # multi-token (a cache continuation) and one token each
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_fast_path_runs_the_shared_prefix_once_and_scores_alike(tiny_lm, batch_size, words):
    """--fast_eval: prompts with common leading tokens (a template's) have them run once, the rest of each
    prompt left-padded after their cache: the same scores as one plain forward per (prompt, label)."""
    from accelerate import Accelerator

    from qlora_cls import label_words
    model, tok = tiny_lm
    prompts = ["Do these two sentences mean the same? Sentence 1: " + p for p in
               ("the cat sat", "a dog ran quickly on the old red mat in the park", "blue")]
    ids, cands = label_words.encode(tok, prompts, words, 512)
    shared = next(i for i in range(min(map(len, ids))) if len({tuple(x[:i + 1]) for x in ids}) > 1)
    split = label_words.LabelWordSplit(tok, ids, cands, [0, 1, 0], [0, 1, 2], words, False)
    assert split.multi_token == (words == WORDS)
    scores, stats = label_words.predict(model, split, batch_size, Accelerator(cpu=True), fast=True)
    assert stats["eval_prefix_tokens"] == shared >= 10
    expected, _ = _independent_scores(model, tok, prompts, words)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-4)


def test_single_token_labels_need_one_forward_and_score_alike(tiny_lm, monkeypatch):
    """Labels of one token each (their first tokens differ): one model call per batch, the prompt's."""
    from accelerate import Accelerator

    from qlora_cls import label_words
    model, tok = tiny_lm
    words = ["no", "yes"]
    ids, cands = label_words.encode(tok, PROMPTS, words, 512)
    split = label_words.LabelWordSplit(tok, ids, cands, [0, 1, 0], [0, 1, 2], words, False)
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, _f=model.forward, **k: calls.append(1) or _f(*a, **k))
    scores, _ = label_words.predict(model, split, 3, Accelerator(cpu=True))
    assert len(calls) == 1
    expected, _ = _independent_scores(model, tok, PROMPTS, words)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_training_forward_projects_only_answer_positions_with_the_models_own_loss_and_gradients(arch, tmp_path):
    """ft.py's label-word training forward (logits only where a label token is predicted) gives the loss and
    the gradients of a plain ``model(**batch)`` (the model's own loss over every position), in float32."""
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_architecture
    from qlora_cls import label_words
    from qlora_cls.modeling import load_tokenizer
    folder = build_tiny_architecture(arch, tmp_path / arch, causal_lm=True)
    model, tok = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_tokenizer(folder)
    ids, cands = label_words.encode(tok, PROMPTS, WORDS, 512)
    split = label_words.LabelWordSplit(tok, ids, cands, [0, 1, 2], [0, 1, 2], WORDS, False)
    batch = split.collate([split[i] for i in range(3)])
    answer_tokens = sum(len(cands[i][i]) for i in range(3))  # row i's gold label is label i: 2 + 1 + 4 tokens

    def loss_and_grads(call):
        model.zero_grad()
        out = call(model, batch)
        out.loss.backward()
        return out, float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, loss, grads = loss_and_grads(label_words.AnswerTokensForward("test").forward())
    plain, plain_loss, plain_grads = loss_and_grads(lambda m, b: m(**b))
    assert out.logits.shape[0] == answer_tokens == int((batch["labels"] != -100).sum()) == 7
    assert plain.logits.shape[:2] == batch["input_ids"].shape  # the plain call projects every position
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for n in grads:  # float32 sums in another order: relative to each gradient's own scale
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-4, atol=1e-4 * float(plain_grads[n].abs().max()),
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_prediction_is_the_argmax_and_probabilities_the_softmax_of_the_scores():
    from qlora_cls.evaluation import prediction_table
    from qlora_cls.label_words import LabelWordSplit
    from qlora_cls.metrics import compute_metrics
    from qlora_cls.tasks import GLUE_TASKS

    scores = np.array([[-3.0, -1.0], [-0.5, -7.25], [-2.0, -2.5]], dtype=np.float32)
    split = LabelWordSplit.__new__(LabelWordSplit)
    split.labels, split.idx = torch.tensor([1, 1, 0]), [10, 11, 12]
    header, rows = prediction_table(GLUE_TASKS["mrpc"], ["not_equivalent", "equivalent"], split, scores)
    assert header == ["idx", "label", "prediction", "prob_not_equivalent", "prob_equivalent"]
    soft = torch.softmax(torch.tensor(scores, dtype=torch.float64), -1).numpy()
    assert [r[2] for r in rows] == [1, 0, 0]
    np.testing.assert_allclose([[float(x) for x in r[3:]] for r in rows], soft, atol=1e-6)
    assert compute_metrics(GLUE_TASKS["mrpc"], scores, split.labels.numpy())["accuracy"] == pytest.approx(2 / 3)


def test_training_rows_label_only_the_gold_words_token_by_token(tiny_model, mrpc):
    """Prompt + the gold label's tokens; the labels are -100 over the prompt and the padding, the ids over the
    answer, collated as the SFT objective collates."""
    from accelerate import Accelerator

    from qlora_cls.config import TrainConfig
    from qlora_cls.data import DataSource
    from qlora_cls.label_words import LabelWords
    from qlora_cls.modeling import load_tokenizer
    from qlora_cls.pipeline import prepare_data
    from qlora_cls.prompts import load_template
    cfg = TrainConfig(model_dir=tiny_model, dataset=mrpc, classifier="label_words", label_words=["no,yes"])
    tok = load_tokenizer(tiny_model)
    data = prepare_data(DataSource.from_config(cfg), load_template("perfect", "mrpc"), tok, ["train"], 512,
                        {"train": 6}, Accelerator(cpu=True), label_words=LabelWords.of(cfg))
    assert data.words == ["no", "yes"]
    split, raw = data.batchers["train"], data.task.splits["train"].select(range(6))
    batch = split(list(range(6)))
    for r, row in enumerate(raw):
        prompt = data.template.render(row)
        answer = ["no", "yes"][row["label"]]
        expected = tok(prompt + " " + answer)["input_ids"]
        n = len(tok(prompt)["input_ids"])
        ids, labels = batch["input_ids"][r].tolist(), batch["labels"][r].tolist()
        mask = batch["attention_mask"][r].tolist()
        assert ids[:len(expected)] == expected and sum(mask) == len(expected)
        assert labels[:n] == [-100] * n
        assert labels[n:len(expected)] == expected[n:] and len(expected) - n == 1
        assert all(x == -100 for x in labels[len(expected):])
        assert int(split.labels[r]) == row["label"]


def test_label_words_keep_lora_gradients_after_a_4bit_evaluation(tiny_model, mrpc):
    """The CPU repack trap (modeling.disable_cpu_weight_repacking): scoring in eval mode without grad must leave
    the 4-bit LoRA model's gradients as they were."""
    from accelerate import Accelerator

    from qlora_cls import label_words
    from qlora_cls.config import TrainConfig
    from qlora_cls.modeling import load_tokenizer
    from qlora_cls.pipeline import build_model
    import bitsandbytes as bnb
    cfg = TrainConfig(model_dir=tiny_model, classifier="label_words", lora_dropout=0.0,
                      gradient_checkpointing=False, bnb_4bit_compute_dtype="bfloat16")
    tok = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    model = build_model(cfg, tiny_model, tok, None, Accelerator(cpu=True))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, cands = label_words.encode(tok, PROMPTS, WORDS, 512)
    split = label_words.LabelWordSplit(tok, ids, cands, [0, 1, 2], [0, 1, 2], WORDS, False)
    batch = split([0, 1, 2])

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = grads()
    label_words.predict(model, split, 2, Accelerator(cpu=True), fast=False)
    after = grads()
    assert all(after[n].abs().sum() > 0 and torch.equal(after[n], before[n]) for n in before if "lora_A" in n)


@pytest.mark.parametrize("argv, line", [
    (["--task", "stsb", "--classifier", "label_words"], "stsb is a regression task"),
    (["--classifier", "label_words", "--label_words", "a,b,c"], "gives 3 word(s)"),
    (["--classifier", "label_words", "--label_words", "same,same"], "the same words"),
    (["--label_words", "no,yes"], "applies to --classifier label_words"),
    (["--classifier", "label_words", "--objective", "sft"], "drop one of them"),
])
def test_bad_label_word_flags_are_one_line_and_exit_2_before_loading(argv, line, tiny_model, mrpc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ft.main(["--model_dir", tiny_model, "--dataset", mrpc, "--results_path", str(tmp_path / "r"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err
    assert not (tmp_path / "r").exists()


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [True, False])
def test_two_steps_then_eval_reload_predicts_the_same(four_bit, tiny_model, mrpc, tmp_path):
    run = tmp_path / "run"
    summary = ft.main(tiny_args(tiny_model, mrpc, run, "--classifier", "label_words", "--max_steps", "2",
                                "--lr", "3e-3", "--method", "qlora" if four_bit else "lora"))
    assert summary["run"]["steps"] == 2 and set(summary["final"]) >= {"accuracy", "f1"}
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["classifier"] == "label_words" and resolved["label_words"] == ["not equivalent", "equivalent"]
    assert resolved["head_modules"] == [] and summary["parameters"]["trainable"] == 3584  # LoRA q,v only: no head
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2] and np.isfinite(log[0]["loss"])  # --log_every 2
    result = eval_cli.main(["--results_path", str(run)])
    assert result["metrics"] == {k: summary["final"][k] for k in result["metrics"]}
    assert _rows(run / "evals" / "validation-perfect" / "predictions.csv") == _rows(run / "predictions_validation.csv")
    base = eval_cli.main(["--results_path", str(run), "--base_only"])
    assert base["run"]["trained"].startswith("not fine-tuned: the base model scoring")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "ia3", "adapter", "full"])
def test_every_other_method_trains_label_words_and_reloads_to_the_same_predictions(method, tiny_model, mrpc, tmp_path):
    """The methods besides (Q)LoRA with --classifier label_words: two steps train (the loss is finite and the
    training moved the scores off the base model's), and eval.py on the saved run reproduces its predictions."""
    run = tmp_path / method
    summary = ft.main(tiny_args(tiny_model, mrpc, run, "--classifier", "label_words", "--max_steps", "2",
                                "--lr", "3e-2", "--method", method, "--bnb_4bit_compute_dtype", "float32"))
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2] and np.isfinite(log[0]["loss"])
    assert json.loads((run / "config.json").read_text())["resolved"]["classifier"] == "label_words"
    result = eval_cli.main(["--results_path", str(run)])
    assert result["metrics"] == {k: summary["final"][k] for k in result["metrics"]}
    assert _rows(run / "evals" / "validation-perfect" / "predictions.csv") == _rows(run / "predictions_validation.csv")
    eval_cli.main(["--results_path", str(run), "--base_only"])
    base = _rows(run / "evals" / "validation-perfect-base" / "predictions.csv")
    assert base[0] == _rows(run / "predictions_validation.csv")[0]
    assert [r[3:] for r in base[1:]] != [r[3:] for r in _rows(run / "predictions_validation.csv")[1:]]


@pytest.mark.slow
def test_zero_shot_base_of_a_head_run_merge_and_predict(tiny_model, mrpc, tmp_path):
    """eval.py --base_only --classifier label_words on a head run scores the same base as a label-words run's
    --base_only; a merged label-words run (a causal LM) predicts what its adapter predicts, by label words."""
    lw, head = tmp_path / "lw", tmp_path / "head"
    common = ["--max_steps", "2", "--lr", "3e-3", "--bnb_4bit_compute_dtype", "float32"]
    ft.main(tiny_args(tiny_model, mrpc, lw, "--classifier", "label_words", "--label_words", "no", "yes", *common))
    ft.main(tiny_args(tiny_model, mrpc, head, *common))
    zero = eval_cli.main(["--results_path", str(head), "--base_only", "--classifier", "label_words",
                          "--label_words", "no,yes"])
    own = eval_cli.main(["--results_path", str(lw), "--base_only"])
    assert zero["metrics"] == own["metrics"]
    assert (_rows(head / "evals" / "validation-perfect-label_words-base" / "predictions.csv")
            == _rows(lw / "evals" / "validation-perfect-base" / "predictions.csv"))
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(["--results_path", str(head), "--classifier", "label_words"])  # a trained head: refused
    assert exc.value.code == 2

    merged = tmp_path / "merged"
    merge.main(["--results_path", str(lw), "--output_dir", str(merged)])
    info = json.loads((merged / "qlora_cls.json").read_text())
    assert info["classifier"] == "label_words" and info["label_words"] == ["no", "yes"]
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    rows = [r for r in _rows(lw / "predictions_validation.csv")[1:]]
    data = tmp_path / "in.csv"
    import datasets
    val = datasets.load_dataset(mrpc, "mrpc", split="validation").select(range(len(rows)))
    val.select_columns(["idx", "sentence1", "sentence2"]).to_csv(data, index=False)
    for source in (lw, merged):
        out = tmp_path / f"{source.name}.csv"
        predict.main(["--results_path", str(source), "--input", str(data), "--output", str(out)])
        got = _rows(out)[1:]
        assert [g[1] for g in got] == [["not_equivalent", "equivalent"][int(r[2])] for r in rows]
        np.testing.assert_allclose([[float(x) for x in g[2:]] for g in got], [[float(x) for x in r[3:]] for r in rows],
                                   atol=2e-5)


def test_answer_slot_ends_the_prompt_and_label_words_follow_it(tiny_lm):
    """``{_answer}`` marks where the answer goes: the prompt ends there (its trailing space moves into the answer,
    so the label's tokens are the ones ``prompt + word`` has); text after the slot is refused in one line."""
    from qlora_cls import label_words
    from qlora_cls.errors import UsageError
    from qlora_cls.prompts import parse_template
    _, tok = tiny_lm
    t = parse_template("qa", "Same meaning? {sentence1} / {sentence2} Answer: {_answer}").bind(
        ["sentence1", "sentence2"], ["not_equivalent", "equivalent"])
    prompt = t.render({"sentence1": "a cat", "sentence2": "the cat"})
    assert prompt == "Same meaning? a cat / the cat Answer: " and "_answer" not in t.fields
    ids, cands = label_words.encode(tok, [prompt], ["yes", "no"], 64)
    full = tok(prompt + "yes")["input_ids"]
    assert ids[0] + cands[0][0] == full and tok.decode(cands[0][0]) == " yes"
    with pytest.raises(UsageError, match="must end the template"):
        parse_template("bad", "{sentence1} {_answer} Thanks.").bind(["sentence1"], None)


PROMPT_WITH_WORDS = ("# label_words: different, same\n"
                     "Does sentence 1 mean the same as sentence 2? Sentence 1: {sentence1} Sentence 2: {sentence2}\n")


def test_prompt_file_names_label_words_below_the_flag_above_the_label_names(tiny_model, mrpc, tmp_path):
    """A template file's first line ``# label_words: a, b`` gives the words (not part of the prompt); --label_words
    overrides it; without either the label names are the words. Token by token against the tokenizer."""
    from accelerate import Accelerator

    from qlora_cls.config import TrainConfig
    from qlora_cls.data import DataSource
    from qlora_cls.label_words import LabelWords
    from qlora_cls.modeling import load_tokenizer
    from qlora_cls.pipeline import prepare_data
    from qlora_cls.prompts import load_template
    path = tmp_path / "words.txt"
    path.write_text(PROMPT_WITH_WORDS)
    plain = tmp_path / "plain.txt"
    plain.write_text(PROMPT_WITH_WORDS.split("\n", 1)[1])
    template = load_template(str(path))
    assert template.label_words == ("different", "same") and "#" not in template.text
    tok = load_tokenizer(tiny_model)

    def words(prompt_file, flag):
        cfg = TrainConfig(model_dir=tiny_model, dataset=mrpc, classifier="label_words", label_words=flag)
        return prepare_data(DataSource.from_config(cfg), load_template(str(prompt_file)), tok, ["train"], 512,
                            {"train": 4}, Accelerator(cpu=True), label_words=LabelWords.of(cfg))
    data = words(path, None)
    assert data.words == ["different", "same"]
    row = data.task.splits["train"][0]
    prompt = (f"Does sentence 1 mean the same as sentence 2? Sentence 1: {row['sentence1']} "
              f"Sentence 2: {row['sentence2']}")
    expected = tok(prompt + " " + ["different", "same"][row["label"]])["input_ids"]
    assert data.batchers["train"][0]["input_ids"] == expected  # the prompt carries no trace of the words line
    assert words(path, ["no,yes"]).words == ["no", "yes"]
    assert words(plain, None).words == ["not equivalent", "equivalent"]


@pytest.mark.parametrize("first_line, line", [
    ("# label_words: different, same, maybe", "'# label_words:' line gives 3 word(s)"),
    ("# label_words: different,", "names no label words or an empty one"),
    ("# label_words: same, same", "two labels have the same words"),
])
def test_bad_label_words_line_of_a_prompt_file_is_one_line_and_exit_2(first_line, line, tiny_model, mrpc, tmp_path,
                                                                       capsys):
    path = tmp_path / "words.txt"
    path.write_text(first_line + "\n" + PROMPT_WITH_WORDS.split("\n", 1)[1])
    with pytest.raises(SystemExit) as exc:
        ft.main(["--model_dir", tiny_model, "--dataset", mrpc, "--results_path", str(tmp_path / "r"),
                 "--classifier", "label_words", "--prompt", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_run_records_its_prompt_files_label_words_and_eval_scores_with_them(tiny_model, mrpc, tmp_path):
    """The run's config.json holds the prompt file's words (as --label_words would), so eval.py on the run scores
    what training scored; the adapter's words are the file's, not the label names."""
    path = tmp_path / "words.txt"
    path.write_text(PROMPT_WITH_WORDS)
    run = tmp_path / "run"
    summary = ft.main(tiny_args(tiny_model, mrpc, run, "--classifier", "label_words", "--prompt", str(path),
                                "--max_steps", "2", "--max_eval_samples", "8", "--bnb_4bit_compute_dtype", "float32"))
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["label_words"] == ["different", "same"]
    assert config["config"]["label_words"] == ["different", "same"]
    assert not (run / "prompt.txt").read_text().startswith("#")
    result = eval_cli.main(["--results_path", str(run)])
    assert result["metrics"] == {k: summary["final"][k] for k in result["metrics"]}
    assert _rows(run / "evals" / "validation-words" / "predictions.csv") == _rows(run / "predictions_validation.csv")


def test_the_model_card_says_label_words_and_its_snippet_scores_as_the_run(tiny_model, mrpc, tmp_path, capsys):
    """adapter/README.md of a label-words run: the method line says so, and its stock-PEFT snippet (a causal LM,
    no head), run as written on a validation row, gives the label-word scores behind the run's probabilities."""
    import datasets
    path = tmp_path / "words.txt"
    path.write_text(PROMPT_WITH_WORDS)
    run = tmp_path / "run"
    ft.main(tiny_args(tiny_model, mrpc, run, "--classifier", "label_words", "--prompt", str(path), "--max_steps", "2",
                      "--max_eval_samples", "4", "--bnb_4bit_compute_dtype", "float32"))
    card = (run / "adapter" / "README.md").read_text()
    assert "no head: each label scored by its words after the prompt ('different', 'same')" in card
    assert "AutoPeftModelForSequenceClassification" not in card and "the head comes from this folder" not in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    header, first = _rows(run / "predictions_validation.csv")[:2]
    row = next(r for r in datasets.load_dataset(mrpc, "mrpc", split="validation") if r["idx"] == int(first[0]))
    line = next(x for x in code.splitlines() if x.startswith("row = "))
    code = code.replace(line, f"row = {{'sentence1': {row['sentence1']!r}, 'sentence2': {row['sentence2']!r}}}")
    capsys.readouterr()
    namespace = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    assert capsys.readouterr().out.strip() == ["not_equivalent", "equivalent"][int(first[2])]
    probs = torch.softmax(torch.tensor(namespace["scores"]), 0).numpy()
    assert header[3:] == ["prob_not_equivalent", "prob_equivalent"]
    np.testing.assert_allclose(probs, [float(x) for x in first[3:]], atol=1e-4)


def test_a_run_trained_on_label_names_keeps_them_under_a_prompt_file_that_names_words(tiny_model, mrpc, tmp_path):
    """eval.py --prompt FILE on a trained run: the adapter was trained on its words (here the label names), so the
    file's '# label_words:' line does not replace them; with --base_only it does."""
    path = tmp_path / "words.txt"
    path.write_text(PROMPT_WITH_WORDS)  # the text of MRPC's 'perfect', which the run trains with
    run = tmp_path / "run"
    ft.main(tiny_args(tiny_model, mrpc, run, "--classifier", "label_words", "--max_steps", "2",
                      "--max_eval_samples", "8", "--bnb_4bit_compute_dtype", "float32"))
    trained = eval_cli.main(["--results_path", str(run), "--prompt", str(path)])
    assert trained["label_words"] == ["not equivalent", "equivalent"]
    assert _rows(run / "evals" / "validation-words" / "predictions.csv") == _rows(run / "predictions_validation.csv")
    eval_cli.main(["--results_path", str(run), "--prompt", str(path), "--base_only"])
    base = json.loads((run / "evals" / "validation-words-base" / "metrics.json").read_text())
    assert base["label_words"] == ["different", "same"]


@pytest.mark.slow
def test_a_sweep_over_the_classifier_reports_both_beside_the_baseline_and_both_zero_shot_bases(tiny_lm, tiny_model,
                                                                                                mrpc, tmp_path):
    """sweep.py --classifier head label_words: both points finish; report.py shows two configurations with their
    runs' accuracy beside the trivial baseline, and the base model scored both ways as separate rows (never
    averaged together), the label-word one equal to an independent zero-shot computation."""
    import datasets

    import report
    import sweep
    from conftest import sweep_flags
    d = tmp_path / "sweep"
    flags = sweep_flags(tiny_model, mrpc)
    assert sweep.main(["--launcher", "python", "--sweep_dir", str(d), "--classifier", "head", "label_words",
                       "--eval_prompts", "perfect", "--method", "lora", "--bnb_4bit_compute_dtype", "float32",
                       *flags]) == 0
    points = json.loads((d / "sweep.json").read_text())["points"]
    assert {n: p["status"] for n, p in points.items()} == {"classifier=head": "finished",
                                                           "classifier=label_words": "finished"}
    out = report.main([str(d)])["out"]
    with open(out / "report.csv", newline="") as fh:
        rows = {r["configuration"]: r for r in csv.DictReader(fh)}
    train = datasets.load_dataset(mrpc, "mrpc", split="train").select(range(48))["label"]
    val = datasets.load_dataset(mrpc, "mrpc", split="validation").select(range(37))
    majority = max((0, 1), key=train.count)
    trivial = sum(y == majority for y in val["label"]) / 37
    for kind in ("head", "label_words"):
        row = rows[f"classifier={kind}"]
        final = json.loads((d / f"classifier={kind}" / "metrics.json").read_text())["final"]
        assert row["classifier"] == kind and row["n_runs"] == "1"
        assert float(row["accuracy_mean"]) == pytest.approx(final["accuracy"], abs=1e-12)
        assert float(row["baseline_accuracy"]) == pytest.approx(trivial, abs=1e-12)
    base = {k: r for k, r in rows.items() if k.startswith("base model")}
    assert sorted(base) == ["base model (un-tuned), label words, prompt=perfect",
                            "base model (un-tuned), new head, prompt=perfect"]
    assert all(r["n_runs"] == "1" for r in base.values())
    model, tok = tiny_lm  # the un-tuned base in float32, as --method lora --bnb_4bit_compute_dtype float32 loads it
    prompts = [f"Does sentence 1 mean the same as sentence 2? Sentence 1: {r['sentence1']} Sentence 2: {r['sentence2']}"
               for r in val]
    scores, _ = _independent_scores(model, tok, prompts, ["not equivalent", "equivalent"])
    zero_shot = float(np.mean(scores.argmax(1) == np.array(val["label"])))
    assert float(base["base model (un-tuned), label words, prompt=perfect"]["accuracy_mean"]) == pytest.approx(zero_shot)
    md = (out / "report.md").read_text()
    assert "| classifier=head | 1 |" in md and "| classifier=label_words | 1 |" in md and "trivial baseline" in md
    assert "('label words')" in md
