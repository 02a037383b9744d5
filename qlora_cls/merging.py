"""A run's adapter merged into a standalone ``AutoModelForSequenceClassification`` folder (merge.py), or for
a generative run (``--objective sft|lm``) an ``AutoModelForCausalLM`` folder (``merge_generative``). A
``--classifier label_words`` run merges into an ``AutoModelForCausalLM`` folder with the classification
folder's files (``prompt.txt``, ``qlora_cls.json`` with ``classifier`` and ``label_words``): eval.py and
predict.py keep scoring it by its labels' words.

The adapter was trained against the *4-bit* base: its LoRA (DoRA, IA3) weights correct what that
quantized model computes. So by default the merged weights are that exact base de-quantized
(transformers' ``PreTrainedModel.dequantize``, which replaces each bitsandbytes ``Linear4bit`` by an
``nn.Linear`` holding ``bitsandbytes.functional.dequantize_4bit`` of its weight) plus the adapter, merged
by PEFT's ``merge_and_unload`` in float32: its predictions are the adapter's. ``--merge_into
original-16bit`` merges into the base's original weights instead (what the adapter was *not* trained
on: predictions move by the quantization error). The result loads with plain transformers: no PEFT
modules, no bitsandbytes layers, no quantization config.

Folder layout (the interface eval.py/predict.py read; ``MERGED_FORMAT``): ``config.json`` +
``model.safetensors`` (id2label/label2id/problem_type/pad_token_id set), tokenizer files (right
padding, pad token set), ``prompt.txt`` (the run's template), ``qlora_cls.json`` (what the model is
and how well it did) and ``README.md`` (model card). Written under a temporary name and renamed:
complete or absent. A generative run's folder has no ``prompt.txt``: its tokenizer carries the chat template
(and the template's added turn markers; the embeddings are resized to them), ``generation_config.json`` stops
on the run's stop ids, and ``qlora_cls.json`` says the objective, chat template, end of turn and stop ids.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import UsageError

log = logging.getLogger(__name__)

MERGED_FORMAT = "qlora-cls-merged/1"
MERGED_INFO = "qlora_cls.json"
# Bottleneck adapters are modules of this toolkit wrapped around the base's layers: no transformers
# architecture has them, so no plain folder can hold them (eval.py / predict.py run them from the run folder).
NOT_MERGEABLE = ("adapter",)


def run_method(config: dict) -> str:
    """config.json's ``method``; runs written before the field existed: qlora in 4 bit, else lora."""
    return config.get("method") or ("qlora" if config.get("load_in_4bit", True) else "lora")


def is_generative(records: dict) -> bool:
    return records.get("config", {}).get("objective", "classification") != "classification"


