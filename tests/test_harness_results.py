"""Results writer: atomic writes, cell states, score extraction, request aggregation."""
import json
import os

import pytest

from sharp.harness import cells as C
from sharp.harness.benchmarks import average, extract_scores
from sharp.harness.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from sharp.harness.summary import aggregate_requests, build_summary, task_of


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "cell" / "summary.json"
    atomic_write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # not mkstemp's private mode

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed between writing the temp file and the rename

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]  # temp file removed


def test_json_writer_handles_numpy_torch_and_nan(tmp_path):
    import numpy as np
    import torch

    p = atomic_write_jsonl(tmp_path / "r.jsonl", [{"a": np.float32(0.5), "b": torch.tensor([1, 2]), "c": float("nan")}])
    assert read_jsonl(p) == [{"a": 0.5, "b": [1, 2], "c": None}]


def _cell(**kw):
    base = dict(backbone="tiny_llava_onevision", method="fastv", retention=0.25, tasks=["sharp_synthetic"],
                method_kwargs={"layer": 2})
    base.update(kw)
    return C.Cell(**base)


def test_cell_states(tmp_path):
    cell = _cell()
    d = cell.dir(tmp_path)
    assert d == tmp_path / "tiny_llava_onevision" / "fastv" / "r0.25"
    assert C.status(cell, tmp_path)[0] == "missing"
    atomic_write_json(d / C.RESULTS, {"results": {}})
    atomic_write_text(d / ".summary.json.x.tmp", "{")  # a temp file of a killed writer
    assert C.status(cell, tmp_path)[0] == "partial"
    assert sorted(C.clear_partial(d)) == sorted([C.RESULTS, ".summary.json.x.tmp"])
    atomic_write_json(d / C.SUMMARY, {"cell": cell.key()})
    assert C.status(cell, tmp_path)[0] == "finished"
    other = _cell(limit=4)
    assert C.status(other, tmp_path)[0] == "mismatch"
    assert any(line.startswith("limit:") for line in C.key_diff(cell.key(), other.key()))
    assert C.clear_partial(d) == [] and (d / C.SUMMARY).exists()  # never removes a summary


def test_cell_key_normalises_retention_and_task_order():
    a = _cell(retention=0.2500000001, tasks=["b", "a"])
    b = _cell(retention=0.25, tasks=["a", "b"])
    assert a.key() == b.key()


def test_extract_scores_uses_the_papers_keys_and_scales():
    results = {"results": {
        "mvbench": {"alias": "mvbench"},
        "mvbench_action_count": {"alias": "x", "mvbench_accuracy,none": 50.0, "mvbench_accuracy_stderr,none": "N/A"},
        "mvbench_object_shuffle": {"mvbench_accuracy,none": 60.0},
        "longvideobench_val_v": {"lvb_acc,none": 0.564},
        "mlvu_dev": {"mlvu_percetion_score,none": 63.2},
        "videomme": {"videomme_perception_score,none": 58.6},
        "sharp_synthetic": {"accuracy,none": 37.5, "accuracy_stderr_clt,none": 5.0},
    }}
    samples = {"videomme": [
        {"videomme_perception_score": {"duration": d, "pred_answer": p, "answer": "A"}}
        for d, p in [("short", "A"), ("short", "B"), ("medium", "A"), ("long", "C")]]}
    scores, metrics = extract_scores(results, samples)
    assert scores["mvbench"] == pytest.approx(55.0)  # mean of the subtasks (the group has no aggregate)
    assert scores["longvideobench"] == pytest.approx(56.4)  # 0-1 -> 0-100
    assert scores["mlvu"] == 63.2 and scores["videomme"] == 58.6
    assert (scores["videomme_short"], scores["videomme_medium"], scores["videomme_long"]) == (50.0, 100.0, 0.0)
    assert scores["sharp_synthetic"] == 37.5
    assert "mvbench_action_count" not in scores and metrics["longvideobench_val_v"] == {"lvb_acc,none": 0.564}
    assert average(scores) == pytest.approx((55.0 + 56.4 + 63.2 + 58.6) / 4)
    assert average({"mvbench": 1.0}) is None  # partial averages are not reported


def test_aggregate_requests_and_summary(tmp_path):
    rows = [
        {"task": "mvbench_action_count", "visual_tokens_before": 6272, "visual_tokens_after": 1568,
         "visual_tokens_layer_mean": 2000.0, "prefill_ms": 100.0, "generate_ms": 150.0, "prefill_tflops": 11.0,
         "stage_ms": {"select": 2.0}, "peak_memory_mb": 100.0, "peak_memory_kind": "cuda_max_allocated",
         "input_tokens": 6400, "output_tokens": 3},
        {"task": "videomme", "visual_tokens_before": 6272, "visual_tokens_after": 1568, "prefill_ms": 300.0,
         "prefill_tflops": 11.0, "stage_ms": {"select": 4.0}, "peak_memory_mb": 300.0},
        {"task": "videomme", "failed": "DECORDError: bad file"},
    ]
    agg = aggregate_requests(rows)
    assert agg["requests"] == 3 and agg["failed_requests"] == 1
    assert agg["tokens"]["retention_measured"] == pytest.approx(0.25)
    assert agg["latency_ms"]["prefill_mean"] == 200.0 and agg["stage_ms"] == {"select": 3.0}
    assert agg["peak_memory_mb"] == 300.0 and agg["tflops"]["prefill_mean"] == 11.0
    assert task_of("mvbench_action_count", ["mvbench", "videomme"]) == "mvbench"
    cell = _cell(tasks=["mvbench", "videomme"])
    s = build_summary(cell_key=cell.key(), config={"x": 1}, results={"results": {"videomme": {
        "videomme_perception_score,none": 50.0}}, "n-samples": {"videomme": {"original": 10, "effective": 2}}},
        samples=None, requests=rows, repo=str(tmp_path), files={}, started="s", finished="f", wall_s=1.0)
    assert s["status"] == "finished" and s["cell"] == cell.key()
    assert s["scores"] == {"videomme": 50.0} and s["n_samples"] == {"videomme": 2}
    assert set(s["per_task"]) == {"mvbench", "videomme"}
    assert s["per_task"]["videomme"]["latency_ms"]["prefill_mean"] == 300.0
    import transformers

    assert s["versions"]["torch"] and s["versions"]["transformers"] == transformers.__version__  # the installed one
    assert set(s["git"]) == {"commit", "dirty"}
    json.dumps(s)
