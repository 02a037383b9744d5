"""Telling a local folder from a hub id, and failing fast when the hub cannot be reached.

Without this, an unreachable hub costs 25-50 s of retries inside ``datasets``/``transformers`` before
an error that does not say what to do. We try one TCP connection (a few seconds at most); when the
hub is unreachable and nothing is cached we stop with one line, and when it is cached we switch the
libraries to offline mode so they read the cache without retrying.
"""
from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import UsageError

_reachable: bool | None = None


def looks_local(name: str) -> bool:
    """A path the user meant as a folder (exists, or is written like a path rather than ``org/name``)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_reachable(timeout: float = 3.0) -> bool:
    global _reachable
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    if _reachable is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _reachable = True
        except OSError:
            _reachable = False
    return _reachable


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for name in ("huggingface_hub.constants", "datasets.config"):  # read at import time: update the live constants too
        try:
            importlib.import_module(name).HF_HUB_OFFLINE = True
        except Exception:  # pragma: no cover - optional
            pass


def check_model_source(name: str, flag: str) -> None:
    """A model/tokenizer location must be a folder, or a hub id that is reachable or cached."""
    if looks_local(name):
        p = Path(name).expanduser()
        if not p.is_dir():
            raise UsageError(f"{flag} {name}{' is a file' if p.is_file() else ': no such folder'} (give a local "
                             f"model folder or a hub id like meta-llama/Meta-Llama-3-8B)")
        if not (p / "config.json").is_file() and not any(p.glob("*.gguf")) and flag != "--tokenizer_dir":
            raise UsageError(f"{flag} {name}: folder has no config.json; is it a transformers model folder?")
        return
    if hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(name, "config.json" if flag != "--tokenizer_dir" else "tokenizer_config.json")
    if not isinstance(cached, str):
        raise UsageError(f"{flag} {name}: the Hugging Face hub is unreachable (offline?) and the model is not in "
                         f"the local cache; download it elsewhere and pass its folder")
    _go_offline()


def check_dataset_source(name: str) -> None:
    if looks_local(name):
        p = Path(name).expanduser()
        if not p.is_dir():
            raise UsageError(f"--dataset {name}{' is a file' if p.is_file() else ': no such folder'} (give a folder "
                             f"in hub layout or a hub id like nyu-mll/glue)")
        return
    if hub_reachable():
        return
    from datasets import config as dc
    cache = Path(dc.HF_DATASETS_CACHE) / name.replace("/", "___")
    if not cache.exists():
        raise UsageError(f"--dataset {name}: the Hugging Face hub is unreachable (offline?) and the dataset is not "
                         f"cached; pass a local folder in hub layout (e.g. --dataset ../shared/data/glue)")
    _go_offline()
