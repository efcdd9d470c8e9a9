"""FlashVID (baselines/flashvid.py) against independent references.

References: plain numpy / Python loops written from the official code (Fanziyang-v/FlashVID @ 1d37422:
``flashvid/token_selection.py`` attn_div(_v2)_based_token_selection, ``flashvid/utils.py`` segment,
additional_segment, spatiotemporal_compression, dpc_knn, fastv_prune), the budgets of the notes
(OV, N = 196), an explicit parent-pointer forest for TSTM, eager attention maps for the in-LLM stage.
The DPC-kNN tie-break noise is the documented draw (``torch.rand`` of a CPU generator seeded with
``seed``), the only thing shared with the method.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sharp
from baselines import flashvid as fv
from conftest import shared_backbone
from engine_reference import layer_input

# -- numpy references ----------------------------------------------------------------------------------


def ref_max_min(x, a, k, kind):
    """The official greedy max-min of each frame, with loops. x (F, N, D), a (F, N): the picks, sorted
    (v2 may repeat a pick: no guard)."""
    x = np.asarray(x, np.float64)
    frames, n, _ = x.shape
    mu = x.reshape(-1, x.shape[-1]).mean(axis=0)  # the segment's mean feature
    out = []
    for f in range(frames):
        unit = x[f] / np.linalg.norm(x[f], axis=1, keepdims=True)
        w = [1.0 if kind == "div" else 1e6 * a[f][j] * (float(x[f, j] @ mu) if kind == "attn_div_v2" else 1.0)
             for j in range(n)]
        d = [[(1.0 - float(unit[i] @ unit[j])) * w[j] for j in range(n)] for i in range(n)]
        second = [sorted(d[i][j] for i in range(n))[1] for j in range(n)]
        picks = [max(range(n), key=lambda j: (second[j], -j))]
        while len(picks) < k:
            best, best_value = None, None
            for j in range(n):
                if kind != "attn_div_v2" and j in picks:
                    continue
                value = min(d[i][j] for i in picks)
                if best is None or value > best_value:
                    best, best_value = j, value
            picks.append(best)
        out.append(sorted(picks))
    return out


def ref_forest(x, picked, tau, floor):
    """TSTM with explicit parent pointers. Returns (parent {(t, j): m}, roots [(t, j)], rows_official,
    rows_subtree: {(t, j): row})."""
    x = np.asarray(x, np.float64)
    n, N, _ = x.shape
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    best = np.full((n, N), -1.0)
    arg = np.full((n, N), -1)
    for t in range(1, n):
        for j in range(N):
            if picked[t][j]:
                continue
            for m in range(N):
                if picked[t - 1][m]:
                    continue
                c = float(unit[t, j] @ unit[t - 1, m])
                if c > best[t, j]:
                    best[t, j], arg[t, j] = c, m
    threshold = tau
    if int((best <= threshold).sum()) < floor:
        threshold = max(sorted(best.reshape(-1).tolist(), reverse=True)[n * N - floor - 1], -1.0 + 1e-6)
    parent = {(t, j): int(arg[t, j]) for t in range(n) for j in range(N) if best[t, j] > threshold}
    children = {}
    for (t, j), m in parent.items():
        children.setdefault((t - 1, m), []).append((t, j))

    def subtree(node):
        out = [node]
        for c in children.get(node, []):
            out += subtree(c)
        return out

    roots = [(t, j) for t in range(n) for j in range(N) if (t, j) not in parent]
    official, mean = {}, {}
    for r in roots:
        members = subtree(r)
        total = sum(x[t, j] for t, j in members)
        official[r] = total / (1 + len(children.get(r, [])))
        mean[r] = total / len(members)
    return parent, roots, official, mean


def ref_dpc(x, clusters, noise):
    """DPC-kNN in float64 loops (k = min(clusters, 7)): (centres ascending, cluster means)."""
    x = np.asarray(x, np.float64)
    m, d = x.shape
    k = min(clusters, 7)
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / math.sqrt(d)
    rho = np.array([math.exp(-np.mean(np.sort(dist[i])[:k] ** 2)) for i in range(m)]) + noise
    delta = np.array([min([dist[i, j] for j in range(m) if rho[j] > rho[i]], default=dist.max()) for i in range(m)])
    centres = list(np.argsort(-(rho * delta), kind="stable")[:clusters])
    members = {c: [] for c in centres}
    for i in range(m):
        members[i if i in members else centres[int(np.argmin([dist[i, c] for c in centres]))]].append(i)
    order = sorted(centres)
    return order, np.stack([x[members[c]].mean(axis=0) for c in order])


# -- ADTS ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["attn_div", "attn_div_v2", "div"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_min_selection_equals_reference_loop(kind, seed):
    """Random (F, N, D) segment with fixed a_j: the picks equal the official greedy written as loops
    (v1: w = 1e6 a; v2: w = 1e6 a (x . mu), mu the segment mean; positive features keep w > 0)."""
    g = np.random.default_rng(seed)
    x = g.random((3, 24, 16)) + 0.05  # positive: x . mu > 0, so v2 repicks nothing
    a = g.random((3, 24))
    a = a / a.sum(axis=1, keepdims=True)
    picks = fv.adts_picks(torch.from_numpy(x).float(), torch.from_numpy(a).float(), 9, kind)
    assert picks.tolist() == ref_max_min(x, a, 9, kind)
    assert all(len(set(p)) == 9 for p in picks.tolist())


def test_v2_repicks_are_kept_once_and_counted():
    """v2 has no guard: with one token of positive weight x_j . mu, the greedy picks it again (the
    reference loop does too); the stage keeps it once and counts the repicks."""
    x = np.zeros((1, 6, 8))
    x[0, 0, 0] = 10.0
    for j in range(1, 6):
        x[0, j, 0], x[0, j, j + 1] = -1.0, 0.5
    a = np.full((1, 6), 1 / 6)
    picks = fv.adts_picks(torch.from_numpy(x).float(), torch.from_numpy(a).float(), 3, "attn_div_v2")
    assert picks.tolist() == ref_max_min(x, a, 3, "attn_div_v2") == [[0, 0, 0]]
    method = sharp.make_method("flashvid", 0.25, alpha=1.0)
    keep, _, picked, _, repicks = method.compress_segment(torch.from_numpy(x).float(), torch.from_numpy(a).float(),
                                                          (3, 3, 0), torch.Generator())
    assert keep.tolist() == picked.tolist() == [0] and repicks == 2


# -- budgets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,expected", [(0.25, (62, 44, 18)), (0.10, (25, 18, 7)), (0.15, (37, 26, 11)),
                                        (0.20, (49, 35, 14)), (1.0, (196, 138, 58))])
def test_frame_budget_is_ceil_n_r_e_split_by_alpha(r, expected):
    """B = ceil(N r e) (at most N), A = ceil(alpha B), S = B - A; OV N = 196, e = 1.25, alpha = 0.7."""
    assert fv.frame_budget(196, r, 1.25, 0.7) == expected
    b = min(196, math.ceil(196 * r * 1.25))
    assert expected == (b, math.ceil(0.7 * b), b - math.ceil(0.7 * b))


@pytest.mark.parametrize("bb_name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("r", [0.25, 0.5])
def test_single_frame_segments_keep_exactly_the_frame_budget(bb_name, r):
    """With every frame its own segment (min_segments >= frames) each frame keeps A ADTS tokens and
    ceil(N x S / N) = S clusters: F x B before the LLM, then ceil(0.3 F B) from the in-LLM stage."""
    bb = shared_backbone(bb_name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=3)
    layout = bb.layout(inputs)
    with sharp.prune(bb, "flashvid", r, min_segments=16) as trace, torch.no_grad():
        bb.model(**inputs)
    t = trace.method("flashvid")
    n = layout.tokens_per_frame
    b, a, s = fv.frame_budget(n, r, 1.25, 0.7)
    assert t.frame_budget == (b, a, s) and t.segments == [[1] * layout.frames]
    adts_per_frame = torch.bincount(t.adts[0] // n, minlength=layout.frames)
    assert adts_per_frame.tolist() == [a] * layout.frames
    kept_frames = torch.bincount(trace.kept[0][0] // n, minlength=layout.frames)
    assert kept_frames.tolist() == [b] * layout.frames
    assert t.kept_before_llm == [layout.frames * b]
    assert t.kept_in_llm == [math.ceil(0.3 * layout.frames * b)]


# -- DySeg --------------------------------------------------------------------------------------------


def test_dyseg_cuts_below_threshold_then_the_least_similar():
    """Frame means along directions: transitions 2->3 and 5->6 are below 0.9; with min 4 segments the
    least similar of the others (0->1) is cut too; the cut ones are never counted twice."""
    angles = [0.0, 0.4, 0.5, 1.3, 1.35, 1.47, 2.5, 2.52]  # steps .4 .1 .8 .05 .12 1.03 .02
    means = torch.tensor([[math.cos(t), math.sin(t)] for t in angles])
    assert fv.dyseg(means, 0.9, 2) == [3, 3, 2]  # cos(.8), cos(1.03) < 0.9
    assert fv.dyseg(means, 0.9, 4) == [1, 2, 3, 2]  # + 0->1 (cos .4 = 0.92)
    assert fv.dyseg(means, 0.9, 5) == [1, 2, 2, 1, 2]  # + 4->5 (cos .12), the next least similar
    assert fv.dyseg(means, 0.9, 20) == [1] * 8  # all 7 transitions
    assert fv.dyseg(means, 0.9, 20, complementary=False) == [3, 3, 2]


# -- TSTM ---------------------------------------------------------------------------------------------


def tstm_video(seed, n=4, N=10, D=8):
    """Frames that drift: each token is its previous-frame token plus noise (chains of merges), a few
    tokens replaced at random (new roots), three ADTS picks per frame."""
    g = np.random.default_rng(seed)
    x = np.empty((n, N, D))
    x[0] = g.normal(size=(N, D))
    for t in range(1, n):
        x[t] = x[t - 1][g.permutation(N)] + 0.3 * g.normal(size=(N, D))
        fresh = g.choice(N, 2, replace=False)
        x[t, fresh] = g.normal(size=(2, D))
    picked = np.zeros((n, N), dtype=bool)
    for t in range(n):
        picked[t, g.choice(N, 3, replace=False)] = True
    return x, picked


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("floor", [0, 30])
def test_tstm_equals_parent_pointer_forest(seed, floor):
    """Parents (incl. the floor rule's raised threshold) and both denominators' root rows equal the
    explicit forest: official = subtree sum / (1 + direct children), subtree = the mean."""
    x, picked = tstm_video(seed)
    n, N, _ = x.shape
    parent_ref, roots, official, mean = ref_forest(x, picked, 0.8, floor)
    parent, used = fv.temporal_parents(torch.from_numpy(x), torch.from_numpy(picked), 0.8, floor)
    got = {(t, j): int(parent[t, j]) for t in range(n) for j in range(N) if parent[t, j] >= 0}
    assert got == parent_ref
    assert any((t - 1, m) in parent_ref for (t, _), m in parent_ref.items())  # some chain of depth 2
    assert len(roots) >= floor and used >= 0.8  # the floor can only raise the threshold
    if floor and seed == 0:
        assert used > 0.8  # (seed 0: the floor acts)
    for denominator, ref in (("official", official), ("subtree", mean)):
        rows = fv.merge_trees(torch.from_numpy(x), parent, denominator)
        for (t, j), row in ref.items():
            np.testing.assert_allclose(rows[t, j].double().numpy(), row, rtol=1e-5, atol=1e-5)


def test_tstm_chain_hand_example():
    """a <- b <- c (three frames, one token each, identical directions): the published code gives
    (a + b + c) / 2, the subtree reading the mean (a + b + c) / 3."""
    x = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[4.0, 0.0]]])
    parent, _ = fv.temporal_parents(x, torch.zeros(3, 1, dtype=torch.bool), 0.8, 0)
    assert parent.squeeze(1).tolist() == [-1, 0, 0]
    assert fv.merge_trees(x, parent, "official")[0, 0].tolist() == [3.5, 0.0]
    assert fv.merge_trees(x, parent, "subtree")[0, 0].tolist() == pytest.approx([7 / 3, 0.0])


def test_adts_tokens_neither_merge_nor_absorb():
    """A picked token of frame t has no parent, and no token of frame t+1 points to it."""
    x, picked = tstm_video(5)
    parent, _ = fv.temporal_parents(torch.from_numpy(x), torch.from_numpy(picked), -1.0, 0)
    p = parent.numpy()
    assert (p[torch.from_numpy(picked).numpy()] == -1).all()
    for t in range(1, x.shape[0]):
        targets = p[t][p[t] >= 0]
        assert not picked[t - 1][targets].any()


# -- DPC-kNN -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,clusters", [(0, 3), (1, 5), (2, 8)])
def test_dpc_knn_equals_reference(seed, clusters):
    g = np.random.default_rng(seed)
    x = g.normal(size=(20, 6))
    noise = torch.rand(20, generator=torch.Generator().manual_seed(seed)) * 1e-6
    centres, rows = fv.dpc_knn_merge(torch.from_numpy(x).float(), clusters, noise)
    ref_centres, ref_rows = ref_dpc(x, clusters, noise.double().numpy())
    assert centres.tolist() == ref_centres
    np.testing.assert_allclose(rows.double().numpy(), ref_rows, rtol=1e-5, atol=1e-6)


def test_dpc_knn_is_the_shared_density_peak_score():
    """FlashVID's dpc_knn score (Euclidean / sqrt(D), exp(-mean kNN d^2) + noise, min distance to a
    denser token, the largest distance for the densest) is baselines/density_peaks.py's."""
    g = np.random.default_rng(7)
    x = torch.from_numpy(g.normal(size=(12, 5))).float()
    dist = torch.cdist(x, x) / math.sqrt(5)
    noise = torch.rand(12, generator=torch.Generator().manual_seed(0)) * 1e-6
    nearest = torch.topk(dist, 4, dim=-1, largest=False).values
    rho = torch.mean(-(nearest ** 2), dim=-1).exp() + noise
    higher = rho[None, :] > rho[:, None]
    delta = torch.where(higher, dist, dist.max()).min(dim=-1).values
    from baselines.density_peaks import density_peak_scores

    torch.testing.assert_close(density_peak_scores(dist, 4, noise), rho * delta)


