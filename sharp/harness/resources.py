"""Check that weights and datasets are on disk, and explain what is missing and how to fetch it.

On an offline machine (``HF_HUB_OFFLINE=1`` and friends) a run whose model weights or benchmark data
are not in the Hugging Face cache fails *before* loading anything, with a message that names the hub
ids, the ``HF_HOME`` layout lmms-eval expects and the commands that fetch them. Without the offline
flags the run goes on (lmms-eval and transformers download what they need); if a download fails, the
error raised from the depths of the stack is translated into the same message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from sharp.harness.benchmarks import BENCHMARKS


class HarnessError(RuntimeError):
    """An error the harness reports as a message, without a stack trace."""


class MissingResourceError(HarnessError):
    pass


# Hub checkpoints of the paper's backbones (the same as lmms-eval's llava_hf / qwen2_vl defaults).
BACKBONE_HUB = {
    "llava_onevision_7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "qwen2_vl_7b": "Qwen/Qwen2-VL-7B-Instruct",
    "llava_video_7b": "llava-hf/LLaVA-Video-7B-Qwen2-hf",
    "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3_vl_8b": "Qwen/Qwen3-VL-8B-Instruct",
}

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class Missing:
    what: str      # "weights" | "dataset"
    name: str      # hub id
    detail: str    # where it was looked for
    fetch: list[str]


def offline_mode() -> bool:
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in OFFLINE_FLAGS)


def hf_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))


def hub_cache() -> Path:
    default = hf_home() / "hub"
    return Path(os.path.expanduser(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", default))))


def _repo_dir(repo_id: str, repo_type: str) -> Path:
    return hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _has_snapshot(repo_id: str, repo_type: str, required: Iterable[str] = ()) -> bool:
    snaps = _repo_dir(repo_id, repo_type) / "snapshots"
    if not snaps.is_dir():
        return False
    for snap in snaps.iterdir():
        if all((snap / f).exists() for f in required):
            return True
    return False


def check_weights(backbone: str, hub_id: Optional[str] = None) -> list[Missing]:
    hub_id = hub_id or BACKBONE_HUB.get(backbone)
    if not hub_id or os.path.isdir(hub_id):  # tiny/toy backbones, or a local folder
        return []
    if _has_snapshot(hub_id, "model", ["config.json"]):
        return []
    return [Missing(
        "weights", hub_id,
        f"backbone {backbone}: no snapshot with config.json under {_repo_dir(hub_id, 'model')}/snapshots/",
        [f"hf download {hub_id}"],
    )]


def check_method_weights(backbone: str, method: Optional[str], hub_id: Optional[str] = None) -> list[Missing]:
    """Hub weights a method needs besides the backbone's: SigLIP's attention-pooling head for a method
    that reads ``ctx.frame_pooling`` (FastVID) on a pretrained backbone whose family reloads it."""
    from sharp.backbones import backbone_family, family_class
    from sharp.backbones.vision import SIGLIP_HEAD_FILE, SIGLIP_HEAD_HUB
    from sharp.methods.registry import leaf_classes

    hub_id = hub_id or BACKBONE_HUB.get(backbone)
    if not method or not hub_id or os.path.isdir(hub_id):  # tiny/toy backbones get a random head
        return []
    if not any(cls.reads_frame_pooling for cls in leaf_classes(method)):
        return []
    if not hasattr(family_class(backbone_family(backbone)), "pooling_head"):  # Qwen families: no head
        return []
    if _has_snapshot(SIGLIP_HEAD_HUB, "model", [SIGLIP_HEAD_FILE]):
        return []
    return [Missing(
        "weights", SIGLIP_HEAD_HUB,
        f"method {method} on {backbone}: SigLIP's attention-pooling head (FastVID reloads it; LLaVA drops it), "
        f"no snapshot with {SIGLIP_HEAD_FILE} under {_repo_dir(SIGLIP_HEAD_HUB, 'model')}/snapshots/",
        [f"hf download {SIGLIP_HEAD_HUB} {SIGLIP_HEAD_FILE}"],
    )]


def check_tasks(tasks: Iterable[str]) -> list[Missing]:
    missing = []
    for task in tasks:
        bench = BENCHMARKS.get(task)
        if bench is None:
            continue
        videos = hf_home() / bench.video_dir
        problems = []
        if not _has_snapshot(bench.dataset, "dataset"):
            problems.append(f"no hub snapshot under {_repo_dir(bench.dataset, 'dataset')}")
        if not videos.exists():
            problems.append(f"no videos under {videos}")
        if problems:
            rev = f" --revision {bench.revision}" if bench.revision != "main" else ""
            missing.append(Missing(
                "dataset", bench.dataset, f"task {task}: " + "; ".join(problems),
                [f"hf download {bench.dataset} --repo-type dataset{rev}"],
            ))
    return missing


def missing_task_imports(tasks: Iterable[str]) -> Optional[str]:
    """A line naming the package when a benchmark's task code imports a module that is not installed
    (lmms-eval 0.7.3's videomme utils import cv2, longvideobench's decord, at their top: a missing one
    would otherwise stop the run with a traceback from inside the task loader); None when all are there."""
    import importlib.util

    missing = [(task, module, package) for task in tasks if task in BENCHMARKS
               for module, package in BENCHMARKS[task].imports if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return "; ".join(f"lmms-eval's task {t} imports {m}, which is not installed (pip install {p})"
                     for t, m, p in missing) + " - see requirements-lmms.txt"


def format_missing(missing: list[Missing], *, backbone: str = "", tasks: Iterable[str] = ()) -> str:
    tasks = list(tasks)
    home = hf_home()
    lines = ["Missing weights or data for this run"
             + (" (offline: " + ", ".join(f"{f}={os.environ[f]}" for f in OFFLINE_FLAGS if f in os.environ) + ")"
                if offline_mode() else "") + ":"]
    for m in missing:
        lines.append(f"  - {m.what} {m.name}: {m.detail}")
    lines += [
        "",
        "How to fetch them (on a machine with internet, with the same HF_HOME; then copy HF_HOME over):",
        f"  export HF_HOME={home}",
        "  hf auth login      # the benchmark datasets are gated: accept their terms on the hub page first",
    ]
    for m in missing:
        lines += [f"  {cmd}" for cmd in m.fetch]
    if any(m.what == "dataset" for m in missing):
        run_tasks = " ".join(sorted({t for t in tasks if t in BENCHMARKS})) or "<task>"
        lines += [
            "  # lmms-eval unpacks/links the videos on first use; one sample per task is enough to do that:",
            f"  python -m lmms_eval --model sharp_llava_onevision --model_args backbone=tiny_llava_onevision "
            f"--tasks {','.join(run_tasks.split())} --limit 1",
        ]
    lines += [
        "",
        f"Expected layout under HF_HOME={home} (set HF_HOME explicitly: lmms-eval's MLVU task otherwise "
        "resolves a relative './~/.cache/huggingface'):",
        "  hub/models--<org>--<name>/snapshots/<rev>/config.json, *.safetensors     (model weights)",
        "  hub/datasets--<org>--<name>/snapshots/<rev>/...                          (benchmark annotations)",
    ]
    for b in BENCHMARKS.values():
        lines.append(f"  {b.video_dir + '/':<30} videos of {b.task} ({b.dataset}{', revision ' + b.revision if b.revision != 'main' else ''})")
    lines.append("Then run offline with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.")
    return "\n".join(lines)


def preflight(backbone: str, tasks: Iterable[str], hub_id: Optional[str] = None,
              method: Optional[str] = None) -> list[Missing]:
    """Raise MissingResourceError when offline and something is missing; return what is missing. A task
    whose code needs an uninstalled module is a HarnessError, online or not (named in both errors)."""
    tasks = list(tasks)
    imports = missing_task_imports(tasks)
    missing = check_weights(backbone, hub_id) + check_method_weights(backbone, method, hub_id) + check_tasks(tasks)
    if missing and offline_mode():
        raise MissingResourceError(format_missing(missing, backbone=backbone, tasks=tasks)
                                   + (f"\nAlso: {imports}" if imports else ""))
    if imports:
        raise HarnessError(imports)
    return missing


_MISSING_MARKERS = (
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout",
    "MaxRetryError", "NameResolutionError", "GatedRepoError", "RepositoryNotFoundError",
    "DatasetNotFoundError",
)
_MISSING_TEXT = (
    "couldn't reach", "could not reach", "offline mode", "cannot find the requested files",
    "cannot find the appropriate snapshot", "we couldn't connect", "connection error",
    "is not a local folder and is not a valid model identifier", "does not appear to have a file named",
    "trying to locate the files on the hub", "gated", "not found on the hub", "are not available here",
)


def looks_missing(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        names = {c.__name__ for c in type(exc).__mro__}
        if names & set(_MISSING_MARKERS):
            return True
        text = str(exc).lower()
        if any(t in text for t in _MISSING_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def explain(exc: BaseException, backbone: str, tasks: Iterable[str] = (), hub_id: Optional[str] = None) -> Optional[MissingResourceError]:
    """A MissingResourceError for ``exc`` if it is a download/cache failure, else None."""
    if isinstance(exc, MissingResourceError):
        return exc
    if not looks_missing(exc):
        return None
    tasks = list(tasks)
    missing = check_weights(backbone, hub_id) + check_tasks(tasks)
    if not missing:
        missing = [Missing("weights or dataset", "?", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", [])]
    msg = format_missing(missing, backbone=backbone, tasks=tasks)
    return MissingResourceError(msg + f"\n(original error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})")
