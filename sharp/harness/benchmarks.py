"""The paper's benchmarks as lmms-eval 0.7.3 tasks: metric keys, scales, data locations.

Scores in ``summary.json`` use the paper's column names (``mvbench``, ``longvideobench``, ``mlvu``,
``videomme``, ``videomme_short|medium|long``) on the paper's 0-100 scale; the raw lmms-eval metrics
are kept next to them. The data entries (hub id, revision, folder under ``$HF_HOME``) are the ones of
the installed task yaml files; ``scripts/make_replicas.py`` writes a miniature offline copy of each in
that layout and ``tests/test_replicas.py`` runs lmms-eval's task code on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Benchmark:
    task: str                 # lmms-eval task (or group) name
    column: str               # the paper's column name
    metric: str               # lmms-eval metric key in results["results"][task]
    scale: float              # multiply by this to get the paper's 0-100 scale
    dataset: str              # hub dataset id (repo_type=dataset)
    video_dir: str            # folder under $HF_HOME where lmms-eval unpacks / links the videos
    revision: str = "main"
    subtasks_prefix: Optional[str] = None  # group without aggregate: average these subtasks
    # modules the task's utils.py imports at its top, with the package that provides each
    imports: tuple[tuple[str, str], ...] = ()


BENCHMARKS: dict[str, Benchmark] = {
    b.task: b
    for b in (
        Benchmark("mvbench", "mvbench", "mvbench_accuracy,none", 1.0, "OpenGVLab/MVBench", "mvbench_video",
                  revision="video", subtasks_prefix="mvbench_"),
        Benchmark("longvideobench_val_v", "longvideobench", "lvb_acc,none", 100.0, "longvideobench/LongVideoBench",
                  "datasets/longvideobench", imports=(("decord", "decord"),)),
        Benchmark("mlvu_dev", "mlvu", "mlvu_percetion_score,none", 1.0, "sy1998/MLVU_dev", "mlvu"),
        Benchmark("videomme", "videomme", "videomme_perception_score,none", 1.0, "lmms-eval/Video-MME", "videomme",
                  imports=(("cv2", "opencv-python-headless"),)),
    )
}

PAPER_COLUMNS = ("mvbench", "longvideobench", "mlvu", "videomme")
VIDEOMME_DURATIONS = ("short", "medium", "long")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _main_metric(entry: dict) -> Optional[tuple[str, float]]:
    """First numeric metric of a results entry that is not a stderr (for tasks we do not know)."""
    for key, value in entry.items():
        if key == "alias" or "stderr" in key or not _is_number(value):
            continue
        return key, float(value)
    return None


def videomme_durations(samples: list[dict]) -> dict[str, float]:
    """Short/medium/long accuracy (0-100) from VideoMME per-sample logs, as lmms-eval aggregates it."""
    correct: dict[str, int] = {}
    answered: dict[str, int] = {}
    for sample in samples:
        data = sample.get("videomme_perception_score")
        if not isinstance(data, dict) or "duration" not in data:
            continue
        d = data["duration"]
        answered[d] = answered.get(d, 0) + 1
        correct[d] = correct.get(d, 0) + int(data.get("pred_answer") == data.get("answer"))
    return {f"videomme_{d}": 100.0 * correct[d] / answered[d] for d in VIDEOMME_DURATIONS if answered.get(d)}


def extract_scores(results: dict, samples: Optional[dict] = None) -> tuple[dict[str, float], dict[str, dict]]:
    """Return (scores by paper column on 0-100, raw numeric metrics by lmms-eval task).

    ``results`` is the dict returned by ``simple_evaluate`` (or its saved JSON). Tasks that are not
    one of the paper's benchmarks (e.g. ``sharp_synthetic``) get their first metric under the task
    name, scaled to 0-100 when the metric is a fraction in [0, 1] and named like an accuracy.
    """
    per_task: dict = results.get("results", {}) or {}
    metrics: dict[str, dict] = {}
    for task, entry in per_task.items():
        if isinstance(entry, dict):
            metrics[task] = {k: v for k, v in entry.items() if k != "alias" and (_is_number(v) or v is None)}
    scores: dict[str, float] = {}
    claimed: set[str] = set()
    for bench in BENCHMARKS.values():
        if bench.subtasks_prefix:
            subs = {t: e for t, e in per_task.items() if t.startswith(bench.subtasks_prefix) and isinstance(e, dict)
                    and _is_number(e.get(bench.metric))}
            if subs:
                scores[bench.column] = sum(float(e[bench.metric]) for e in subs.values()) / len(subs) * bench.scale
                claimed.update(subs)
                claimed.add(bench.task)
        elif isinstance(per_task.get(bench.task), dict) and _is_number(per_task[bench.task].get(bench.metric)):
            scores[bench.column] = float(per_task[bench.task][bench.metric]) * bench.scale
            claimed.add(bench.task)
    if samples and samples.get("videomme"):
        scores.update(videomme_durations(samples["videomme"]))
    for task, entry in per_task.items():
        if task in claimed or not isinstance(entry, dict):
            continue
        main = _main_metric(entry)
        if main is None:
            continue
        key, value = main
        name = key.split(",")[0].lower()
        if 0.0 <= value <= 1.0 and any(w in name for w in ("acc", "score", "exact", "match")):
            value *= 100.0
        scores[task] = value
    return scores, metrics


def average(scores: dict[str, float], columns=PAPER_COLUMNS) -> Optional[float]:
    """Mean over ``columns``; None unless every column is present (a partial mean would mislead)."""
    values = [scores.get(c) for c in columns]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)