def check_merge(cfg, records: dict, run_dir: Path, adapter: str, merge_into: str, output_dir: Path) -> str:
    """Everything cheap, before any weight is read; returns the resolved ``merge_into``."""
    from .files import read_json
    from .methods import has_saved_weights
    method = run_method(records.get("config", {}))
    adapter_dir = run_dir / adapter
    if not (run_dir / "metrics.json").is_file():
        raise UsageError(f"{run_dir} has no metrics.json: the run did not finish; resume it by running its ft.py "
                         f"command again with --resume, then merge")
    other = "" if adapter == "adapter" else " (use --adapter adapter)"
    if method in NOT_MERGEABLE or (method != "full" and adapter_dir.is_dir()
                                   and not (adapter_dir / "adapter_config.json").is_file()):
        raise UsageError(f"{adapter_dir}: method {method!r} saves no PEFT adapter (adapter_config.json), so there is "
                         f"nothing to merge into a plain transformers model; merge.py exports LoRA, DoRA, IA3 and "
                         f"full fine-tuning runs (eval.py and predict.py run this one from its run folder)")
    if method == "full":
        if not has_saved_weights(adapter_dir):
            raise UsageError(f"{adapter_dir} holds no trained weights (weights.safetensors){other}")
    elif not (adapter_dir / "adapter_config.json").is_file():
        raise UsageError(f"{adapter_dir} has no adapter (adapter_config.json){other}")
    if method != "full":
        peft_type = read_json(adapter_dir / "adapter_config.json").get("peft_type")
        if peft_type not in ("LORA", "IA3"):
            raise UsageError(f"{adapter_dir} is a {peft_type} adapter; merge.py merges LORA (incl. DoRA) and IA3")
    if not is_generative(records) and not (run_dir / "prompt.txt").is_file():
        raise UsageError(f"{run_dir} has no prompt.txt")
    if output_dir.exists():
        raise UsageError(f"--output_dir {output_dir} already exists; give a new folder (nothing is overwritten)")
    if not output_dir.parent.is_dir():
        raise UsageError(f"--output_dir {output_dir}: its parent folder {output_dir.parent} does not exist")
    if merge_into == "auto":
        return "dequantized-4bit" if cfg.load_in_4bit else "original-16bit"
    if merge_into == "dequantized-4bit" and not cfg.load_in_4bit:
        raise UsageError(f"--merge_into dequantized-4bit: {run_dir} trained on a 16-bit base (load_in_4bit false); "
                         f"there is no 4-bit base to de-quantize (use --merge_into original-16bit or auto)")
    return merge_into


def quantization_modules(model) -> list[str]:
    """Names of modules that need PEFT or bitsandbytes to run (none may be left in a merged model)."""
    return [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
            if type(module).__module__.startswith(("peft.", "bitsandbytes."))]


def merged_model(cfg, model_path: str, adapter_dir: Path, num_labels: Optional[int], pad_token_id: int,
                 merge_into: str, device: str = "cpu", vocab_size: Optional[int] = None):
    """The base (de-quantized 4-bit or original) with the adapter merged in, as a plain transformers model.
    ``num_labels`` None: the causal LM of a generative run; ``vocab_size``: its tokenizer's when the chat template
    added tokens (the base's embeddings are resized to it, as ft.py resized them, before the adapter is loaded).

    A full fine-tuning run has nothing to merge: its saved weights (every parameter) are loaded into the
    base's architecture in float32 (a bf16 run's values widen exactly)."""
    from peft import PeftModel

    from .methods import load_saved
    from .modeling import load_base_model
    if cfg.method == "full":
        base = load_base_model(dataclasses.replace(cfg, bnb_4bit_compute_dtype="float32", gradient_checkpointing=False),
                               model_path, num_labels, pad_token_id, {"": device},
                               vocab_size=vocab_size)
        return load_saved(base.float(), str(adapter_dir))
    if merge_into == "dequantized-4bit":
        base = load_base_model(dataclasses.replace(cfg, gradient_checkpointing=False), model_path, num_labels,
                               pad_token_id, {"": device}, vocab_size=vocab_size)
        # The adapter's base exactly: each 4-bit weight de-quantized with its own quant_state, in float32 (a
        # bf16-compute run stored bf16 values: widening them is exact).
        base = base.dequantize(dtype=torch.float32)
        # dequantize() removes the quantization config but leaves this flag set, and PEFT's IA3 merge refuses
        # a model that says it is 4-bit (no 4-bit layer is left: quantization_modules checks below).
        base.is_loaded_in_4bit = False
    else:
        # The same method on a 16-bit base: QLoRA's adapter is a LoRA adapter there.
        sixteen = dataclasses.replace(cfg, method="lora" if cfg.method == "qlora" else cfg.method, load_in_4bit=False,
                                      bnb_4bit_compute_dtype="float32", gradient_checkpointing=False)
        base = load_base_model(sixteen, model_path, num_labels, pad_token_id, {"": device}, vocab_size=vocab_size)
    base = base.float()
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model = model.merge_and_unload()  # float32 base + float32 adapter: the merge rounds once, in float32
    left = quantization_modules(model)
    if left:  # pragma: no cover - a new PEFT/bitsandbytes layer type that merge_and_unload did not remove
        raise RuntimeError(f"merged model still holds PEFT/bitsandbytes modules: {', '.join(left[:3])}")
    return model


