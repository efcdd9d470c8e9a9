"""Data parallel inside a cell, for real: ``python run.py num_processes=2`` (two CPU processes, gloo) gives
the per-sample answers, per-request numbers and summary of a single-process run of the same cell.

Slow on a loaded 2-core machine (two extra interpreters load torch, lmms-eval and its task index: about
1-3 minutes); the sharding and gathering logic itself is tested in tests/test_harness_robustness.py."""
from __future__ import annotations

import json
import subprocess
import sys

from sharp.harness import cells as C
from sharp.harness.config import REPO_ROOT, compose
from sharp.harness.runner import run_cell

CELL = ["method=fastv", "limit=5"]  # 5 docs: rank 0 gets 3, rank 1 gets 2 and one padding request
TIMING = ("prefill_ms", "generate_ms", "stage_ms", "peak_memory_mb", "peak_memory_kind")
SAME = ("cell", "scores", "avg_score", "metrics", "n_samples", "requests", "failed_requests", "tokens", "tflops",
        "failures")


def _read(d):
    samples = [json.loads(line) for line in (d / "samples_sharp_synthetic.jsonl").read_text().splitlines()]
    requests = [json.loads(line) for line in (d / C.REQUESTS).read_text().splitlines()]
    return json.loads((d / C.SUMMARY).read_text()), samples, requests


def test_two_processes_give_the_single_process_results(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cell(compose([*CELL, f"results_dir={one}"]))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), *CELL, "num_processes=2", f"results_dir={two}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "processes=2" in proc.stdout and "failed requests     0 of 5" in proc.stdout  # the table, once
    assert proc.stdout.count("== toy_llava_onevision / fastv") == 1
    rel = C.Cell("toy_llava_onevision", "fastv", 0.25, ["sharp_synthetic"], method_kwargs={"layer": 2}, limit=5).relpath()
    (s1, samples1, req1), (s2, samples2, req2) = _read(one / rel), _read(two / rel)
    assert [(s["doc_id"], s["filtered_resps"], s["accuracy"]) for s in samples2] == \
        [(s["doc_id"], s["filtered_resps"], s["accuracy"]) for s in samples1]
    assert [s["doc_id"] for s in samples2] == list(range(5))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(req2) == strip(req1) and len(req2) == 5  # no padding request counted
    for key in SAME:
        assert s2[key] == s1[key], key
    assert s2["per_task"].keys() == s1["per_task"].keys()
    assert (s1["run"]["num_processes"], s2["run"]["num_processes"]) == (1, 2)
    assert len(s2["throughput"]["generate_until_s"]) == 2
