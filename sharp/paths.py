"""The one cache root of the project: ``$SHARP_CACHE`` (default ``~/.cache/sharp``).

Everything the project caches lives in a sub-folder of it: ``synthetic/`` (the benchmark's videos),
``toy/`` (preprocessed toy-training pixels), ``posc/`` (ShaRP's PosC biases).
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SHARP_CACHE"


def cache_root() -> Path:
    """``$SHARP_CACHE`` if set (and non-empty), else ``~/.cache/sharp``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sharp").expanduser()


def cache_dir(name: str) -> Path:
    """The sub-folder ``name`` of the cache root (not created)."""
    return cache_root() / name


def config_dir() -> Path:
    """The Hydra configs of the checkout (``configs/``: methods' per-backbone settings, sweeps)."""
    return Path(__file__).resolve().parents[1] / "configs"
