import pytest

from qlora_cls.errors import UsageError
from qlora_cls.prompts import available_templates, load_template, parse_template

ROW = {"sentence1": "A cat sat.", "sentence2": "A cat was sitting.", "label": 1}


def test_reference_templates_render_exactly():
    assert set(available_templates("mrpc")) >= {"none", "perfect", "conflicting", "insufficient"}
    assert load_template("none", "mrpc").render(ROW) == "Sentence 1: A cat sat. Sentence 2: A cat was sitting."
    assert load_template("perfect", "mrpc").render(ROW) == (
        "Does sentence 1 mean the same as sentence 2? Sentence 1: A cat sat. Sentence 2: A cat was sitting.")
    assert load_template("conflicting", "mrpc").render(ROW).startswith(
        "Bob sent a message to Alice, which one is better? S")
    assert load_template("insufficient", "mrpc").render(ROW).startswith("Cut the crap, what's your GPA? Sentence 1:")


def test_empty_prompt_leaves_no_stray_space():
    text = load_template("none", "mrpc").render(ROW)
    assert text == text.strip() and "  " not in text


def test_generic_templates_are_filled_from_the_run():
    bound = load_template("perfect").bind(["title", "body_text"], ["neg", "pos"])  # no task: prompts/any/
    assert bound.text == "Which of these labels fits: neg, pos? Title: {title} Body text: {body_text}"
    assert bound.render({"title": "T", "body_text": "B"}) == "Which of these labels fits: neg, pos? Title: T Body text: B"
    assert load_template("none").bind(["text"], None).text == "Text: {text}"
    # names with braces stay literal text after binding (prompt.txt is re-read as a template)
    odd = load_template("perfect").bind(["text"], ["{a}", "b"])
    assert odd.render({"text": "x"}) == "Which of these labels fits: {a}, b? Text: x"


def test_a_task_falls_back_to_any_and_lists_its_names():
    assert load_template("none", "sst2").text == "Sentence: {sentence}"
    with pytest.raises(UsageError) as exc:
        load_template("nope", "sst2")
    assert "prompts/sst2/ and prompts/any/" in str(exc.value) and "insufficient" in str(exc.value)


@pytest.mark.parametrize("text,message", [("", "is empty"), ("\n\n", "is empty"), ("Just words.", "no field")])
def test_templates_that_cannot_show_the_data_are_refused(tmp_path, text, message):
    p = tmp_path / "t.txt"
    p.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_template(str(p)).bind(["sentence1", "sentence2"], ["a", "b"])


def test_template_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("Caf\xe9 {sentence1}".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        load_template(str(p))


def test_template_from_path(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("Q: {sentence1} | {sentence2}\n")
    t = load_template(str(p))
    assert t.name == "mine" and t.render(ROW) == "Q: A cat sat. | A cat was sitting."


@pytest.mark.parametrize("text", ["{sentence1.__class__}", "{sentence1[0]}", "{sentence1!r}", "{sentence1:>10}", "{}"])
def test_unsafe_fields_rejected(text):
    with pytest.raises(UsageError, match="not allowed"):
        parse_template("evil", text)


def test_missing_field_names_template_field_and_columns():
    t = parse_template("t", "{question} {sentence2}")
    with pytest.raises(UsageError) as exc:
        t.check_columns(["sentence1", "sentence2", "label"])
    msg = str(exc.value)
    assert "'t'" in msg and "question" in msg and "sentence1, sentence2, label" in msg


def test_unknown_prompt_lists_valid_ones():
    with pytest.raises(UsageError) as exc:
        load_template("nonexistent")
    assert "perfect" in str(exc.value) and "none" in str(exc.value)


def test_literal_braces():
    assert parse_template("b", "{{x}} {sentence1}").render(ROW) == "{x} A cat sat."


def test_prompts_readme_lists_every_shipped_template():
    from qlora_cls.prompts import PROMPTS_DIR
    table = (PROMPTS_DIR / "README.md").read_text()
    files = sorted(PROMPTS_DIR.glob("*/*.txt"))
    assert len(files) == 40
    for f in files:
        text = f.read_text(encoding="utf-8").rstrip("\n")
        assert f"| {f.parent.name} | {f.stem} | `{text}` |" in table, f
