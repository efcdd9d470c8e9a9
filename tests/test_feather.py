"""FEATHER (baselines/feather.py): de-RoPE last-token ranking + a uniform grid inside the budget."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import sharp
from sharp.engine.context import VisualTokens
from sharp.methods import budget
from conftest import shared_backbone



def backbone(name):
    return shared_backbone(name, "eager")


def run(bb, inputs, retention=0.25, **kw):
    with sharp.prune(bb, "feather", retention, **kw) as trace, torch.no_grad():
        bb.model(**inputs)
    return trace


def derope_visual_attention(bb, inputs, layer):
    """Independent score: an eager run whose RoPE is the identity in ``layer``, output_attentions,
    last row, heads averaged, renormalised over the visual keys -> (n_vis,) for sample 0."""
    def unit_rope(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, dict(kwargs, position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))

    h = bb.layers[layer].register_forward_pre_hook(unit_rope, with_kwargs=True)
    try:
        with torch.no_grad():
            att = bb.model(**inputs, output_attentions=True).attentions[layer]
    finally:
        h.remove()
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    row = att[0, :, -1].mean(0)[vis]
    return row / row.sum()


def hand_grid(frames, per_frame, local):
    return sorted(f * per_frame + j for f in range(frames) for j in local)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("retention,share", [(0.25, 0.5), (0.5, 0.5), (0.25, 0.0), (0.3, 0.2)])
def test_attention_tokens_equal_independent_derope_ranking(name, retention, share):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=3)
    trace = run(bb, inputs, retention, layer=2, grid_share=share)
    kept = set(trace.kept[0][0].tolist())
    grid = trace.method("feather").grid[0].tolist()
    n = bb.layout(inputs).n_visual
    k = budget(n, retention)
    score = derope_visual_attention(bb, inputs, 1)  # layer K-1
    score[grid] = float("-inf")  # the rest of the budget: top-k among the tokens not in the grid
    expected = set(grid) | set(torch.topk(score, k - len(grid)).indices.tolist())
    assert len(kept) == k and kept == expected
    assert trace.stage_layers == [2]
    # the de-RoPE criterion matters: with RoPE the ranking differs somewhere in these cases
    if share == 0.0:
        with sharp.prune(bb, "fastv", retention, layer=2) as t2, torch.no_grad():
            bb.model(**inputs)
        assert set(t2.kept[0][0].tolist()) != kept


def test_grid_follows_the_split_rule_by_hand():
    bb = backbone("tiny_llava_onevision")  # 8 frames of 4 x 4 tokens: stride 3 -> rows/cols {0, 3}
    inputs = bb.synthetic_inputs(frames=8, seed=5)
    full = hand_grid(8, 16, [0, 3, 12, 15])  # 32 grid points
    # R = 0.25: k = 32, cap floor(0.5 x 32) = 16 < 32 -> 2 per frame: a 1 x 2 lattice, the centred
    # grid row of {0, 3} (row 3) by both grid columns {0, 3}
    t = run(bb, inputs, 0.25, layer=2)
    grid = t.method("feather").grid[0].tolist()
    assert grid == hand_grid(8, 16, [12, 15])
    assert set(grid) <= set(t.kept[0][0].tolist())
    # cap floor(0.3 x 32) = 9 over 8 frames: q_t = floor((t+1) 9 / 8) - floor(t 9 / 8) = 1, ..., 1, 2:
    # one centred point (row 3, col 3) per frame, and row 3 by cols {0, 3} in frame 7
    t = run(bb, inputs, 0.25, layer=2, grid_share=0.3)
    assert t.method("feather").grid[0].tolist() == [f * 16 + 15 for f in range(7)] + [7 * 16 + 12, 7 * 16 + 15]
    # R = 0.5: k = 64, cap 32 -> the full stride grid fits
    t = run(bb, inputs, 0.5, layer=2)
    assert t.method("feather").grid[0].tolist() == full and set(full) <= set(t.kept[0][0].tolist())
    # grid_share 1: the grid takes the whole 25% budget
    t = run(bb, inputs, 0.25, layer=2, grid_share=1.0)
    assert sorted(t.kept[0][0].tolist()) == full
    # stride 2: rows/cols {0, 2} -> 4 per frame, cap 16 -> 2 per frame: row 2 by cols {0, 2} = local {8, 10}
    t = run(bb, inputs, 0.25, layer=2, grid_stride=2)
    assert t.method("feather").grid[0].tolist() == hand_grid(8, 16, [8, 10])
    # stride 1 = every token is a grid point: 2 per frame as a 1 x 2 lattice of the 4 x 4 frame, the
    # centred row (2) by the centred 2 of 4 columns (1, 3) = local {9, 11}; the rest by score
    t = run(bb, inputs, 0.25, layer=2, grid_stride=1)
    assert t.method("feather").grid[0].tolist() == hand_grid(8, 16, [9, 11])


class StubContext:
    """The part of a StageContext that FEATHER's paper-mode select reads, for one sample of
    ``frames`` frames of an h x w token grid (no model: the 7B layouts cost nothing)."""

    def __init__(self, frames, h, w, keep=None):
        n = frames * h * w
        self.index = torch.arange(n) if keep is None else torch.as_tensor(keep)
        self.layout_grid, self.per_frame = (h, w), h * w
        self.n_visual, self.visual_counts, self.layer_idx, self.batch_size = n, [len(self.index)], 2, 1
        self.trace = SimpleNamespace()

    def budget(self, retention):
        return [min(budget(self.n_visual, retention), len(self.index))]

    def visual_tokens(self, b):
        within = self.index % self.per_frame
        return VisualTokens(positions=torch.arange(len(self.index)), index=self.index,
                            frame=self.index // self.per_frame, row=within // self.layout_grid[1],
                            col=within % self.layout_grid[1])

    def current_visual_index(self, b):
        return self.index


def stub_grid(frames, h, w, retention, share, keep=None, stride=3):
    m = sharp.make_method("feather", retention, grid_share=share, grid_stride=stride)
    ctx = StubContext(frames, h, w, keep)
    scores = torch.rand(1, len(ctx.index), generator=torch.Generator().manual_seed(0))
    m.score = lambda c: scores  # the grid does not depend on the scores
    sel = m.select(ctx)
    grid = ctx.trace.grid[0]
    assert set(grid.tolist()) <= set(ctx.index[sel.keep_visual[0]].tolist())
    return grid, m


def grid_by_frame(grid, h, w):
    """{frame: (rows, cols, points)} of the grid's ORIGINAL indices."""
    out = {}
    for i in grid.tolist():
        f, r, c = i // (h * w), (i % (h * w)) // w, i % w
        out.setdefault(f, set()).add((r, c))
    return {f: (sorted({r for r, _ in p}), sorted({c for _, c in p}), p) for f, p in out.items()}


