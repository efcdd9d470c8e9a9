"""STTM (baselines/sttm.py) against an independent brute-force reference of the official algorithm.

The reference is written from HYUNJS/STTM @ 00736c7 (token_merging_utils/quadtree_spatial_merger.py,
quadtree_builder.py, quadtree_temporal_merger.py) as plain numpy with recursion: per frame, the pyramid's
groups along each side (pairs; on an odd side row / column 0 alone), a node's feature the mean of its
children's (``weighted``: the exact mean of its patches), the stop test min_k cos(p, c_k) >= tau_s over
the 4 child slots with the missing ones replicated as the official code reads them (child (0, 0)) or
left out (``masked``), leaves emitted; then an edge between nodes of consecutive frames whose boxes
contain one another and whose cosine (x / (||x|| + 1e-8)) >= tau_t, breadth-first components, each the
(unweighted or patch-weighted) mean at its first node. Inputs are float64 so that the method's float64
path must agree exactly on every decision (the reference's margins to the thresholds are checked).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import sharp
from baselines.sttm import STTM, Quadtree, calibrate, pyramid_sizes
from conftest import random_video_inputs, shared_backbone
from engine_reference import layer_input
from sharp import PruningMethod, Selection

MARGIN = 1e-9


# -- the reference ----------------------------------------------------------------------------------


def ref_groups(n: int) -> list[list[int]]:
    """The children (along one side) of each parent of a level of n cells."""
    if n % 2 == 0:
        return [[2 * i, 2 * i + 1] for i in range(n // 2)]
    return [[0]] + [[2 * i - 1, 2 * i] for i in range(1, (n + 1) // 2)]


def ref_sizes(h: int, w: int) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    while sizes[0][0] != 2 and sizes[0][1] != 2:  # the official loop (grids with sides >= 2 here)
        sizes.insert(0, (math.ceil(sizes[0][0] / 2), math.ceil(sizes[0][1] / 2)))
    return sizes


class RefFrame:
    """One frame's quadtree by recursion. Levels are numbered 0 (root) .. L (patches)."""

    def __init__(self, x: np.ndarray, root_level: int, slots: str, weighted: bool):
        self.x, self.slots, self.weighted = x, slots, weighted
        sizes = ref_sizes(*x.shape[:2])
        self.sizes = sizes[min(root_level, len(sizes) - 1):]
        self.leaf = len(self.sizes) - 1
        self.stops: list[float] = []

    def span(self, level: int, axis: int, i: int) -> tuple[int, int]:
        """[start, end) patches of index i along ``axis`` at ``level``."""
        if level == self.leaf:
            return i, i + 1
        kids = ref_groups(self.sizes[level + 1][axis])[i]
        return self.span(level + 1, axis, kids[0])[0], self.span(level + 1, axis, kids[-1])[1]

    def box(self, level, i, j):
        (y0, y1), (x0, x1) = self.span(level, 0, i), self.span(level, 1, j)
        return y0, x0, y1, x1

    def feature(self, level: int, i: int, j: int) -> np.ndarray:
        if level == self.leaf:
            return self.x[i, j]
        if self.weighted:
            y0, x0, y1, x1 = self.box(level, i, j)
            return self.x[y0:y1, x0:x1].reshape(-1, self.x.shape[-1]).mean(axis=0)
        return np.mean([self.feature(level + 1, a, b) for a, b in self.children(level, i, j)], axis=0)

    def children(self, level, i, j):
        rows = ref_groups(self.sizes[level + 1][0])[i]
        cols = ref_groups(self.sizes[level + 1][1])[j]
        return [(a, b) for a in rows for b in cols]

    def slot_features(self, level, i, j) -> list[np.ndarray]:
        """The 4 child slots: (r0, c0), (r0, c1), (r1, c0), (r1, c1); a missing one is child (0, 0)
        (official) or absent (masked)."""
        rows = ref_groups(self.sizes[level + 1][0])[i]
        cols = ref_groups(self.sizes[level + 1][1])[j]
        out = []
        for a in (0, 1):
            for b in (0, 1):
                if a < len(rows) and b < len(cols):
                    out.append(self.feature(level + 1, rows[a], cols[b]))
                elif self.slots == "official":
                    out.append(self.feature(level + 1, 0, 0))
        return out

    def emit(self, tau: float, level: int = 0, i=None, j=None) -> list[tuple[tuple, np.ndarray]]:
        if i is None:
            return [n for a in range(self.sizes[0][0]) for b in range(self.sizes[0][1]) for n in self.emit(tau, 0, a, b)]
        p = self.feature(level, i, j)
        if level == self.leaf:
            return [(self.box(level, i, j), p)]
        s = min(float(p @ c / max(np.linalg.norm(p) * np.linalg.norm(c), 1e-8)) for c in self.slot_features(level, i, j))
        self.stops.append(s)
        if s >= tau:
            return [(self.box(level, i, j), p)]
        return [n for a, b in self.children(level, i, j) for n in self.emit(tau, level + 1, a, b)]


