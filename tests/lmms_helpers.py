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


def fake_video_model(answer_fn: Callable):
    """An lmms-eval model that answers each generate request with ``answer_fn(doc)``, after checking that
    the doc has one video file; it keeps ``(context, gen_kwargs, doc)`` of every request in ``.requests``."""
    import os

    from lmms_eval.api.model import lmms

    class Fake(lmms):
        def __init__(self):
            super().__init__()
            self.requests = []

        def generate_until(self, requests):
            out = []
            for req in requests:
                ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                visual = doc_to_visual(doc)
                assert len(visual) == 1 and os.path.isfile(visual[0])
                self.requests.append((ctx, gen_kwargs, doc))
                out.append(answer_fn(doc))
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    return Fake()


def synthetic_task_manager():
    """lmms-eval's TaskManager with the synthetic benchmarks' task folder (sharp_synthetic, sharp_scenes)."""
    import pytest

    pytest.importorskip("lmms_eval.evaluator")
    from lmms_eval.tasks import TaskManager

    from sharp.synthetic import TASK_DIR

    return TaskManager(include_path=TASK_DIR)


def use_offline_synthetic(monkeypatch, tmp_path, n_docs: int):
    """Offline (HF flags set), the synthetic videos cached under ``tmp_path / "cache"``, each split cut to
    ``n_docs`` docs (``SHARP_SYNTHETIC_N``). Returns ``tmp_path``."""
    monkeypatch.setenv("SHARP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SHARP_SYNTHETIC_N", str(n_docs))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def task_results(model, task: str, task_manager, limit=None) -> dict:
    """lmms-eval's ``simple_evaluate`` of ``model`` on one task: that task's results."""
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(model=model, tasks=[task], task_manager=task_manager, limit=limit)["results"][task]
