"""scripts/retention_curve.py --match-flops (each method at the TFLOPs of a target method) and --merge."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sharp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import retention_curve  # noqa: E402


@pytest.mark.parametrize("method", ["random", "sharp", "pdrop"])
def test_matched_retention_has_the_targets_tflops(method):
    n = 128  # toy LLaVA-OV: 32 frames x 4 tokens
    r = retention_curve.matched_retention("toy_llava_onevision", method, "fastv", 0.25, visual_tokens=n)
    goal = sharp.flops.prefill_tflops("toy_llava_onevision", "fastv", 0.25, n)
    got = sharp.flops.prefill_tflops("toy_llava_onevision", method, r, n)
    one_token_less = sharp.flops.prefill_tflops("toy_llava_onevision", method, r - 1 / n, n)
    one_token_more = sharp.flops.prefill_tflops("toy_llava_onevision", method, min(1.0, r + 1 / n), n)
    assert abs(got - goal) <= min(abs(one_token_less - goal), abs(one_token_more - goal))
    assert r > 0.25  # a pre-LLM / layer-1 method keeps more than FastV for FastV's FLOPs


def test_bad_match_flops_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "retention_curve.py"), "--match-flops", "fastv@2"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "accepted METHOD@R" in out.stderr and "Traceback" not in out.stderr


def test_merge_adds_methods_and_keeps_the_other_rows(tmp_path):
    common = ["--backbone", "toy_llava_onevision", "--n", "4", "--retentions", "0.5", "--out", str(tmp_path)]
    assert retention_curve.main([*common, "--methods", "random"]) == 0
    first = json.loads((tmp_path / "retention_curve.json").read_text())["rows"]
    assert retention_curve.main([*common, "--methods", "pooling", "--merge"]) == 0
    merged = json.loads((tmp_path / "retention_curve.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["vanilla", "random", "pooling"]
    assert merged["rows"][1] == first[1] and merged["info"]["methods"] == ["random", "pooling"]
    assert "pooling" in (tmp_path / "retention_curve.md").read_text()
    with pytest.raises(SystemExit):  # another retention list: not mergeable
        retention_curve.main([*common[:-4], "--retentions", "0.25", "--out", str(tmp_path), "--methods", "fastv",
                              "--merge"])


def test_merge_keeps_the_other_matched_rows(tmp_path):
    common = ["--backbone", "toy_llava_onevision", "--n", "4", "--match-flops", "fastv@0.25", "--out", str(tmp_path)]
    assert retention_curve.main([*common, "--methods", "random"]) == 0
    assert retention_curve.main([*common, "--methods", "pooling", "--merge"]) == 0
    merged = json.loads((tmp_path / "matched.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["vanilla", "random", "pooling"]
    assert "| random |" in (tmp_path / "matched.md").read_text()