# -- the stages through sharp.prune -------------------------------------------------------------------------


@pytest.mark.parametrize("bb_name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_in_llm_stage_keeps_top_ceil_share_by_last_token_attention(bb_name):
    """Before layer 3 (20 of 28 on 4 layers): the top ceil(0.3 V) of the V tokens left by the pre-LLM
    stage by the last token's eager attention of layer 2 (head mean), checked on a run with the
    pre-LLM stage only and output_attentions."""
    bb = shared_backbone(bb_name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=4)
    with sharp.prune(bb, "flashvid", 0.5) as trace, torch.no_grad():
        bb.model(**inputs)
    assert trace.stage_layers == [0, 3]
    with sharp.prune(bb, "flashvid", 0.5, pruning_layer=None) as pre, torch.no_grad():
        out = bb.model(**inputs, output_attentions=True)
    kept0 = pre.kept[0][0]
    assert torch.equal(kept0, trace.kept[0][0])
    attn = out.attentions[2][0, :, -1, :].mean(dim=0)  # (s',) the pruned sequence
    ids = inputs["input_ids"][0]
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    # the pruned sequence's visual rows, in order: the kept original indices
    first = int(vis.nonzero()[0])  # the video is one run of rows (both families)
    k0 = len(kept0)
    visual_scores = attn[first:first + k0]
    assert ids.numel() - int(vis.sum()) + k0 == attn.numel()
    k = math.ceil(0.3 * k0)
    expected = kept0[torch.topk(visual_scores, k).indices].sort().values
    assert torch.equal(trace.kept[1][0].sort().values, expected)
    assert trace.visual_tokens_per_layer == [k0] * 3 + [k]


@pytest.mark.parametrize("bb_name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_full_retention_without_llm_stage_is_the_identity(bb_name):
    """r = 1: B = N, so TSTM's floor allows no merge and every root stays (the official code would
    fail on topk(0)); without the in-LLM stage the outputs are bit-identical to vanilla."""
    bb = shared_backbone(bb_name, "sdpa")
    inputs = bb.synthetic_inputs(frames=8, seed=5)
    with torch.no_grad():
        ref = bb.model(**inputs).logits
    with sharp.prune(bb, "flashvid", 1.0, pruning_layer=None) as trace, torch.no_grad():
        got = bb.model(**inputs).logits
    assert torch.equal(got, ref) and trace.visual_tokens_per_layer[-1] == bb.layout(inputs).n_visual


def drifting_video(bb, frames=8, seed=0):
    """A random picture that changes a little from frame to frame (long merge chains)."""
    g = np.random.default_rng(seed)
    h, w = bb.synthetic_frame_size()
    video = np.empty((frames, h, w, 3), dtype=np.uint8)
    video[0] = g.integers(0, 256, size=(h, w, 3))
    for t in range(1, frames):
        video[t] = np.clip(video[t - 1].astype(int) + g.integers(-12, 13, size=(h, w, 3)), 0, 255)
    return bb.pixels_to_inputs(video, "What happens in the video?")


def test_merge_denominator_changes_the_merged_rows_not_the_counts():
    """One segment (no DySeg) of a slowly changing video: the forest does not depend on the denominator,
    so the ADTS tokens and the number of clusters per frame are the same; the merged rows (and so the
    clusters DPC-kNN finds in them) differ."""
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = drifting_video(bb)
    rows = {}
    for denominator in ("official", "subtree"):
        hidden, trace = layer_input(bb, inputs, "flashvid", 0.25, do_segment=False, pruning_layer=None,
                                    merge_denominator=denominator)
        t = trace.method("flashvid")
        rows[denominator] = (t.adts[0], torch.bincount(trace.kept[0][0] // 16, minlength=8), hidden)
        assert t.segments == [[8]]
    assert torch.equal(rows["official"][0], rows["subtree"][0])
    assert torch.equal(rows["official"][1], rows["subtree"][1])
    assert not torch.equal(rows["official"][2], rows["subtree"][2])


def test_family_defaults_follow_the_scripts():
    """LLaVA: attn_div_v2, 8 segments, layer 20 of 28; Qwen: attn_div, 4 segments; Qwen3-VL-8B: 10 %
    from layer 28 of 36 (scripts/qwen3_vl.sh); depth mapping on the tiny models; positions."""
    ov = sharp.resolve_method("flashvid", "llava_onevision_7b", 0.1).method
    assert (ov.token_selection, ov.min_segments, ov.pruning_layer, ov.llm_retention, ov.positions) == \
        ("attn_div_v2", 8, 20, 0.3, "compact")
    for name in ("qwen2_5_vl_7b", "qwen2_vl_7b"):
        q = sharp.resolve_method("flashvid", name, 0.1).method
        assert (q.token_selection, q.min_segments, q.pruning_layer, q.positions) == ("attn_div", 4, 20, "original")
    q3 = sharp.resolve_method("flashvid", "qwen3_vl_8b", 0.1).method
    assert (q3.token_selection, q3.min_segments, q3.pruning_layer, q3.llm_retention) == ("attn_div", 4, 28, 0.1)
    assert sharp.resolve_method("flashvid", "tiny_llava_onevision", 0.1).method.pruning_layer == 3
    assert sharp.resolve_method("flashvid", "tiny_qwen3_vl", 0.1).method.pruning_layer == 3


def test_nominal_schedule_and_mean_share():
    """OV-7B, 32 x 196 at r: 32 x ceil(196 r 1.25) before layer 20, ceil(0.3 x that) after; the mean over
    the 28 layers is about r (the scripts' meaning of retention_ratio)."""
    m = sharp.resolve_method("flashvid", "llava_onevision_7b", 0.25).method
    sched = m.token_schedule(6272, 28, "llava_onevision_7b")
    assert sched[:20] == [32 * 62] * 20 and sched[20:] == [math.ceil(0.3 * 32 * 62)] * 8
    assert abs(sum(sched) / 28 / 6272 - 0.25) < 0.01


def test_bad_values_name_the_kwarg():
    for kwargs, word in [({"token_selection": "v3"}, "token_selection"),
                         ({"merge_denominator": "x"}, "merge_denominator"),
                         ({"alpha": 1.5}, "alpha"), ({"expansion": 0.0}, "expansion"),
                         ({"temporal_threshold": 2.0}, "temporal_threshold"), ({"min_segments": 0}, "min_segments"),
                         ({"llm_retention": 0.0}, "llm_retention"), ({"pruning_layer": 0}, "pruning_layer")]:
        with pytest.raises(ValueError, match=word):
            sharp.make_method("flashvid", 0.25, **kwargs)


def test_adts_reads_the_pooled_siglip_attention_and_the_llm_input():
    """Through sharp.prune on tiny LLaVA-OV: the ADTS tokens of each frame equal the reference greedy
    (v1) on the unpruned layer-0 input and the last SigLIP layer's eager attention (mean over heads
    and queries), pooled bilinearly to the token grid as LLaVA-OV pools its features."""
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=8)
    layout = bb.layout(inputs)
    full, _ = layer_input(bb, inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)[0]
    x = full[0, vis].reshape(layout.frames, layout.tokens_per_frame, -1).double().numpy()
    with torch.no_grad():
        out = bb.model.model.vision_tower(inputs["pixel_values_videos"].flatten(0, 1), output_attentions=True)
    received = out.attentions[-1].mean(dim=(1, 2))  # (F, P): attention each patch receives
    side = math.isqrt(received.shape[1])
    a = F.interpolate(received.view(-1, 1, side, side), size=layout.grid, mode="bilinear").flatten(1).numpy()
    with sharp.prune(bb, "flashvid", 0.5, min_segments=16, token_selection="attn_div") as trace, torch.no_grad():
        bb.model(**inputs)
    t = trace.method("flashvid")
    _, adts, _ = t.frame_budget
    n = layout.tokens_per_frame
    expected = [f * n + j for f in range(layout.frames)
                for j in ref_max_min(x[f:f + 1], a[f:f + 1], adts, "attn_div")[0]]
    assert t.adts[0].tolist() == expected


# -- the batched video path against a loop over segments and frames ----------------------------------------


def loop_compress(x, a, sizes, budget, kind, denominator, generator, threshold=0.8):
    """The per-segment, per-frame loop of the official ``segment_compression`` (one segment, then one
    frame at a time) over the single-segment steps each tested above against its reference: ADTS of the
    segment's frames, the segment's forest and fold, DPC-kNN of one frame's roots with that frame's own
    noise draw. Returns (kept flat indices ascending, their rows, ADTS flat indices, thresholds)."""
    per_frame = x.shape[1]
    _, adts, tstm = budget
    keep, rows, picked_all, thresholds, start = [], [], [], [], 0
    for n in sizes:
        seg_x, seg_a = x[start:start + n], a[start:start + n]
        picked = torch.zeros(n, per_frame, dtype=torch.bool)
        picked.scatter_(1, fv.adts_picks(seg_x, seg_a, adts, kind), True)
        if n > 1:
            parent, used = fv.temporal_parents(seg_x, picked, threshold, (adts + tstm) * n)
            thresholds.append(used)
            merged = fv.merge_trees(seg_x, parent, denominator)
            roots = (parent < 0) & ~picked
            ratio = tstm * n / max(1, int(roots.sum()))
            clusters = [math.ceil(int(c) * ratio) for c in roots.sum(dim=1)]
        else:
            merged, roots = seg_x.float(), ~picked
            ratio = tstm / per_frame
            clusters = [min(math.ceil(per_frame * ratio), int(roots.sum()))]
        for f in range(n):
            base = (start + f) * per_frame
            for j in picked[f].nonzero().squeeze(1).tolist():
                keep.append(base + j)
                rows.append(seg_x[f, j].float())
                picked_all.append(base + j)
            cells = roots[f].nonzero().squeeze(1)
            if ratio < 1.0 and 0 < clusters[f] < len(cells):
                noise = torch.rand(len(cells), generator=generator) * fv.DENSITY_NOISE
                centres, cluster_rows = fv.dpc_knn_merge(merged[f, cells], clusters[f], noise)
                cells = cells[centres]
            else:
                cluster_rows = merged[f, cells]
            keep += (base + cells).tolist()
            rows += list(cluster_rows)
        start += n
    order = np.argsort(keep, kind="stable")
    return [keep[i] for i in order], torch.stack([rows[i] for i in order]), sorted(picked_all), thresholds


def segmented_video(seed, sizes, N=40, D=24):
    """Segments of drifting frames (merge chains), the first frame of each segment new; a_j random."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for n in sizes:
        frame = torch.randn(N, D, generator=g)
        for _ in range(n):
            frames.append(frame)
            frame = frame[torch.randperm(N, generator=g)] + 0.15 * torch.randn(N, D, generator=g)
    x = torch.stack(frames) + 0.3
    a = torch.softmax(2 * torch.randn(x.shape[:2], generator=g), dim=-1)
    return x, a


SEGMENTS = [3, 1, 4, 1, 2, 5]
# (retention, TSTM threshold): r = .1 clusters pools of 2..36 roots (both cdist paths, one-cluster
# frames), .25 and .5 the defaults, (.5, 0.0) merges so much that the floor raises the threshold
LOOP_CASES = [(0.1, 0.8), (0.25, 0.8), (0.5, 0.8), (0.5, 0.0)]


@pytest.mark.parametrize("kind", ["attn_div_v2", "attn_div", "div", "attn"])
@pytest.mark.parametrize("denominator", ["official", "subtree"])
@pytest.mark.parametrize("retention,threshold", LOOP_CASES)
def test_batched_video_equals_the_segment_and_frame_loop(kind, denominator, retention, threshold):
    """compress_segments (every step batched over the frames of all segments, DPC-kNN of all clustering
    frames padded into one batch, one noise draw) keeps the same tokens with the same rows as the loop
    over segments and frames."""
    x, a = segmented_video(7, SEGMENTS)
    budget = fv.frame_budget(x.shape[1], retention, 1.25, 0.7)
    method = sharp.make_method("flashvid", retention, token_selection=kind, merge_denominator=denominator,
                               temporal_threshold=threshold)
    got = method.compress_segments(x, a, SEGMENTS, budget, torch.Generator().manual_seed(0))
    keep, rows, picked, thresholds = loop_compress(x, a, SEGMENTS, budget, kind, denominator,
                                                   torch.Generator().manual_seed(0), threshold)
    assert got.keep.tolist() == keep and got.picked.tolist() == picked
    assert got.thresholds == thresholds and got.segments == SEGMENTS
    torch.testing.assert_close(got.rows, rows, rtol=1e-6, atol=1e-6)


def test_batched_video_cases_are_covered():
    """The loop test's cases have merges, a floor-raised threshold, single-frame segments, DPC pools on
    both torch.cdist paths (<= 25 and > 25 roots) and one-cluster frames."""
    merges, raised, counts, one_cluster = False, False, [], False
    x, a = segmented_video(7, SEGMENTS)
    for retention, threshold in LOOP_CASES:
        _, adts, tstm = fv.frame_budget(x.shape[1], retention, 1.25, 0.7)
        picked = torch.zeros(x.shape[:2], dtype=torch.bool)
        picked.scatter_(1, fv.adts_picks(x, a, adts, "attn_div_v2", SEGMENTS), True)
        parent, used = fv.forest_parents(x, picked, SEGMENTS, threshold, [(adts + tstm) * n for n in SEGMENTS])
        roots = (parent < 0) & ~picked
        clusters = fv.cluster_counts(roots.sum(dim=1).tolist(), SEGMENTS, tstm, x.shape[1])
        merges |= bool((parent >= 0).any())
        raised |= any(u > threshold for u in used)
        counts += [int(r) for r, c in zip(roots.sum(dim=1), clusters) if c]
        one_cluster |= 1 in clusters
    assert merges and raised and one_cluster and 1 in SEGMENTS
    assert min(counts) <= 25 < max(counts)  # torch.cdist's matrix-product formula beyond 25 rows


def test_dpc_knn_sets_equals_one_set_at_a_time():
    """Sets of different sizes (both cdist paths), cluster counts (k = 1, 3, 7) and padding, in one
    batch: the centres and rows of each equal the one-set call, and its centres the float64 reference."""
    g = np.random.default_rng(3)
    counts, clusters = [9, 31, 4, 40, 28], [3, 1, 1, 9, 7]
    width = max(counts)
    x = torch.zeros(len(counts), width, 6)
    noise = torch.zeros(len(counts), width)
    sets = []
    for i, (m, c) in enumerate(zip(counts, clusters)):
        pts = torch.from_numpy(g.normal(size=(m, 6))).float()
        nz = torch.rand(m, generator=torch.Generator().manual_seed(i)) * 1e-6
        x[i, :m], noise[i, :m] = pts, nz
        sets.append((pts, c, nz))
    centres, valid, rows = fv.dpc_knn_sets(x, counts, clusters, noise)
    for i, (pts, c, nz) in enumerate(sets):
        got_centres = centres[i][valid[i]]
        order = torch.argsort(got_centres)
        ref_centres, ref_rows = fv.dpc_knn_merge(pts, c, nz)
        assert torch.equal(got_centres[order], ref_centres)
        assert torch.equal(rows[i][valid[i]][order], ref_rows)
        if c > 1:  # one cluster: any centre is the same mean (ties broken by the noise's rounding)
            assert ref_centres.tolist() == ref_dpc(pts.numpy(), c, nz.double().numpy())[0]


def test_forest_of_several_segments_equals_each_segment_alone():
    """forest_parents over consecutive segments = temporal_parents of each (no edge across a cut, each
    segment's own floor), and one fold of the whole video = the folds of the segments."""
    parts = [tstm_video(s, n=n) for s, n in ((0, 4), (1, 1), (2, 3))]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    picked = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    sizes, floors = [4, 1, 3], [30, 5, 0]
    parent, used = fv.forest_parents(x, picked, sizes, 0.8, floors)
    start = 0
    for n, floor in zip(sizes, floors):
        seg = slice(start, start + n)
        p, u = fv.temporal_parents(x[seg], picked[seg], 0.8, floor)
        assert torch.equal(parent[seg], p) and u == used[sizes.index(n)]
        for denominator in ("official", "subtree"):
            torch.testing.assert_close(fv.merge_trees(x, parent, denominator)[seg],
                                       fv.merge_trees(x[seg], p, denominator), rtol=0, atol=0)
        start += n
    assert used[0] > 0.8  # the floor acted in the first segment only
