"""DivPrune (baselines/divprune.py) against the official greedy loop written independently from
vbdi/divprune ``llava_arch.py: DivPrune`` (every step re-reads the rows of all chosen tokens), in numpy
float64, on synthetic features and on the LLM's layer-0 visual rows of both tiny families."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sharp
from baselines.divprune import cosine_distance, max_min_diverse
from engine_reference import layer_input
from conftest import shared_backbone


def official_divprune(x: np.ndarray, ratio: float) -> list[int]:
    """The official loop: k = int(round(ratio n)); step 0 scores each column by its 2nd-smallest
    distance, step i > 0 by its minimum over the chosen rows; argmax (first on ties)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - unit @ unit.T
    k = int(round(ratio * len(x)))
    chosen: list[int] = []
    for i in range(k):
        scores = np.sort(d, axis=0)[1] if i == 0 else d[chosen].min(axis=0)
        chosen.append(int(np.argmax(scores)))
    return chosen


@pytest.mark.parametrize("n, ratio, seed", [(40, 0.25, 0), (97, 0.1, 1), (196, 0.5, 2), (64, 1 / 64, 3)])
def test_greedy_equals_the_official_loop(n, ratio, seed):
    x = np.random.default_rng(seed).normal(size=(n, 16))
    k = int(round(ratio * n))
    ours = max_min_diverse(cosine_distance(torch.from_numpy(x)), k).tolist()
    assert ours == official_divprune(x, ratio)  # the same tokens in the same order


def distinct_divprune(x: np.ndarray, k: int) -> list[int]:
    """The official loop with chosen tokens excluded from the argmax (the "distinct" reading)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - unit @ unit.T
    chosen: list[int] = []
    for i in range(k):
        scores = np.sort(d, axis=0)[1] if i == 0 else d[chosen].min(axis=0)
        scores[chosen] = -np.inf
        chosen.append(int(np.argmax(scores)))
    return chosen


def test_duplicate_tokens_repeat_official_picks_and_distinct_keeps_k():
    """Eight orthogonal tokens, each four times (static frames; 0/1 features, so every distance is
    exactly 0 or 1): k = 12 > 8, so after 8 picks every token left duplicates a chosen one. Official:
    its picks repeat (the set has 8 tokens); distinct: 12."""
    x = np.repeat(np.eye(16)[:8], 4, axis=0)  # rows 4i..4i+3 equal
    k = 12
    official = max_min_diverse(cosine_distance(torch.from_numpy(x)), k).tolist()
    assert official == official_divprune(x, k / len(x))
    assert official[:8] == [0, 4, 8, 12, 16, 20, 24, 28] and len(set(official)) == 8
    distinct = max_min_diverse(cosine_distance(torch.from_numpy(x)), k, distinct=True).tolist()
    assert distinct == distinct_divprune(x, k) and len(set(distinct)) == k
    assert {i // 4 for i in distinct} == set(range(8))  # every distinct token first, then its copies


def test_chosen_set_is_spread_over_clusters():
    """Four tight clusters, k = 4: one token from each (what max-min diversity means)."""
    g = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 10
    x = np.concatenate([c + 0.01 * g.normal(size=(25, 8)) for c in centres])
    chosen = max_min_diverse(cosine_distance(torch.from_numpy(x)), 4)
    assert sorted(int(i) // 25 for i in chosen) == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_kept_set_equals_the_max_min_reference(name):
    bb = shared_backbone(name)
    h, w = bb.synthetic_frame_size()
    frames = np.random.default_rng(4).integers(0, 256, size=(8, h, w, 3), dtype=np.uint8)
    inputs = bb.pixels_to_inputs(frames, "What happens in the video?")
    raw, _ = layer_input(bb, inputs)
    _, trace = layer_input(bb, inputs, "divprune", 0.25)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    expected = sorted(official_divprune(raw[0][vis].double().numpy(), 0.25))
    assert trace.method("divprune").kept[0].tolist() == sorted(set(expected))
    assert trace.visual_tokens_per_layer[0] == len(set(expected))
    assert len(expected) == round(0.25 * int(vis.sum()))  # random frames: no repeated pick


def test_positions_follow_the_official_code():
    assert sharp.resolve_method("divprune", "tiny_llava_onevision", 0.25).method.positions == "compact"
    assert sharp.resolve_method("divprune", "tiny_qwen2_vl", 0.25).method.positions == "original"


def test_distance_memory_at_32_frames_stays_under_1_gib():
    """32 x 196 = 6272 tokens: the distance matrix is 39.3 M entries (157 MB float32, 79 MB bf16); the
    peak the selection adds (one n x n matrix, built in place) stays under 1 GiB. Peak RSS above the
    start (``sharp.engine.memory.peak_memory``: VmHWM reset through /proc/self/clear_refs)."""
    from sharp.engine.memory import peak_memory

    x = torch.randn(6272, 64, generator=torch.Generator().manual_seed(0))  # float32, the larger of the two
    with peak_memory("cpu") as peak:
        max_min_diverse(cosine_distance(x), 2)  # the matrix and the first step: the peak of any k
    if peak.bytes is None:
        pytest.skip("peak RSS is not measurable here (no /proc/self/clear_refs)")
    assert peak.bytes < 2 ** 30, f"divprune peak {peak.mib:.0f} MiB at 6272 tokens"
    assert peak.bytes >= 6272 ** 2 * 4 * 0.9  # the measure sees the matrix (it measures something)