def merge_run(cfg, records: dict, run_dir: Path, output_dir: Path, adapter: str = "adapter",
              merge_into: str = "auto", dtype: str = "float32") -> Path:
    """Write the merged folder for ``run_dir``'s ``adapter``; returns ``output_dir``."""
    from .files import current_umask, crash_safe_dir, atomic_write_json, atomic_write_text, read_json
    from .modelcard import scores_of
    from .modeling import DTYPE
    from .pipeline import check_model_paths, tokenizer_for

    merge_into = check_merge(cfg, records, run_dir, adapter, merge_into, output_dir)
    check_model_paths(cfg.model_dir, cfg.tokenizer_dir)
    if is_generative(records):
        return merge_generative(cfg, records, run_dir, output_dir, adapter, merge_into, dtype)
    resolved = records.get("resolved", {})
    summary = read_json(run_dir / "metrics.json")
    model_path, tokenizer = tokenizer_for(cfg)
    num_labels = int(resolved.get("num_labels") or 2)
    label_names = resolved.get("label_names")
    words = cfg.classifier == "label_words"  # the causal LM, scored by its labels' words: no head to set up
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = merged_model(cfg, model_path, run_dir / adapter, None if words else num_labels, tokenizer.pad_token_id,
                         merge_into, device)
    model = model.to(DTYPE[dtype])
    config = model.config
    config.pad_token_id = tokenizer.pad_token_id
    if not words:
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if label_names and not words:
        config.id2label = {i: n for i, n in enumerate(label_names)}
        config.label2id = {n: i for i, n in enumerate(label_names)}
    config.use_cache = True  # training switched it off; a plain model keeps the library default
    metrics = {k: v for k, v in scores_of(summary, adapter).items() if k in (resolved.get("metrics") or [])}
    info = {"format": MERGED_FORMAT, "source_run": str(run_dir.resolve()), "adapter": adapter,
            "task": resolved.get("task"), "label_names": label_names, "text_columns": resolved.get("text_columns"),
            "prompt_name": resolved.get("prompt_name"), "max_length": cfg.max_length, "num_labels": num_labels,
            "main_metric": resolved.get("main_metric"), "metrics": metrics, "eval_split": resolved.get("eval_split"),
            "baseline": summary.get("baseline") or resolved.get("baseline"), "merged_into": merge_into,
            "base_model": model_path, "dtype": dtype,
            "peft_type": (read_json(run_dir / adapter / "adapter_config.json").get("peft_type")
                          if (run_dir / adapter / "adapter_config.json").is_file() else None),
            "method": run_method(records.get("config", {})), "classifier": cfg.classifier}
    if words:  # eval.py / predict.py score the merged LM by the same words (runs.Source.scoring)
        info.update(label_words=resolved.get("label_words"), length_normalize=cfg.length_normalize)
    template = (run_dir / "prompt.txt").read_text(encoding="utf-8")
    tokenizer.padding_side = "right"
    tokenizer.init_kwargs["padding_side"] = "right"  # saved in tokenizer_config.json: the head pools the last real token
    with crash_safe_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")  # one model.safetensors
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "prompt.txt", template)
        atomic_write_json(tmp / MERGED_INFO, info)
        atomic_write_text(tmp / "README.md", model_card(output_dir, info, records, summary, template.rstrip("\r\n")))
        for f in tmp.iterdir():  # safetensors writes 0600; the folder's other files honour the umask
            os.chmod(f, 0o666 & ~current_umask())
    log.info("merged %s/%s into %s (%s, %s)", run_dir, adapter, output_dir, merge_into, dtype)
    return output_dir


