"""Synthetic video multiple-choice benchmark whose answers depend on *when* events happen.

See :mod:`sharp.synthetic.benchmark` and the second, multi-scene benchmark
:mod:`sharp.synthetic.scenes`. Their lmms-eval tasks (``sharp_synthetic`` /
``sharp_synthetic_default``, ``sharp_scenes`` / ``sharp_scenes_default``: the test split and a
quick slice of each) live in ``sharp/synthetic/lmms_task`` (pass that folder as
``--include_path`` / ``TaskManager(include_path=...)``, or use :data:`TASK_DIR`); the Hydra task
configs are ``tasks=synthetic_test`` / ``synthetic`` and ``tasks=scenes_test`` / ``scenes``.
"""

from pathlib import Path

from .benchmark import (
    ANSWER_INSTRUCTION,
    DEFAULT_N,
    QTYPES,
    SPLITS,
    default_cache_dir,
    ensure_split,
    format_prompt,
    generate_docs,
    render_video,
    sampled_frame_indices,
)

TASK_DIR = str(Path(__file__).resolve().parent / "lmms_task")

__all__ = [
    "ANSWER_INSTRUCTION",
    "DEFAULT_N",
    "QTYPES",
    "SPLITS",
    "TASK_DIR",
    "default_cache_dir",
    "ensure_split",
    "format_prompt",
    "generate_docs",
    "render_video",
    "sampled_frame_indices",
]
