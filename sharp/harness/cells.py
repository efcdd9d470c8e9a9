"""A result cell: what identifies it, where it lives, whether it is finished.

Layout: ``<results_dir>/<backbone>/<method>[-<variant>]/r<retention>/`` (composed methods:
``fastv+sharp``; see :func:`method_dirname`) holding

- ``results.json``        lmms-eval's results (``simple_evaluate``'s dict without the samples)
- ``samples_<task>.jsonl`` per-sample logs (lmms-eval's format, doc_id order; ``failed``: why a request's
  video could not be used)
- ``requests.jsonl``      per-request measurements (visual tokens, prefill ms, TFLOPs, memory), in
  (task, doc_id) order whatever the batch size and number of processes; a failed request has
  ``failed`` (its reason) and ``video`` instead
- ``run.json``            written when the cell starts (host, pid, time): not a result
- ``summary.json``        written last, atomically: its presence marks a finished cell
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

SUMMARY = "summary.json"
RESULTS = "results.json"
REQUESTS = "requests.jsonl"
RUN_MARKER = "run.json"
_CELL_FILES = (RESULTS, REQUESTS, RUN_MARKER, "samples_*.jsonl", ".*.tmp")


def format_retention(retention: float) -> str:
    """0.25 -> '0.25', 1.0 -> '1', 0.2820 -> '0.282' (rounded to 6 decimals, trailing zeros dropped)."""
    value = round(float(retention), 6)
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def safe_name(text: str) -> str:
    """A folder name that is safe on every common filesystem and in a shell word: letters, digits and
    ``+-_.@`` stay ("fastv+sharp", "fastv@2"), anything else becomes ``_``; never "", "." or ".."."""
    safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "+-_.@" else "_" for ch in str(text))
    return safe if safe.strip(".") else safe.replace(".", "_") or "_"


def method_dirname(method: str, variant: Optional[str] = None) -> str:
    """``<method>`` or ``<method>-<variant>``; composed names keep their '+' (``fastv+sharp``)."""
    name = safe_name(method)
    if variant:
        return f"{name}-{safe_name(variant)}"
    return name


@dataclass
class Cell:
    backbone: str
    method: str
    retention: float
    tasks: list[str]
    variant: Optional[str] = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    limit: Optional[float] = None
    gen_kwargs: Optional[str] = None
    backbone_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. num_frames, dtype

    def key(self) -> dict:
        """What must match for a finished cell to count as this cell (JSON-normalised)."""
        d = asdict(self)
        d["retention"] = float(format_retention(self.retention))
        d["tasks"] = sorted(self.tasks)
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def relpath(self) -> Path:
        return Path(self.backbone) / method_dirname(self.method, self.variant) / f"r{format_retention(self.retention)}"

    def dir(self, results_dir: str | os.PathLike) -> Path:
        return Path(results_dir) / self.relpath()


def read_summary(cell_dir: str | os.PathLike) -> Optional[dict]:
    path = Path(cell_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None  # cannot happen with atomic writes, but a hand-edited file must not count


def key_diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} (finished) vs {b.get(k)!r} (requested)" for k in keys if a.get(k) != b.get(k)]


def status(cell: Cell, results_dir: str | os.PathLike) -> tuple[str, Optional[dict]]:
    """('finished' | 'mismatch' | 'partial' | 'missing', summary or None)."""
    d = cell.dir(results_dir)
    summary = read_summary(d)
    if summary is not None:
        return ("finished" if summary.get("cell") == cell.key() else "mismatch"), summary
    if d.is_dir() and any(d.iterdir()):
        return "partial", None
    return "missing", None


def clear_partial(cell_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted run left (never summary.json); returns the removed names."""
    removed = []
    for pattern in _CELL_FILES:
        for path in glob.glob(os.path.join(str(cell_dir), pattern)):
            if os.path.basename(path) != SUMMARY and os.path.isfile(path):
                os.unlink(path)
                removed.append(os.path.basename(path))
    return removed
