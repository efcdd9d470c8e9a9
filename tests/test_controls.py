"""The two controls, random (baselines/random_prune.py) and pooling (baselines/pooling.py), against
independent computations: LightCompress's random keep set (a sorted slice of a seeded permutation) and
torch's own ``F.avg_pool2d`` on the (T, H, W, C) reshape of the LLM's input rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sharp
from engine_reference import layer_input
from conftest import shared_backbone

NAMES = ["tiny_llava_onevision", "tiny_qwen2_vl"]
FRAMES = 8


def video(bb, seed=3):
    h, w = bb.synthetic_frame_size()
    frames = np.random.default_rng(seed).integers(0, 256, size=(FRAMES, h, w, 3), dtype=np.uint8)
    return bb.pixels_to_inputs(frames, "What happens in the video?")


def stage_rows(bb, inputs, method, retention, **kwargs):
    """(unpruned input of layer 0 (s, d), the stage's output entering layer 0 (s', d), the trace)."""
    raw, _ = layer_input(bb, inputs)
    pruned, trace = layer_input(bb, inputs, method, retention, **kwargs)
    return raw[0], pruned[0], trace


# -- random --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_random_keeps_the_seeded_permutation_slice(name):
    bb = shared_backbone(name)
    inputs = video(bb)
    n = bb.layout(inputs).n_visual
    for seed, retention in [(42, 0.25), (7, 0.5)]:
        k = int(round(retention * n))
        g = torch.Generator()
        g.manual_seed(seed)
        expected = sorted(torch.randperm(n, generator=g)[:k].tolist())  # LightCompress: sorted randperm(L)[:n]
        raw, pruned, trace = stage_rows(bb, inputs, "random", retention, seed=seed)
        kept = trace.method("random").kept[0].tolist()
        assert kept == expected and len(kept) == k
        vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
        start = int(vis.nonzero()[0])
        # the kept rows enter layer 0 unchanged, in order, right after the prefix
        assert torch.equal(pruned[start:start + k], raw[start + torch.tensor(expected)])


def test_random_is_reproducible_and_the_seed_matters():
    bb = shared_backbone("tiny_llava_onevision")
    inputs = video(bb)
    kept = []
    for seed in (1, 1, 2):
        with sharp.prune(bb, "random", 0.25, seed=seed) as trace, torch.no_grad():
            bb.model(**inputs)
        kept.append(trace.method("random").kept[0].tolist())
    assert kept[0] == kept[1] and kept[0] != kept[2]


def test_random_keeps_original_positions_on_every_family():
    for name in ["tiny_llava_onevision", "tiny_llava_video", "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl"]:
        method = sharp.resolve_method("random", name, 0.25).method
        assert method.positions == "original"


# -- pooling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_pooling_at_a_quarter_is_avg_pool2d(name):
    bb = shared_backbone(name)
    inputs = video(bb)
    layout = bb.layout(inputs)
    (h, w), t = layout.grid, layout.frames
    raw, pruned, trace = stage_rows(bb, inputs, "pooling", 0.25)
    vis = bb.visual_mask(inputs["input_ids"], layout)[0]
    start = int(vis.nonzero()[0])
    grid = raw[vis].float().view(t, h, w, -1).permute(0, 3, 1, 2)  # (T, C, H, W)
    expected = F.avg_pool2d(grid, kernel_size=2).permute(0, 2, 3, 1).reshape(t * (h // 2) * (w // 2), -1)
    kept = len(expected)
    assert trace.visual_tokens_per_layer[0] == kept == t * h * w // 4
    torch.testing.assert_close(pruned[start:start + kept].float(), expected, rtol=1e-5, atol=1e-6)
    # each pooled row sits at its 2 x 2 block's top-left token
    top_left = [f * h * w + r * w + c for f in range(t) for r in range(0, h, 2) for c in range(0, w, 2)]
    assert trace.method("pooling").kept[0].tolist() == top_left
    # the text after the video is untouched
    assert torch.equal(pruned[start + kept:], raw[start + t * h * w:])


def test_pooling_bins_where_the_grid_does_not_divide():
    """14 x 14 into 4 x 4 disjoint bins of 4/3/4/3 rows and columns (floor(r 4 / 14))."""
    from baselines.pooling import bin_of_tokens, pool_bins, pooled_grid

    # H' = round(H sqrt R), then W' nearest R H W / H'
    assert pooled_grid((14, 14), 0.25) == (7, 7) and pooled_grid((14, 14), 0.1) == (4, 5)
    assert pooled_grid((7, 7), 0.25) == (4, 3) and pooled_grid((14, 14), 0.5) == (10, 10)
    assert pooled_grid((2, 2), 0.01) == (1, 1) and pooled_grid((14, 14), 0.08) == (4, 4)
    rows, cols = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    x = torch.randn(196, 5, dtype=torch.float64)
    bins = bin_of_tokens(torch.zeros(196, dtype=torch.long), rows.flatten(), cols.flatten(), (14, 14), (4, 4))
    first, means = pool_bins(x, bins)
    edges = [0, 4, 7, 11, 14]  # rows r with floor(4 r / 14) == i
    grid = x.view(14, 14, 5)
    for i in range(4):
        for j in range(4):
            block = grid[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            torch.testing.assert_close(means[i * 4 + j].double(), block.reshape(-1, 5).mean(0))
            assert int(first[i * 4 + j]) == edges[i] * 14 + edges[j]


def test_pooling_after_another_stage_pools_what_is_left():
    """Composed after random: every bin averages the tokens it still holds, at its first one."""
    bb = shared_backbone("tiny_llava_onevision")
    inputs = video(bb)
    with sharp.prune(bb, "random+pooling", 1.0, random={"retention": 0.5}, pooling={"retention": 0.25}) as trace, \
            torch.no_grad():
        bb.model(**inputs)
    left = trace.method("random").kept[0]
    layout = bb.layout(inputs)
    h, w = layout.grid
    frame, within = left // layout.tokens_per_frame, left % layout.tokens_per_frame
    blocks = frame * (h // 2) * (w // 2) + (within // w) // 2 * (w // 2) + (within % w) // 2
    firsts = [int(left[blocks == blk][0]) for blk in torch.unique(blocks).tolist()]
    assert trace.method("pooling").kept[0].tolist() == firsts
