"""Where the benchmark scripts leave their results: one time-stamped JSON (and Markdown table) per run."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional


def write_result(out_dir, prefix: str, result: dict, markdown: Optional[str] = None, tag: str = "bench") -> Path:
    """``<out_dir>/<prefix><timestamp>.json`` (and ``.md`` with ``markdown``, also printed); the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{prefix}{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if markdown is None:
        print(f"[{tag}] wrote {path}")
        return path
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"[{tag}] wrote {path} and {path.with_suffix('.md')}")
    return path