def model_card(output_dir: Path, info: dict, records: dict, summary: dict, template: str) -> str:
    """README.md of a merged folder: what it is, how it was merged, how well it does, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .modelcard import metrics_table
    resolved = records.get("resolved", {})
    run = summary.get("run", {})
    names = info["label_names"]
    metrics = list(resolved.get("metrics") or [])
    baseline = info.get("baseline") or {}
    full = info.get("method") == "full"
    how = ("nothing: every weight was trained (full fine-tuning), and these are the trained weights "
           f"(saved by ft.py in {info.get('adapter', 'adapter')}/weights.safetensors, loaded into the base's "
           "architecture in float32; a bf16 run's values widen exactly)." if full else
           "the exact 4-bit NF4 base the adapter was trained against, de-quantized to float32 "
           "(`bitsandbytes.functional.dequantize_4bit` of every quantized weight, via transformers' "
           "`PreTrainedModel.dequantize`), with the adapter merged in by PEFT's `merge_and_unload` in float32. Its "
           "predictions are the adapter's (same argmax; logits equal within float rounding). "
           "`merge.py --merge_into original-16bit` merges into the original 16-bit weights instead, which the "
           "adapter was not trained against (predictions then move by the quantization error)."
           if info["merged_into"] == "dequantized-4bit" else
           "the base model's original (unquantized) weights in float32, with the adapter merged in by PEFT's "
           "`merge_and_unload`." + (" The adapter was trained against the 4-bit quantized base, so predictions "
                                    "differ from the adapter's by the quantization error; the default "
                                    "(`--merge_into dequantized-4bit`) reproduces them."
                                    if records.get("config", {}).get("load_in_4bit") else ""))
    fields = info.get("text_columns") or []
    example = "{" + ", ".join(f'"{c}": "..."' for c in fields) + "}"
    snippet = "\n".join([
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f"path = {json.dumps(str(output_dir.resolve()))}",
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()",
        "tokenizer = AutoTokenizer.from_pretrained(path)  # right padding, pad token set",
        f"template = {json.dumps(template)}  # prompt.txt: {{field}} = a text column",
        f"rows = [{example}]",
        "texts = [template.format(**r) for r in rows]",
        f"batch = tokenizer(texts, padding=True, truncation=True, max_length={info['max_length']}, return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    logits = model(**batch).logits.float()",
        "print(logits[:, 0].tolist())" if info["num_labels"] == 1 else
        "print([model.config.id2label[i] for i in logits.argmax(-1).tolist()])"])
    if info.get("classifier") == "label_words":  # a causal LM: each label's words scored after the prompt
        snippet = "\n".join([
            "import torch",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"path = {json.dumps(str(output_dir.resolve()))}",
            "model = AutoModelForCausalLM.from_pretrained(path).eval()",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            f"template = {json.dumps(template)}  # prompt.txt: {{field}} = a text column",
            f"words = {json.dumps(info.get('label_words'))}  # label i's words",
            f"row = {example}",
            "prompt = template.format(**row)",
            "n = len(tokenizer(prompt)['input_ids'])",
            "scores = []",
            "for w in words:  # the log-likelihood of ' ' + words after the prompt",
            "    ids = tokenizer(prompt + ' ' + w, return_tensors='pt')['input_ids']",
            "    with torch.no_grad():",
            "        logp = model(ids).logits[0, :-1].float().log_softmax(-1)",
            "    scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1])))",
            f"print({json.dumps(names)}[max(range(len(scores)), key=scores.__getitem__)])"])
    data = ModelCardData(base_model=info["base_model"], library_name="transformers", pipeline_tag="text-classification",
                         tags=["text-classification", "full-fine-tune" if full else "merged-adapter",
                               str(info.get("task"))], metrics=metrics)
    scores = dict(info.get("metrics") or {})
    text = f"""
# {info.get('task')} classifier: {run.get('model') or info['base_model']} {'fine-tuned' if full else 'with its adapter merged'}