@pytest.mark.parametrize("name,frames,h,w", [("llava_onevision_7b", 32, 14, 14), ("qwen2_vl_7b", 16, 12, 15)])
@pytest.mark.parametrize("retention", [0.1, 0.15, 0.05])
def test_thinned_grid_is_a_spatial_sub_grid_of_every_frame(name, frames, h, w, retention):
    """When the stride-3 grid exceeds its cap (10% of 6272: cap 313 < 800 grid points), the kept grid
    points form, in every frame, a lattice (kept rows x kept cols) of the stride grid whose rows and
    columns span the frame; the frames get equal shares (within one point, spread evenly)."""
    grid, m = stub_grid(frames, h, w, retention, 0.5)
    k = budget(frames * h * w, retention)
    cap = int(0.5 * k)
    full = frames * math.ceil(h / 3) * math.ceil(w / 3)
    assert full > cap and 0 < len(grid) <= cap
    per = grid_by_frame(grid, h, w)
    quota = cap / frames
    for f, (rows, cols, points) in per.items():
        assert points == {(r, c) for r in rows for c in cols}  # a lattice
        assert all(r % 3 == 0 for r in rows) and all(c % 3 == 0 for c in cols)  # of the stride-3 grid
        if quota >= 4:  # at least 2 x 2: the rows and the columns each reach both halves of the frame
            assert min(rows) < h / 2 <= max(rows) and min(cols) < w / 2 <= max(cols)
    if quota >= 1:
        assert sorted(per) == list(range(frames))  # every frame has grid points
    counts = [len(p) for _, _, p in per.values()]
    assert max(counts) - min(counts) <= max(1, max(counts) // 2)  # frames get (nearly) equal lattices


def test_thinned_grid_by_hand():
    # 14 x 14: stride-3 rows / cols {0, 3, 6, 9, 12}; 10% of 32 x 196: k = 627, cap 313 -> 9 or 10 per
    # frame (313 = 32 x 9 + 25); a = round(5 sqrt(q / 25)) = 3 rows, b = min(5, q // 3) = 3 cols:
    # the centred 3 of 5 = grid rows / cols 0, 2, 4 -> {0, 6, 12}
    grid, _ = stub_grid(32, 14, 14, 0.1, 0.5)
    per = grid_by_frame(grid, 14, 14)
    assert all(rows == [0, 6, 12] and cols == [0, 6, 12] for rows, cols, _ in per.values())
    assert len(grid) == 32 * 9
    # 4 x 4 frames (the tiny backbones): stride-3 grid {0, 3}^2, 8 frames; R = 0.25: k = 32, cap 16,
    # 2 per frame: a = round(2 sqrt(1/2)) = 1 row (the centred one of 2: row 3), b = 2 cols {0, 3}
    grid, _ = stub_grid(8, 4, 4, 0.25, 0.5)
    assert grid.tolist() == [f * 16 + j for f in range(8) for j in (12, 15)]
    # fewer grid points than frames: cap 3 over 8 frames -> frames 2, 5, 7 (evenly spread), one
    # centred point each (row 3, col 3 of the 2 x 2 stride grid)
    grid, _ = stub_grid(8, 4, 4, 0.05, 0.5)  # k = round(6.4) = 6, cap 3
    assert grid.tolist() == [f * 16 + 15 for f in (2, 5, 7)]
    # after an earlier method (some tokens gone): still a lattice of each frame's remaining grid, <= cap
    keep = [i for i in range(32 * 196) if i % 7 != 3]
    grid, _ = stub_grid(32, 14, 14, 0.1, 0.5, keep=keep)
    assert set(grid.tolist()) <= set(keep) and 0 < len(grid) <= 313


def test_grid_uses_the_current_tokens_after_an_earlier_stage():
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=5)
    with sharp.prune(bb, "fastv+feather", 0.25, fastv={"layer": 1, "retention": 0.5},
                     feather={"layer": 2}) as trace, torch.no_grad():
        bb.model(**inputs)
    first, second = trace.kept[0][0].tolist(), trace.kept[1][0].tolist()
    on_grid = [i for i in first if (i % 16) // 4 % 3 == 0 and (i % 16) % 4 % 3 == 0]
    assert len(second) == 32 and set(second) <= set(first)
    # the grid is drawn from FastV's survivors on the stride grid (cap floor(0.5 x 32) = 16: with this
    # seed they all fit on the random weights of both transformers lines, so every surviving grid point is kept)
    assert 0 < len(on_grid) <= 16 and set(on_grid) <= set(second)
    assert sorted(trace.method("feather").grid[0].tolist()) == on_grid


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("retention", [0.05, 0.1, 0.25, 0.6, 0.9])
def test_budget_is_exact_and_schedule_matches(name, retention):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=7, batch_size=2)
    m = sharp.make_method("feather", retention, layer=2)
    with sharp.prune(bb, m) as trace, torch.no_grad():
        bb.model(**inputs)
    n = bb.layout(inputs).n_visual
    assert [len(k) for k in trace.kept[0]] == [budget(n, retention)] * 2
    assert trace.visual_tokens_per_layer == m.token_schedule(n, bb.num_layers, backbone=bb)
    assert trace.visual_tokens_per_layer == [n, n] + [budget(n, retention)] * 2