def reference_sttm(x: np.ndarray, tau_s: float, tau_t, root_level: int = 1, slots: str = "official",
                   weighted: bool = False) -> dict:
    """x (T, H, W, D) float64 -> boxes (n, 5), features (n, D), spatial boxes / features, margins."""
    frames = []
    margins = []
    for t in range(x.shape[0]):
        f = RefFrame(x[t], root_level, slots, weighted)
        nodes = sorted(f.emit(tau_s), key=lambda n: (n[0][0], n[0][1]))
        margins += [abs(s - tau_s) for s in f.stops]
        frames.append([((t,) + box, feat) for box, feat in nodes])
    nodes = [n for fr in frames for n in fr]
    spatial = dict(boxes=np.array([n[0] for n in nodes]), features=np.array([n[1] for n in nodes]))
    if tau_t is None:
        return dict(spatial, spatial=spatial, margins=margins, members=[1] * len(nodes))
    index, edges = {}, {i: [] for i in range(len(nodes))}
    for i, n in enumerate(nodes):
        index[n[0]] = i
    cos_all = []
    offsets = np.cumsum([0] + [len(fr) for fr in frames])
    for t in range(len(frames) - 1):
        for a in range(offsets[t], offsets[t + 1]):
            for b in range(offsets[t + 1], offsets[t + 2]):
                (_, ay0, ax0, ay1, ax1), (_, by0, bx0, by1, bx1) = nodes[a][0], nodes[b][0]
                a_in_b = by0 <= ay0 and bx0 <= ax0 and ay1 <= by1 and ax1 <= bx1
                b_in_a = ay0 <= by0 and ax0 <= bx0 and by1 <= ay1 and bx1 <= ax1
                if not (a_in_b or b_in_a):
                    continue
                u, v = nodes[a][1], nodes[b][1]
                cos = float((u / (np.linalg.norm(u) + 1e-8)) @ (v / (np.linalg.norm(v) + 1e-8)))
                cos_all.append(cos)
                margins.append(abs(cos - tau_t))
                if cos >= tau_t:
                    edges[a].append(b)
                    edges[b].append(a)
    seen, boxes, feats, members = set(), [], [], []
    for start in range(len(nodes)):  # nodes in sorted order: the first unseen node is its component's first
        if start in seen:
            continue
        comp, queue = [], deque([start])
        seen.add(start)
        while queue:
            a = queue.popleft()
            comp.append(a)
            for b in edges[a]:
                if b not in seen:
                    seen.add(b)
                    queue.append(b)
        w = np.array([(nodes[a][0][3] - nodes[a][0][1]) * (nodes[a][0][4] - nodes[a][0][2]) if weighted else 1.0
                      for a in comp], dtype=np.float64)
        feats.append((np.array([nodes[a][1] for a in comp]) * w[:, None]).sum(axis=0) / w.sum())
        boxes.append(nodes[min(comp)][0])
        members.append(len(comp))
    return dict(boxes=np.array(boxes), features=np.array(feats), spatial=spatial, margins=margins,
                members=members, pair_cos=np.array(cos_all))


def blocky_video(t: int, h: int, w: int, d: int, seed: int) -> np.ndarray:
    """(t, h, w, d) float64: piecewise-constant blocks of random sizes plus noise, slowly changing over
    frames, so that nodes stop at every level and merge across frames."""
    rng = np.random.default_rng(seed)
    x = np.zeros((t, h, w, d))
    base = rng.normal(size=(h, w, d)) * 0.3
    for _ in range(6):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = min(h, y0 + rng.integers(1, 8)), min(w, x0 + rng.integers(1, 8))
        base[y0:y1, x0:x1] += rng.normal(size=d) * 2
    for f in range(t):
        drift = rng.normal(size=(h, w, d)) * 0.05 * f
        x[f] = base + drift + rng.normal(size=(h, w, d)) * 0.05
    return x