A standalone `AutoModelForSequenceClassification` (no PEFT, no bitsandbytes needed), made by qlora-cls
`merge.py` from `{info['source_run']}/{info.get('adapter', 'adapter')}`.

- **Base model:** `{info['base_model']}`
- **Trained:** {run.get('method') or info.get('method')}; {run.get('training', '')}
- **Merged into:** {how}
- **Weights:** {info['dtype']}
- **Task:** {info.get('task')}; labels: {', '.join(f'{i} = {n}' for i, n in enumerate(names)) if names else 'a number (regression)'}
- **Prompt** `{info.get('prompt_name')}` (the text the model reads, `prompt.txt`):

  ```
  {template}
  ```

## Evaluation (of the {'trained weights' if full else 'adapter'}, on {run.get('eval') or info.get('eval_split')})

{metrics_table(scores, baseline, metrics, "this model")}

The trivial baseline {baseline.get('description', 'is not recorded')}, scored with the same metric code.

## How to use (plain transformers)

```python
{snippet}
```

`qlora_cls.json` holds the same facts for programs (labels, text columns, max length, metrics, baseline).
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))


def generative_tokenizer(cfg, records: dict):
    """``(model_path, tokenizer)`` of a generative run as ft.py built it: the base's tokenizer with the run's chat
    template set and its turn markers added (``sft.chat_format``: the same ids in the same order)."""
    from . import sft
    from .pipeline import tokenizer_for
    model_path, tokenizer = tokenizer_for(cfg)
    if cfg.objective == "sft":
        check_chat_format(sft.chat_format(tokenizer, cfg.chat_template), tokenizer, records, model_path)
    return model_path, tokenizer


def check_chat_format(fmt, tokenizer, records: dict, model_path: str) -> None:
    """The chat format rebuilt now is the one the run trained with (config.json): same added markers, same end of
    turn id (a --model_dir override or a changed tokenizer would shift them)."""
    resolved = records.get("resolved", {})
    eot = tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
    if fmt.added_tokens != (resolved.get("added_tokens") or []) or [eot] != (resolved.get("stop_ids") or [])[:1]:
        raise UsageError(f"the tokenizer of {model_path} with chat template {fmt.name} is not the one the run trained "
                         f"with (added tokens {fmt.added_tokens}, end of turn {fmt.end_of_turn!r} = id {eot}; "
                         f"config.json: {resolved.get('added_tokens')}, {resolved.get('end_of_turn')!r} = "
                         f"{(resolved.get('stop_ids') or [None])[0]})")


def generative_scores(summary: dict, adapter: str) -> dict:
    """A generative run's metrics of adapter/ (final) or adapter_best/ (the evaluation at its best step)."""
    if adapter == "adapter":
        return dict(summary.get("final") or {})
    return next((dict(e) for e in summary.get("evaluations", []) if e.get("step") == summary.get("best_step")), {})


