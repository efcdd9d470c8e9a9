"""lmms-eval's own CLI finds our model through the entry point and runs the synthetic task with it."""
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from sharp.harness.config import PACKAGE_DIR


def test_lmms_eval_cli_runs_the_synthetic_task_with_our_model(tmp_path):
    if not [ep for ep in entry_points().select(group="lmms_eval.models") if ep.value.startswith("sharp.")]:
        pytest.skip("the project is not installed (`pip install -e .` registers the lmms_eval.models entry point)")
    env = dict(os.environ, SHARP_SYNTHETIC_N="4")  # build only the first 4 docs of the 200-doc split
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "sharp_llava_onevision",
         "--model_args", "backbone=tiny_llava_onevision,method=fastv,retention=0.25",
         "--tasks", "sharp_synthetic", "--include_path", str(PACKAGE_DIR / "synthetic" / "lmms_task"),
         "--limit", "4", "--output_path", str(tmp_path), "--log_samples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = sorted(tmp_path.rglob("*_results.json"))
    assert results, list(tmp_path.rglob("*"))
    r = json.loads(results[-1].read_text())
    assert r["n-samples"]["sharp_synthetic"]["effective"] == 4
    assert "accuracy,none" in r["results"]["sharp_synthetic"]
    assert r["config"]["model"] == "sharp_llava_onevision"
    thr = r["throughput"]  # our per-request numbers, averaged by lmms-eval
    assert thr["avg_visual_tokens_after"] == pytest.approx(0.25 * thr["avg_visual_tokens_before"], rel=0.01)
    assert thr["avg_prefill_ms"] > 0 and thr["avg_prefill_tflops"] > 0
    assert sorted(tmp_path.rglob("*_samples_sharp_synthetic.jsonl"))
