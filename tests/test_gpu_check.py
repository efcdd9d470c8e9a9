"""scripts/gpu_check.sh --dry-run: the prepared GPU script runs on the CPU with the tiny backbones (two
methods here, to stay fast) and writes its JSON and Markdown; a failing decode check shows as not ok."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from sharp.harness.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_dry_run_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SHARP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                           "--methods", "fastv", "sharp", "--new-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["backbone"], r["attn"]) for r in data["prefill"]] == [("tiny_llava_onevision", "sdpa"),
                                                                     ("tiny_qwen2_vl", "sdpa")]
    for run in data["prefill"]:
        assert "error" not in run, run.get("error")
        assert [r["method"] for r in run["rows"]] == ["fastv", "sharp"]
        assert all(r["peak_mib"] is not None for r in run["rows"])
    assert len(data["decode"]) == 4 and all(r["ok"] for r in data["decode"]), data["decode"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Decode = masked no-cache reference" in md and "| tiny_qwen2_vl | sdpa | sharp |" in md


def test_decode_check_can_fail():
    """A tolerance below float32 noise is not met: the check reports it instead of passing."""
    import sharp

    bb = sharp.load_backbone("tiny_llava_onevision")
    r = gpu_check.decode_check(bb, "fastv", 0.25, gpu_check.DRY, new_tokens=2, atol=0.0)
    assert r["max_abs_logit_diff"] > 0 and not r["ok"]


def test_full_mode_refuses_without_cuda(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "/tmp/never"])
