"""scripts/bench_decode.py on the tiny LLaVA-OV backbone: every row reports the peak memory one
generate added, and SharpV's memory stage keeps no decoder layer's input alive (sim_l on the fly)."""
from __future__ import annotations

import sys

import torch

import sharp
from sharp.harness.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_decode  # noqa: E402


def test_rows_report_peak_memory(tmp_path, capsys):
    rows = bench_decode.main(["--backbone", "tiny_llava_onevision", "--frames", "8", "--new-tokens", "3",
                              "--repeats", "1", "--warmup", "0", "--thresholds", "0", "1",
                              "--json", str(tmp_path / "d.json")])
    assert [r["config"] for r in rows] == ["vanilla", "sharpv M=0", "sharpv M=1"]
    for r in rows:
        assert r["peak_mib"] is not None and r["peak_mib"] > 0, r["config"]
    assert "peak MiB" in capsys.readouterr().out
    assert rows[2]["dropped_layers"]  # M = 1: the memory stage ran


def test_memory_stage_records_no_layer_input():
    """The engine records no layer input for SharpV (score_layers is empty) and the method keeps V_0 and
    per-layer masks only: no (b, s, d) hidden state of any layer > 0 is referenced after the prefill."""
    bb = sharp.load_backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=0)
    method = sharp.resolve_method("sharpv", bb, 0.25, memory_threshold=1.0).method
    assert method.score_layers(bb.num_layers) == []
    seen = []
    orig = method.after_prefill

    def spy(ctx):  # ctx: the method's SessionContext; the runner's recorded inputs are read through it
        seen.append((dict(ctx._session.prefill.state.layer_inputs), ctx.state))
        orig(ctx)

    method.after_prefill = spy
    with sharp.prune(bb, method) as trace, torch.no_grad():
        bb.model(**inputs)
    layer_inputs, state = seen[0]
    assert layer_inputs == {}
    d = bb.text_config.hidden_size

    def tensors(value):  # every tensor the method's state holds, however nested
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)

    held = list(tensors(vars(state)))
    assert held and set(vars(state)) == {"reference", "sims"}  # V_0 and the (b,) similarities per layer
    big = [t.shape for t in held if t.dim() == 3 and t.shape[-1] == d]
    assert big == []
    assert [t.shape for t in tensors(state.sims)] == [(1,)] * bb.num_layers
    assert len(trace.method("sharpv").similarity) == bb.num_layers


def test_dycoke_rows_report_the_decode_selection(capsys):
    rows = bench_decode.main(["--backbone", "tiny_llava_onevision", "--frames", "8", "--new-tokens", "3",
                              "--repeats", "1", "--warmup", "0", "--method", "dycoke", "--retention", "0.5"])
    assert [r["config"] for r in rows] == ["vanilla", "dycoke", "dycoke P=0"]
    dycoke, ttm_only = rows[1], rows[2]
    assert dycoke["visual_tokens_kept"] == ttm_only["visual_tokens_kept"] < 128  # the same TTM
    assert dycoke["reselected_steps"] >= 1  # the first decode step always selects
    assert dycoke["visual_seen_per_step"] < dycoke["visual_tokens_kept"] == ttm_only["visual_seen_per_step"]
    assert dycoke["kv_bytes_after_prefill"] == ttm_only["kv_bytes_after_prefill"]  # the cache keeps every entry
    assert "re-selected" in capsys.readouterr().out
