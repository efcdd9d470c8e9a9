"""Shared test helpers for in-process lmms-eval runs."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional


@contextlib.contextmanager
def memoised_task_index(copy_index: Callable = copy.deepcopy, after_build: Optional[Callable] = None,
                        memo: Optional[dict] = None):
    """Build lmms-eval's task index (8-11 s of YAML parsing) once per include path while the block
    runs; each later call gets ``copy_index(index)``. ``after_build`` runs after each fresh build.
    ``memo``: the built indexes, kept across blocks (conftest's session-wide ``task_index_memo``)."""
    from lmms_eval.tasks import TaskManager

    original = TaskManager.initialize_tasks
    memo = {} if memo is None else memo

    def initialize_tasks(self, include_path=None, include_defaults=True):
        key = (tuple([include_path] if isinstance(include_path, str) else include_path or ()), include_defaults)
        if key not in memo:
            memo[key] = original(self, include_path=include_path, include_defaults=include_defaults)
            if after_build is not None:
                after_build()
        return copy_index(memo[key])

    TaskManager.initialize_tasks = initialize_tasks
    try:
        yield
    finally:
        TaskManager.initialize_tasks = original
