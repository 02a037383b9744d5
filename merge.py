"""Merge a run's adapter into a standalone transformers model folder (no PEFT, no bitsandbytes needed).

    python merge.py --results_path results/<run> --output_dir merged/<name>
    python merge.py --results_path results/<run> --output_dir M --merge_into original-16bit --dtype bfloat16

By default the LoRA (DoRA, IA3) weights are merged into the exact 4-bit base the adapter was trained
against, de-quantized to float32, so the merged model predicts what the adapter predicts. A full
fine-tuning run (--method full) is exported as its trained weights (nothing to merge). The folder
(config.json + model.safetensors, tokenizer, prompt.txt, qlora_cls.json, README.md model card) loads
with AutoModelForSequenceClassification.from_pretrained. See qlora_cls/merging.py.

A generative run (ft.py --objective sft|lm) is merged the same way into an AutoModelForCausalLM folder:
config.json + model.safetensors (embeddings resized to any turn markers its chat template added),
generation_config.json (stops on the run's end of turn), the tokenizer with its chat template,
qlora_cls.json (objective, chat template, end of turn, stop ids, added tokens, metrics) and README.md;
its greedy generations are the adapter's.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import MergeConfig
from qlora_cls.errors import UsageError


def main(argv: Optional[Sequence[str]] = None) -> Path:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        mcfg = parse_dataclass(MergeConfig, argv, "merge.py", __doc__)
        from qlora_cls.runs import load_run_config
        from qlora_cls.merging import merge_run
        run_dir = Path(mcfg.results_path)
        cfg, records = load_run_config(run_dir)
        if mcfg.model_dir is not None:
            cfg = dataclasses.replace(cfg, model_dir=mcfg.model_dir, tokenizer_dir=mcfg.model_dir)
        out = merge_run(cfg, records, run_dir, Path(mcfg.output_dir), mcfg.adapter, mcfg.merge_into, mcfg.dtype)
    except UsageError as exc:
        sys.stderr.write(f"merge.py: error: {exc}\n")
        raise SystemExit(2)
    print(f"merged model: {out}")
    return out


if __name__ == "__main__":
    main()