# ShaRP paper Table 1 (LLaVA-OV-7B, 6272 tokens) and Table 2 (Qwen2-VL-7B, 2880 tokens), FEATHER rows
@pytest.mark.parametrize("bb_name,retention,paper", [
    ("llava_onevision_7b", 0.25, 11.0), ("llava_onevision_7b", 0.2, 9.31), ("llava_onevision_7b", 0.15, 7.66),
    ("llava_onevision_7b", 0.1, 6.03), ("qwen2_vl_7b", 0.2, 4.1), ("qwen2_vl_7b", 0.1, 2.6)])
def test_tflops_match_the_paper(bb_name, retention, paper):
    ours = sharp.flops.prefill_tflops(bb_name, "feather", retention)
    assert abs(ours - paper) / paper < 0.03
    # the official two-stage schedule is far costlier (>= 15 TFLOPs on OV): not the paper's runs
    assert sharp.flops.prefill_tflops(bb_name, "feather", retention, schedule="official") > 1.3 * ours


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "pyramid"}, "'paper', 'official'"), ({"grid_stride": 0}, "grid_stride"),
    ({"grid_share": 1.5}, "grid_share"), ({"grid_share": -0.1}, "grid_share"),
    ({"layers": [16, 8]}, "layers"), ({"layers": [8]}, "layers"), ({"layers": [8, "16"]}, "layers"),
    ({"layer": "2"}, "layer"), ({"schedule": 3}, "schedule")])