def merge_generative(cfg, records: dict, run_dir: Path, output_dir: Path, adapter: str, merge_into: str,
                     dtype: str) -> Path:
    """merge_run for ``--objective sft|lm``: an ``AutoModelForCausalLM`` folder whose greedy generations are the
    adapter's (tests/test_merge_generative.py), merged the same way as a classification run."""
    from accelerate.utils import set_seed

    from .files import current_umask, crash_safe_dir, atomic_write_json, atomic_write_text, read_json
    from .modeling import DTYPE

    resolved = records.get("resolved", {})
    summary = read_json(run_dir / "metrics.json")
    model_path, tokenizer = generative_tokenizer(cfg, records)
    added = list(resolved.get("added_tokens") or [])
    stop_ids = list(resolved.get("stop_ids") or [])
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    set_seed(cfg.seed)  # the resized rows start as in ft.py (the adapter stores the trained embeddings anyway)
    model = merged_model(cfg, model_path, run_dir / adapter, None, tokenizer.pad_token_id, merge_into, device,
                         vocab_size=len(tokenizer) if added else None)
    model = model.to(DTYPE[dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True  # training switched it off; generation wants the KV cache
    if stop_ids:  # a plain model.generate() stops where the run's generations stopped: on the end of turn
        model.generation_config.eos_token_id = stop_ids
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    scores = generative_scores(summary, adapter)
    info = {"format": MERGED_FORMAT, "source_run": str(run_dir.resolve()), "adapter": adapter,
            "objective": cfg.objective, "task": resolved.get("task") or cfg.objective,
            "chat_template": resolved.get("prompt_name") if cfg.objective == "sft" else None,
            "end_of_turn": resolved.get("end_of_turn"), "stop_ids": stop_ids, "added_tokens": added,
            "max_length": cfg.max_length, "main_metric": resolved.get("main_metric"),
            "metrics": {k: scores[k] for k in (resolved.get("metrics") or []) if k in scores},
            "eval_split": resolved.get("eval_split"),
            "base_model_metrics": (summary.get("baseline") or {}).get("metrics"),
            "merged_into": merge_into, "base_model": model_path, "dtype": dtype,
            "peft_type": (read_json(run_dir / adapter / "adapter_config.json").get("peft_type")
                          if (run_dir / adapter / "adapter_config.json").is_file() else None),
            "method": run_method(records.get("config", {}))}
    tokenizer.padding_side = "left"  # a decoder continues from the last position: batched prompts pad on the left
    tokenizer.init_kwargs["padding_side"] = "left"
    with crash_safe_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")  # one model.safetensors
        tokenizer.save_pretrained(tmp)  # its chat template and the added turn markers included
        atomic_write_json(tmp / MERGED_INFO, info)
        atomic_write_text(tmp / "README.md", generative_model_card(output_dir, info, summary))
        for f in tmp.iterdir():  # safetensors writes 0600; the folder's other files honour the umask
            os.chmod(f, 0o666 & ~current_umask())
    log.info("merged %s/%s into %s (%s, %s)", run_dir, adapter, output_dir, merge_into, dtype)
    return output_dir


def generative_model_card(output_dir: Path, info: dict, summary: dict) -> str:
    """README.md of a merged generative folder: what it is, its figures beside the base model's, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .modelcard import figures_table
    run = summary.get("run", {})
    base = info.get("base_model_metrics") or {}
    names = list(info["metrics"])
    table = figures_table([("this model", info["metrics"]), ("the base model", base)], names)
    if info["objective"] == "sft":
        use = "\n".join([
            'messages = [{"role": "user", "content": "..."}]',
            'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,',
            '                                     return_tensors="pt")["input_ids"]',
            "out = model.generate(ids, max_new_tokens=128)  # generation_config.json stops on the end of turn",
            "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"])
    else:
        use = "\n".join(['ids = tokenizer("...", return_tensors="pt").input_ids',
                         "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))"])
    data = ModelCardData(base_model=info["base_model"], library_name="transformers", pipeline_tag="text-generation",
                         tags=["text-generation", "merged-adapter", info["objective"]])
    text = f"""
# {run.get('model') or info['base_model']} with its {info['objective']} adapter merged

A standalone `AutoModelForCausalLM` (no PEFT, no bitsandbytes needed), made by qlora-cls `merge.py` from
`{info['source_run']}/{info['adapter']}`, merged into the {info['merged_into']} base weights ({info['dtype']}).

- **Trained:** {run.get('method') or info.get('method')}; {run.get('training', '')}
- **Chat template:** {info.get('chat_template') or 'none (plain text)'}; end of turn `{info.get('end_of_turn')}`,
  stop ids {info['stop_ids']}; added tokens: {', '.join(info['added_tokens']) or 'none'}

## Evaluation (of the adapter, on the run's held-out {info.get('eval_split')} data)

{table}

## How to use (plain transformers)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = {json.dumps(str(output_dir.resolve()))}
model = AutoModelForCausalLM.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
{use}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))