def run(x: np.ndarray, tau_s, tau_t, **kw):
    tree = Quadtree(torch.tensor(x), kw.get("root_level", 1), kw.get("slots", "official"), kw.get("weighted", False))
    return tree, tree.merge(tau_s, tau_t)


def assert_same(merged, ref, nodes_key="boxes"):
    assert merged.boxes.tolist() == ref[nodes_key].tolist()
    np.testing.assert_allclose(merged.features.numpy(), ref["features"], rtol=0, atol=1e-12)


# -- quadtree and temporal merging against the reference --------------------------------------------

GRIDS = [(14, 14, 1), (14, 14, 0), (7, 7, 0), (13, 9, 1), (5, 8, 0), (6, 11, 1), (4, 4, 0), (9, 4, 0), (27, 27, 2)]


@pytest.mark.parametrize("slots", ["official", "masked"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("h,w,root", GRIDS)
def test_quadtree_equals_recursive_reference(h, w, root, slots, weighted):
    x = blocky_video(3, h, w, 6, seed=h * 31 + w)
    probe = Quadtree(torch.tensor(x), root, slots, weighted)
    internal = probe.stop[torch.isfinite(probe.stop)]
    if len(internal) == 0:
        pytest.skip("no internal nodes")
    for tau_s in (float(internal.quantile(0.3)) + 1e-7, float(internal.quantile(0.7)) + 1e-7):
        ref = reference_sttm(x, tau_s, None, root, slots, weighted)
        assert min(ref["margins"], default=1.0) > MARGIN
        merged = probe.merge(tau_s, None)
        assert_same(merged, ref["spatial"])
        assert merged.spatial_nodes == len(ref["boxes"])


def test_quadtree_has_every_granularity():
    """The thresholds above give tokens of several sizes (the reference comparison is not vacuous)."""
    x = blocky_video(3, 14, 14, 6, seed=14 * 31 + 14)
    tree = Quadtree(torch.tensor(x), 1)
    internal = tree.stop[torch.isfinite(tree.stop)]
    merged = tree.merge(float(internal.quantile(0.7)) + 1e-7, None)
    sizes = set(((merged.boxes[:, 3] - merged.boxes[:, 1]) * (merged.boxes[:, 4] - merged.boxes[:, 2])).tolist())
    assert {1, 4} <= sizes and max(sizes) >= 8


@pytest.mark.parametrize("slots", ["official", "masked"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("h,w,root", [(14, 14, 1), (7, 7, 0), (13, 9, 1), (6, 11, 1), (4, 4, 0)])
def test_temporal_merging_equals_bfs_components(h, w, root, slots, weighted):
    x = blocky_video(4, h, w, 6, seed=h * 7 + w)
    tree = Quadtree(torch.tensor(x), root, slots, weighted)
    internal = tree.stop[torch.isfinite(tree.stop)]
    tau_s = float(internal.quantile(0.5)) + 1e-7 if len(internal) else 2.0
    tau_t = float(tree.pair_cos.quantile(0.4)) + 1e-7
    ref = reference_sttm(x, tau_s, tau_t, root, slots, weighted)
    assert min(ref["margins"]) > MARGIN
    merged = tree.merge(tau_s, tau_t)
    assert_same(merged, ref)
    assert merged.members.tolist() == ref["members"]
    assert max(ref["members"]) >= 3  # components over several frames


def test_invalid_child_slots_official_quirk():
    """A uniform 14 x 14 frame with a distinct top-left patch: the official stop test compares the row-0 and
    column-0 roots with the level-7 child (0, 0) too, so their 6 roots split (22 tokens); masked: 16."""
    x = np.ones((1, 14, 14, 4))
    x[0, 0, 0] = [1.0, -1.0, 0.5, 0.0]
    counts = {}
    for slots in ("official", "masked"):
        ref = reference_sttm(x, 0.99, None, 1, slots)
        _, merged = run(x, 0.99, None, slots=slots)
        assert_same(merged, ref["spatial"])
        counts[slots] = len(merged.cells)
    assert counts == {"official": 22, "masked": 16}


def test_pyramid_sizes_follow_the_official_loop():
    for h, w in [(14, 14), (13, 27), (4, 4), (2, 2), (3, 8), (27, 27), (2, 9)]:
        assert pyramid_sizes(h, w) == ref_sizes(h, w)


def test_no_merging_is_the_identity():
    """tau_s > 1 and no temporal edges: every patch its own token, rows unchanged."""
    x = blocky_video(3, 7, 9, 5, seed=0)
    _, merged = run(x, 1.5, None)
    assert torch.equal(merged.cells, torch.arange(3 * 7 * 9))
    assert torch.equal(merged.features, torch.tensor(x).reshape(-1, 5))


# -- retention -> thresholds ------------------------------------------------------------------------


@pytest.mark.parametrize("retention", [0.5, 0.25, 0.1, 0.05])
def test_calibration_reaches_the_budget(retention):
    x = blocky_video(6, 14, 14, 8, seed=3)
    tree = Quadtree(torch.tensor(x), 1)
    k = round(retention * x.shape[0] * 196)
    found = calibrate(tree, k, None, None, 0.85, 0.60, True, 20)
    assert found.count == tree.count(found.tau_s, found.tau_t)
    floor = tree.count(-1.0, -1.0)
    if floor <= k:
        assert found.count <= k
        assert found.count >= 0.8 * k  # a fine search lands close below the budget on this video
        assert found.tau_s == pytest.approx(1 - found.lam * 0.15) and found.tau_t == pytest.approx(1 - found.lam * 0.40)
    else:
        assert found.count == floor


def test_calibration_keeps_a_given_threshold():
    x = blocky_video(4, 14, 14, 8, seed=5)
    tree = Quadtree(torch.tensor(x), 1)
    found = calibrate(tree, 200, 2.0, None, 0.85, 0.60, True, 20)  # no spatial merging: only tau_t moves
    assert found.tau_s == 2.0 and found.count <= 200
    assert tree.merge(found.tau_s, found.tau_t).spatial_nodes == 4 * 196


def test_kwargs_are_validated():
    with pytest.raises(ValueError, match="invalid_child_slots"):
        STTM(invalid_child_slots="zero")
    with pytest.raises(ValueError, match="root_level"):
        STTM(root_level=-1)
    with pytest.raises(ValueError, match="anchor_tau_t"):
        STTM(anchor_tau_t=1.0)
    with pytest.raises(ValueError, match="layer"):
        STTM(layer=4).stages(4)


def test_layer_follows_the_depth():
    """sa_start_layer_idx 2 of 28 maps by depth, at least layer 1: 1 on the 4- and 8-layer models."""
    assert sharp.resolve_method("sttm", "tiny_llava_onevision", 0.25).method.layer == 1
    assert sharp.resolve_method("sttm", "toy_scenes_llava_onevision", 0.25).method.layer == 1
    assert sharp.resolve_method("sttm", "tiny_llava_onevision", 0.25).method.positions == "compact"
    assert sharp.resolve_method("sttm", "tiny_qwen2_vl", 0.25).method.positions == "original"


# -- in the model -----------------------------------------------------------------------------------

SEEN: dict = {}


@sharp.register_method
@dataclass
class _SttmProbe(PruningMethod):
    """Records sample 0's visual tokens and their rows at the input of ``layer`` (changes nothing)."""
    name = "_sttm_probe"
    layer: int = 0

    def stages(self, num_layers):
        return [self.layer]

    def select(self, ctx):
        tokens = ctx.visual_tokens(0)
        SEEN.update(index=tokens.index.clone(), frame=tokens.frame.clone(), row=tokens.row.clone(),
                    col=tokens.col.clone(), start=int(tokens.positions.min()),
                    rows=ctx.hidden_states[0, tokens.positions].detach().clone())
        return Selection.unchanged()


def probe_grid(bb, inputs, layer: int):
    """(x (T, H, W, D) float64 rows at the input of ``layer``, original index (T, H, W), first position)."""
    with sharp.prune(bb, "_sttm_probe", 1.0, layer=layer), torch.no_grad():
        bb.model(**inputs)
    frames = SEEN["frame"] - SEEN["frame"].min()
    t, h, w = int(frames.max()) + 1, int(SEEN["row"].max()) + 1, int(SEEN["col"].max()) + 1
    x = np.zeros((t, h, w, SEEN["rows"].shape[1]))
    index = np.full((t, h, w), -1)
    for i in range(len(frames)):
        x[frames[i], SEEN["row"][i], SEEN["col"][i]] = SEEN["rows"][i].double().numpy()
        index[frames[i], SEEN["row"][i], SEEN["col"][i]] = int(SEEN["index"][i])
    assert (index >= 0).all()
    return x, index, SEEN["start"]


def midpoint(values) -> tuple[float, float]:
    """A threshold between the two middle values and its distance to both."""
    v = np.sort(np.asarray(values))
    lo, hi = v[len(v) // 2 - 1], v[len(v) // 2]
    return (lo + hi) / 2, (hi - lo) / 2


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_in_model_equals_reference(name):
    """At layer 1 with root_level 0 (spatial merging on the 4 x 4 grids) and thresholds at the medians of
    the video's own statistics: the kept tokens are the reference's slots, and the visual rows entering
    layer 1 after the stage are the reference's merged features (float32 model, float64 reference)."""
    bb = shared_backbone(name)
    inputs = random_video_inputs(bb, frames=8)
    x, index, start = probe_grid(bb, inputs, layer=1)
    frame0 = RefFrame(x[0], 0, "official", False)
    frame0.emit(2.0)
    tau_s, gap_s = midpoint(frame0.stops)
    tau_t, gap_t = midpoint(reference_sttm(x, tau_s, -2.0, 0)["pair_cos"])
    ref = reference_sttm(x, tau_s, tau_t, 0)
    assert min(ref["margins"]) > 1e-5 and min(gap_s, gap_t) > 1e-5
    kept = [int(index[t, y, x0]) for t, y, x0, _, _ in ref["boxes"]]
    assert kept == sorted(kept) and 1 < len(kept) < index.size and max(ref["members"]) > 1
    method = STTM(retention=1.0, layer=1, tau_s=float(tau_s), tau_t=float(tau_t), root_level=0)
    hidden, trace = layer_input(bb, inputs, method, layer=1)
    assert trace.kept[0][0].tolist() == kept
    assert trace.method("sttm").kept == [len(kept)]
    rows = hidden[0, start:start + len(kept)].double().numpy()
    np.testing.assert_allclose(rows, ref["features"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_no_merging_in_model_is_the_identity(name):
    """tau_s > 1 and temporal merging off (tau_t <= 0, the official switch): every token kept, the same
    logits as the unpruned model."""
    bb = shared_backbone(name)
    inputs = random_video_inputs(bb, frames=8)
    with torch.no_grad():
        ref = bb.model(**inputs).logits
    with sharp.prune(bb, "sttm", 0.25, tau_s=1.5, tau_t=-1.0, layer=1, root_level=0) as trace, torch.no_grad():
        out = bb.model(**inputs).logits
    t, n = trace.method("sttm"), trace.visual_tokens_per_layer[0]
    assert t.kept == [n] and t.spatial_tokens == [n] and trace.visual_tokens_per_layer == [n] * bb.num_layers
    boxes = t.boxes[0]
    assert ((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2]) == 1).all()  # every token a patch
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl", "toy_llava_onevision"])
def test_retention_sweep_measures_the_share(name):
    """The default (calibrated) reading keeps at most round(r N) tokens unless the video's floor is above
    it; the trace reports the measured share and the engine's schedule is that count."""
    bb = shared_backbone(name)
    inputs = random_video_inputs(bb, frames=8)
    shares = []
    for r in (0.5, 0.25, 0.1, 0.05):
        with sharp.prune(bb, "sttm", r, root_level=0) as trace, torch.no_grad():
            bb.model(**inputs)
        t = trace.method("sttm")
        n = bb.layout(inputs).n_visual
        assert trace.visual_tokens_per_layer[-1] == t.kept[0] == len(trace.kept[0][0])
        assert t.share[0] == pytest.approx(t.kept[0] / n)
        assert t.kept[0] <= sharp.budget(n, r) or t.lam[0] == pytest.approx(2 / 0.15)
        shares.append(t.share[0])
    assert shares == sorted(shares, reverse=True) and shares[0] <= 0.5 and shares[0] > shares[-1]


# -- the fast path against a straightforward torch computation, bit for bit -------------------------
# The method pools in place from strided views, shares the temporal units with the stop test, counts in
# numpy and gathers only the merged rows; the plain version below gathers every official child slot,
# calls F.cosine_similarity, recomputes every cosine per video and sums each component in a loop. Same
# arithmetic, so every statistic, pair cosine, count and merged row must be EQUAL (float32 and bfloat16
# states on the fast path's shared units; float64 on its separate cosine units).


def plain_quadtree(x: torch.Tensor, root: int, slots: str, weighted: bool):
    """(features (T, F, D) input dtype, stop (T, F), reach (T, F), boxes [(y0, x0, y1, x1)] * F): the
    levels root to leaf, raster order, by explicit loops over the parents."""
    import torch.nn.functional as F

    acc = torch.promote_types(x.dtype, torch.float32)
    t, h, w, dim = x.shape
    sizes = ref_sizes(h, w)
    sizes = sizes[min(root, len(sizes) - 1):]
    feats = [x]
    spans = [([(i, i + 1) for i in range(h)], [(j, j + 1) for j in range(w)])]
    stops = [torch.full((t, h, w), math.inf, dtype=acc)]
    for ph, pw in reversed(sizes[:-1]):
        child, (row_span, col_span) = feats[0], spans[0]
        groups_r, groups_c = ref_groups(child.shape[1]), ref_groups(child.shape[2])
        parent = torch.empty(t, ph, pw, dim, dtype=x.dtype)
        stop = torch.empty(t, ph, pw, dtype=acc)
        for i, rows in enumerate(groups_r):
            for j, cols in enumerate(groups_c):
                total, weight, reads = torch.zeros(t, dim, dtype=acc), 0.0, []
                for a in (0, 1):
                    for b in (0, 1):
                        valid = a < len(rows) and b < len(cols)
                        r, c = (rows[a], cols[b]) if valid else (0, 0)
                        size = (row_span[r][1] - row_span[r][0]) * (col_span[c][1] - col_span[c][0])
                        wk = (float(size) if weighted else 1.0) if valid else 0.0
                        total += child[:, r, c].to(acc) * wk
                        weight += wk
                        if valid or slots == "official":
                            reads.append(child[:, r, c])
                parent[:, i, j] = (total / weight).to(x.dtype)
                cos = F.cosine_similarity(parent[:, i, j].to(acc)[:, None], torch.stack(reads, 1).to(acc), dim=-1)
                stop[:, i, j] = cos.min(dim=1).values
        feats.insert(0, parent)
        stops.insert(0, stop)
        spans.insert(0, ([(row_span[g[0]][0], row_span[g[-1]][1]) for g in groups_r],
                         [(col_span[g[0]][0], col_span[g[-1]][1]) for g in groups_c]))
    boxes = [(y0, x0, y1, x1) for rs, cs in spans for (y0, y1) in rs for (x0, x1) in cs]
    reach = [torch.full((t, *sizes[0]), -math.inf, dtype=acc)]
    for level in range(1, len(feats)):
        above = torch.maximum(reach[-1], stops[level - 1])
        gr, gc = ref_groups(sizes[level][0]), ref_groups(sizes[level][1])
        parent_r = [i for i, g in enumerate(gr) for _ in g]
        parent_c = [j for j, g in enumerate(gc) for _ in g]
        reach.append(above[:, parent_r][:, :, parent_c])
    flat = lambda levels: torch.cat([v.reshape(t, -1, *v.shape[3:]) for v in levels], dim=1)
    return flat(feats), flat(stops), flat(reach), boxes


def plain_pair_cos(features: torch.Tensor, boxes) -> dict:
    """{(id in frame t, id in frame t + 1): cos} for every pair of nested boxes (either way), from one
    batched matmul of x / (||x|| + 1e-8) over all nodes."""
    t, f, _ = features.shape
    x = features.to(torch.promote_types(features.dtype, torch.float32))
    unit = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    cos = torch.bmm(unit[:-1], unit[1:].transpose(1, 2))
    inside = lambda a, b: b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]
    nested = [(u, v) for u in range(f) for v in range(f) if inside(boxes[u], boxes[v]) or inside(boxes[v], boxes[u])]
    return {(s * f + u, (s + 1) * f + v): float(cos[s, u, v]) for s in range(t - 1) for u, v in nested}


def plain_merge(features, stop, reach, boxes, width, tau_s, tau_t, pair_cos, weighted):
    """(cells, rows (n, D)) at (tau_s, tau_t): tokens sorted by top-left cell, components by union-find over
    the pairs, each summed member by member in token order."""
    t, f, dim = features.shape
    acc = torch.promote_types(features.dtype, torch.float32)
    height = max(b[2] for b in boxes)
    ids = [i for i in range(t * f) if reach.reshape(-1)[i] < tau_s <= stop.reshape(-1)[i]]
    key = lambda i: (i // f) * height * width + boxes[i % f][0] * width + boxes[i % f][1]
    ids.sort(key=key)
    root = {i: i for i in ids}

    def find(i):
        while root[i] != i:
            i = root[i]
        return i
    for (a, b), cos in pair_cos.items():
        if tau_t is not None and a in root and b in root and cos >= tau_t:
            ra, rb = find(a), find(b)
            root[max(ra, rb, key=key)] = min(ra, rb, key=key)
    cells, rows = [], []
    for first in [i for i in ids if find(i) == i]:
        total, weight = torch.zeros(dim, dtype=acc), torch.zeros((), dtype=acc)
        for i in [i for i in ids if find(i) == first]:
            y0, x0, y1, x1 = boxes[i % f]
            wk = torch.tensor(float((y1 - y0) * (x1 - x0)) if weighted else 1.0, dtype=acc)
            total += features[i // f, i % f].to(acc) * wk
            weight += wk
        cells.append(key(first))
        rows.append((total / weight).to(features.dtype))
    return cells, torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("h,w,root,slots,weighted", [(14, 14, 1, "official", False), (13, 9, 1, "official", True),
                                                      (7, 7, 0, "masked", False), (6, 11, 1, "masked", True),
                                                      (9, 4, 0, "official", False)])
def test_fast_path_equals_plain_computation(h, w, root, slots, weighted, dtype):
    x = torch.tensor(blocky_video(4, h, w, 24, seed=h * 13 + w) + 3.0).to(dtype)
    tree = Quadtree(x, root, slots, weighted)
    features, stop, reach, boxes = plain_quadtree(x, root, slots, weighted)
    f = len(boxes)
    assert tree.per_frame == f and tree.boxes.tolist() == [list(b) for b in boxes]
    assert torch.equal(torch.cat(tree.level_features, dim=1), features)
    assert torch.equal(tree.stop, stop.reshape(-1)) and torch.equal(tree.reach, reach.reshape(-1))
    pair_cos = plain_pair_cos(features, boxes)
    assert dict(zip(map(tuple, tree.pairs.tolist()), tree.pair_cos.tolist())) == pair_cos
    internal = stop[torch.isfinite(stop)]
    cosines = torch.tensor(list(pair_cos.values()))
    for qs, qt in [(0.3, 0.3), (0.6, 0.8), (0.9, None), (0.5, 0.05)]:
        tau_s = float(internal.quantile(qs)) if len(internal) else 2.0
        tau_t = None if qt is None else float(cosines.quantile(qt))  # on a cosine: ties decide by >=
        cells, rows = plain_merge(features, stop, reach, boxes, w, tau_s, tau_t, pair_cos, weighted)
        merged = tree.merge(tau_s, tau_t)
        assert merged.cells.tolist() == cells and torch.equal(merged.features, rows)
        assert tree.count(tau_s, tau_t) == len(cells)


def test_calibration_equals_plain_bisection():
    """calibrate's steps are the plain bisection's, counted by merging (not by the counter)."""
    x = torch.tensor(blocky_video(6, 14, 14, 16, seed=9)).float()
    tree = Quadtree(x, 1)
    for k in (400, 200, 60, 20):
        lo, hi = 0.0, 2 / (1 - 0.85)  # lam_max: tau_s = -1 (and tau_t < -1)
        count = lambda lam: len(tree.merge(1 - lam * (1 - 0.85), 1 - lam * (1 - 0.60)).cells)
        expected = None
        if count(0.0) <= k:
            expected = (0.0, count(0.0))
        elif count(hi) > k:
            expected = (hi, count(hi))
        else:
            best = (hi, count(hi))
            for _ in range(20):
                mid = (lo + best[0]) / 2
                c = count(mid)
                if c == k:
                    best = (mid, c)
                    break
                best, lo = ((mid, c), lo) if c < k else (best, mid)
            expected = best
        found = calibrate(tree, k, None, None, 0.85, 0.60, True, 20)
        assert (found.lam, found.count) == expected


def test_sample_rows_is_a_view_of_one_run():
    from baselines.sttm import sample_rows

    hidden = torch.randn(20, 3)
    run = sample_rows(hidden, torch.arange(4, 12))
    assert run.data_ptr() == hidden[4].data_ptr() and torch.equal(run, hidden[4:12])
    scattered = torch.tensor([4, 6, 5, 9])
    assert torch.equal(sample_rows(hidden, scattered), hidden[scattered])