def test_bad_kwargs(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sharp.make_method("feather", 0.25, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"layer": 0}, r"layer must be in 1\.\.3"), ({"layer": 4}, r"layer must be in 1\.\.3"),
    ({"schedule": "official", "layers": [8, 16]}, r"layers must be in 1\.\.3"),  # explicit 7B layers on 4 layers
    ({"schedule": "official", "layers": [0, 2]}, r"layers must be in 1\.\.3")])
def test_layer_outside_the_model(kwargs, match):
    bb = backbone("tiny_llava_onevision")
    with pytest.raises(ValueError, match=match), sharp.prune(bb, "feather", 0.25, **kwargs):
        pass
    with pytest.raises(ValueError, match=match):
        sharp.make_method("feather", 0.25, **kwargs).stages(bb.num_layers)


def test_official_two_stages():
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=8)
    m = sharp.make_method("feather", 0.25, schedule="official", layers=[2, 3])
    with sharp.prune(bb, m) as trace, torch.no_grad():
        bb.model(**inputs)
    assert trace.stage_layers == [2, 3] and m.score_layers(4) == [1, 2]
    full = hand_grid(8, 16, [0, 3, 12, 15])
    score = derope_visual_attention(bb, inputs, 1)  # layer 0's map is near-uniform (ties)
    stage1 = set(torch.topk(score, round(0.3 * 128)).indices.tolist()) | set(full)
    assert set(trace.kept[0][0].tolist()) == stage1  # top 30% united with the FULL grid
    n1 = len(stage1)
    stage2 = trace.kept[1][0].tolist()
    assert len(stage2) == int(0.09 * n1) and set(stage2) <= stage1
    assert len(stage2) < len(full)  # the 32 grid survivors are not protected at stage 2
    assert trace.visual_tokens_per_layer == [128, 128, n1, int(0.09 * n1)]
    # schedule: the upper bound (top 30% and grid disjoint), 38 + 32 = 70, then int(0.09 x 70) = 6
    assert m.token_schedule(128, 4, backbone=bb) == [128, 128, 70, 6]
    ov = sharp.make_method("feather", 0.25, schedule="official").token_schedule(6272, 28, "llava_onevision_7b")
    assert ov[7:9] == [6272, 1882 + 800] and ov[15:17] == [2682, int(0.09 * 2682)]  # 32 x 25 grid
    # retention is not used by the official schedule
    m2 = sharp.make_method("feather", 0.1, schedule="official", layers=[2, 3])
    with sharp.prune(bb, m2) as t2, torch.no_grad():
        bb.model(**inputs)
    assert [k.tolist() for k in t2.kept[0]] == [k.tolist() for k in trace.kept[0]]
