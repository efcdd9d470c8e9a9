"""HoliTom and holitom_sharp (baselines/holitom.py) against independent references.

(a) the DP segmentation equals brute force over every segmentation of small inputs;
(b) DPC-kNN, its cluster merge and the sequential in-LLM merge on hand-made inputs with results
    computed by hand (in the comments);
(c) the pre-LLM stage on a video with repeated frames equals a reference written here (brute-force
    segmentation, numpy DPC-kNN, the vision tower's own eager attention pooled with F.interpolate);
(d) the in-LLM stage keeps the top-k of layer k-1's eager map and merges sequentially (masked no-cache
    forward);
(e) exact budgets at each stage, Table 3's TFLOPs, Qwen2-VL (temporal patches), errors;
(f) holitom_sharp with HoliTom's compact positions and ShaRP's original ones: decode equals a masked
    no-cache reference whose positions are those of the sequence after the pre-LLM stage;
(g) the vectorised pre-LLM stage bit for bit against the loops it replaced, written here: the official
    similarity formula, the official DP loop, static masks window by window, one top-k per frame
    (ties included), the stage group by group; the input hidden states are never written and copied
    only when a kept row changes.
"""
from __future__ import annotations

import functools

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine_reference
import sharp
from baselines import holitom as H
from sharp import flops
from sharp.methods import budget

from engine_reference import Recorder, generate_with_logits, layer_masks, replay_reference_logits
from conftest import shared_backbone



def backbone(name, impl="eager"):
    return shared_backbone(name, impl)


# -- (a) segmentation -------------------------------------------------------------------------------
def brute_force_segmentations(sim: list[list[float]], tau: float, max_window: int):
    """Every split of frames 0..F-1 into consecutive windows (<= max_window frames), with its value
    sum over windows [a, e] of (e - a) x #{p : sim[t][p] > tau for all t in a..e-1}."""
    frames, n = len(sim) + 1, len(sim[0])
    out = []
    for cuts in itertools.product([0, 1], repeat=frames - 1):
        windows, start = [], 0
        for i, cut in enumerate(cuts):
            if cut:
                windows.append((start, i))
                start = i + 1
        windows.append((start, frames - 1))
        if any(e - a + 1 > max_window for a, e in windows):
            continue
        value = 0
        for a, e in windows:
            static = sum(all(sim[t][p] > tau for t in range(a, e)) for p in range(n)) if e > a else 0
            value += (e - a) * static
        out.append((value, windows))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_dp_segmentation_equals_brute_force(seed):
    g = np.random.default_rng(seed)
    frames, n = int(g.integers(2, 8)), int(g.integers(1, 5))
    sim = g.uniform(0.3, 1.0, size=(frames - 1, n)).round(2)
    tau = float(g.choice([0.5, 0.65, 0.8]))
    for max_window in (1024, 2, 3):
        windows, value = H.segment_windows(torch.tensor(sim), tau, max_window)
        every = brute_force_segmentations(sim.tolist(), tau, max_window)
        best = max(v for v, _ in every)
        assert value == best
        assert (value, windows) in every  # a valid segmentation that attains the maximum
        optimal = [w for v, w in every if v == best]
        if len(optimal) == 1:
            assert windows == optimal[0]


def test_segmentation_hand_example():
    # 4 frames, 2 positions: p0 similar across every pair, p1 only between frames 2 and 3.
    # c(0,3) = 3 x 1 = 3 and c(0,1) + c(2,3) = 1 x 1 + 1 x 2 = 3 tie; the DP keeps the first option
    # found (for frame 3: window [2, 3] (w = 2) is tried before [0, 3] (w = 4), replaced only if larger)
    sim = torch.tensor([[0.9, 0.1], [0.9, 0.2], [0.9, 0.95]])
    assert H.segment_windows(sim, 0.8) == ([(0, 1), (2, 3)], 3.0)
    assert H.segment_windows(sim, 0.8, max_window=2) == ([(0, 1), (2, 3)], 3.0)
    assert H.segment_windows(sim, 0.95) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0.0)
    assert H.static_mask(sim, (2, 3), 0.8).tolist() == [True, True]
    assert H.static_mask(sim, (0, 3), 0.8).tolist() == [True, False]
    assert H.rescaled_ratio(0.15, 100, 40) == pytest.approx(0.25)  # 0.15 / (60 / 100)
    assert H.rescaled_ratio(0.5, 100, 60) == 1.0  # capped


def test_group_quotas_by_hand():
    # sizes 10, 7, 3 at r' = 0.25: shares 2.5, 1.75, 0.75
    assert H.group_quotas([10, 7, 3], ["dynamic", "dynamic", "static"], 0.25, 0, "official") == [3, 2, 1]
    # exact, total 5 of 20: cumulative 5 x (10, 17, 20) / 20 = 2.5, 4.25, 5 -> floors 2, 4, 5 -> 2, 2, 1
    assert H.group_quotas([10, 7, 3], ["dynamic", "dynamic", "static"], 0.25, 5, "exact") == [2, 2, 1]
    # total 4: 2, 3.4, 4 -> 2, 1, 1
    assert H.group_quotas([10, 7, 3], ["dynamic", "dynamic", "static"], 0.25, 4, "exact") == [2, 1, 1]
    assert H.group_quotas([4, 2], ["dynamic", "static"], 1.0, 6, "exact") == [4, 2]
    # 32 equal frames of 196 at 15 %: 941 = 29 x 19 + 30 x 13, the 30s spread over the video
    quotas = H.group_quotas([196] * 32, ["dynamic"] * 32, 0.15, 941, "exact")
    assert sum(quotas) == 941 and set(quotas) == {29, 30}
    thirty = [i for i, q in enumerate(quotas) if q == 30]
    assert len(thirty) == 13 and max(b - a for a, b in zip(thirty, thirty[1:])) <= 3
    # official static rounding is Python's round (half to even): 2 x 0.25 = 0.5 -> 0
    assert H.group_quotas([2], ["static"], 0.25, 0, "official") == [0]


# -- (b) hand-made DPC-kNN and merges -----------------------------------------------------------------
# Six points on a line, 0, 1, 1.5, 6, 6.5, 9 (embedded as 2x on the first of 4 axes, so dist / sqrt(4)
# is the 1-D distance), k = 3 nearest (self included):
#   mean sq. of the 3 nearest: p0 (0,1,1.5) 1.0833, p1 (0,.5,1) .41667, p2 (0,.5,1.5) .8333,
#   p3 (0,.5,3) 3.0833, p4 (0,.5,2.5) 2.1667, p5 (0,2.5,3) 5.0833
#   density e^-x: .3385, .6592, .4346, .04581, .11455, .00620 (order p1 > p2 > p0 > p4 > p3 > p5)
#   delta (dist to the nearest denser point; the densest: the largest distance 9):
#     p1 9, p2 .5, p0 1, p4 5, p3 .5, p5 2.5
#   score rho x delta: p1 5.933, p4 .5727, p0 .3385, p2 .2173, p3 .0229, p5 .0155
POINTS = [0.0, 1.0, 1.5, 6.0, 6.5, 9.0]


def _embed(points):
    x = torch.zeros(len(points), 4)
    x[:, 0] = 2 * torch.tensor(points)
    return x


def test_dpc_knn_hand_computed():
    x = _embed(POINTS)
    gen = torch.Generator().manual_seed(0)
    centres, dist = H.dpc_knn_centres(x, 2, 3, gen)
    assert centres.tolist() == [1, 4]
    torch.testing.assert_close(dist[0, 5], torch.tensor(9.0))
    assert H.dpc_knn_centres(x, 3, 3, gen)[0].tolist() == [0, 1, 4]
    # assignment to the nearest centre: p0, p2 -> p1; p3, p5 -> p4
    # beta 0.6: 0.6 x 1 + 0.4 x mean(0, 1.5) = 0.9; 0.6 x 6.5 + 0.4 x mean(6, 9) = 6.9
    merged = H.merge_into_centres(x, centres, dist, beta=0.6, mode="beta")
    torch.testing.assert_close(merged[:, 0] / 2, torch.tensor([0.9, 6.9]))
    # NO_BETA: mean of the centre and its members: (1 + 0 + 1.5) / 3, (6.5 + 6 + 9) / 3
    merged = H.merge_into_centres(x, centres, dist, mode="mean")
    torch.testing.assert_close(merged[:, 0] / 2, torch.tensor([2.5 / 3, 21.5 / 3]))
    # a centre without members stays itself: centres p0, p1; every other point is nearer p1:
    # p1 -> 0.6 x 1 + 0.4 x mean(1.5, 6, 6.5, 9) = 2.9
    lonely = H.merge_into_centres(x, torch.tensor([0, 1]), dist, beta=0.6)
    torch.testing.assert_close(lonely[:, 0] / 2, torch.tensor([0.0, 2.9]))


def test_dpc_tie_break_is_seeded():
    x = _embed([0.0, 1.0, 2.0, 3.0])  # equally spaced: equal densities at k = 1, the noise decides
    picks = {H.dpc_knn_centres(x, 1, 1, torch.Generator().manual_seed(s))[0].item() for s in range(20)}
    assert len(picks) > 1
    a = H.dpc_knn_centres(x, 1, 1, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, H.dpc_knn_centres(x, 1, 1, torch.Generator().manual_seed(3))[0])


def test_sequential_merge_hand_computed():
    # kept 1 = (1, 0), kept 3 = (0, 1); dropped 0 = (2, .1) and 2 = (4, .2) are nearer kept 1,
    # dropped 4 = (.1, 3) nearer kept 3. In index order:
    #   kept1 <- ((1, 0) + (2, .1)) / 2 = (1.5, .05); kept1 <- ((1.5, .05) + (4, .2)) / 2 = (2.75, .125)
    #   kept3 <- ((0, 1) + (.1, 3)) / 2 = (.05, 2)
    x = torch.tensor([[2.0, 0.1], [1.0, 0.0], [4.0, 0.2], [0.0, 1.0], [0.1, 3.0]])
    out = H.sequential_merge(x, torch.tensor([1, 3]), torch.tensor([0, 2, 4]))
    torch.testing.assert_close(out, torch.tensor([[2.75, 0.125], [0.05, 2.0]]))
    mean = torch.stack([x[[0, 1, 2]].mean(0), x[[3, 4]].mean(0)])
    assert not torch.allclose(out, mean)  # not a mean: later tokens weigh more
    # the order matters: dropped 2 before dropped 0 gives ((1 + 4) / 2 + 2) / 2
    rev = H.sequential_merge(x, torch.tensor([1, 3]), torch.tensor([2, 0, 4]))
    torch.testing.assert_close(rev[0], torch.tensor([2.25, 0.1]))
    nothing = torch.tensor([], dtype=torch.long)
    torch.testing.assert_close(H.sequential_merge(x, torch.tensor([0, 1, 2, 3, 4]), nothing), x)


# -- (c) the pre-LLM stage against a reference ---------------------------------------------------------
def structured_video(bb, seed=5):
    """8 frames: 0-2 identical, 3 new, 4-7 one picture whose top half changes every frame."""
    g = np.random.default_rng(seed)
    h, w = bb.synthetic_frame_size()
    frames = g.integers(0, 256, size=(8, h, w, 3), dtype=np.uint8)
    frames[1] = frames[2] = frames[0]
    for f in (5, 6, 7):
        frames[f] = frames[4]
        frames[f, : h // 2] = g.integers(0, 256, size=(h // 2, w, 3), dtype=np.uint8)
    return bb.pixels_to_inputs(frames, "What happens in the video?")


def layer0_visual_input(bb, inputs):
    """(F, n, d) the LLM's input rows of the video (an unpruned forward, hooked at layer 0)."""
    seen = {}
    h = bb.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        h.remove()
    layout = bb.layout(inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)
    return seen["x"][0, vis[0]].float().view(layout.frames, layout.tokens_per_frame, -1)


def eager_vision_attention_ov(bb, inputs):
    """(F, n): the last SigLIP layer's eager attention, mean over heads and queries, pooled per frame
    with F.interpolate (bilinear side -> ceil(side / 2)) as LLaVA-OV pools its features."""
    pv = inputs["pixel_values_videos"]
    with torch.no_grad():
        out = bb.model.model.vision_tower(pv.flatten(0, 1), output_attentions=True)
    received = out.attentions[-1].mean(dim=(1, 2))  # (F, P)
    side = math.isqrt(received.shape[1])
    grid = received.view(-1, 1, side, side)
    return F.interpolate(grid, size=(math.ceil(side / 2),) * 2, mode="bilinear").flatten(1)


def ref_dpc(x: np.ndarray, clusters: int, k: int, noise: np.ndarray):
    """DPC-kNN in float64 loops; returns (centres ascending, dist). k >= 3 keeps the test well posed:
    with k <= 2 mutual nearest neighbours have equal densities and the 1e-6 tie-break, quantised by
    float32 near density 1, decides (the official code's float32 arithmetic, not reproduced here)."""
    m, d = x.shape
    assert k >= 3, "ill-posed reference case (k < 3): change the test video or retention"
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / math.sqrt(d)
    rho = np.array([math.exp(-np.mean(np.sort(dist[i])[:k] ** 2)) for i in range(m)]) + noise * 1e-6
    delta = np.array([min([dist[i, j] for j in range(m) if rho[j] > rho[i]], default=dist.max()) for i in range(m)])
    centres = sorted(np.argsort(-(rho * delta), kind="stable")[:clusters].tolist())
    return centres, dist


def ref_merge(x: np.ndarray, centres, dist, beta, mode):
    rows = []
    members = [i for i in range(len(x)) if i not in centres]
    nearest = {i: centres[int(np.argmin([dist[i, c] for c in centres]))] for i in members}
    for c in centres:
        own = [x[i] for i in members if nearest[i] == c]
        if not own:
            rows.append(x[c])
        elif mode == "mean":
            rows.append(np.mean([x[c]] + own, axis=0))
        else:
            rows.append(beta * x[c] + (1 - beta) * np.mean(own, axis=0))
    return rows


def reference_pre_llm(x: torch.Tensor, attn: torch.Tensor, r: float, tau: float, rounding: str, D: float,
                      mode: str, beta=0.6, K=7, seed=0):
    """HoliTom before the LLM, written from the paper / official code with brute-force segmentation.
    The DPC noise: one generator seeded with ``seed``, drawn (m values) by each DPC run, static set of
    a window first, then its frames in order (the documented order of baselines/holitom.py)."""
    frames, n, _ = x.shape
    xs = x.double().numpy()
    unit = xs / np.linalg.norm(xs, axis=-1, keepdims=True)
    sim = (unit[:-1] * unit[1:]).sum(-1)
    every = brute_force_segmentations(sim.tolist(), tau, 1024)
    best = max(v for v, _ in every)
    optimal = [w for v, w in every if v == best]
    assert len(optimal) == 1, "the test video must have one optimal segmentation"
    windows = optimal[0]
    ratio = min(r / ((frames * n - best) / (frames * n)), 1.0)
    groups = []  # (kind, frame, cells, rows, attention)
    for a, e in windows:
        static = [p for p in range(n) if e > a and all(sim[t][p] > tau for t in range(a, e))]
        if static:
            groups.append(("static", a, static, xs[a:e + 1][:, static].mean(0), None))
        dyn = [p for p in range(n) if p not in static]
        for f in range(a, e + 1):
            groups.append(("dynamic", f, dyn, xs[f][dyn], attn[f, dyn].double().numpy()))
    sizes = [len(g[2]) for g in groups]
    if rounding == "official":
        quotas = [math.ceil(m * ratio) if g[0] == "dynamic" else round(m * ratio) for m, g in zip(sizes, groups)]
    else:  # round(r N) in proportion to the sizes: floor of the cumulative share, differenced
        total = min(budget(frames * n, r), sum(sizes))
        cumulative = np.cumsum([0] + sizes)
        quotas = [int(math.floor(total * cumulative[i + 1] / cumulative[-1] + 1e-9))
                  - int(math.floor(total * cumulative[i] / cumulative[-1] + 1e-9)) for i in range(len(sizes))]
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    for (kind, frame, cells, rows, att), quota in zip(groups, quotas):
        quota = min(quota, len(cells))
        if quota == 0:
            continue
        if kind == "static":
            chosen = [(c, rows[i]) for i, c in enumerate(cells)] if quota >= len(cells) else None
            if chosen is None:
                noise = torch.rand(len(cells), generator=gen).double().numpy()
                centres, dist = ref_dpc(rows, quota, min(K, quota), noise)
                chosen = list(zip([cells[c] for c in centres], ref_merge(rows, centres, dist, beta, mode)))
        else:
            dominant = round(quota * (1 - D))
            top = sorted(np.argsort(-att, kind="stable")[:dominant].tolist())
            chosen = [(cells[i], rows[i]) for i in top]
            if quota > dominant:
                rest = [i for i in range(len(cells)) if i not in top]
                sub = rows[rest]
                if quota - dominant >= len(rest):
                    chosen += [(cells[i], rows[i]) for i in rest]
                else:
                    noise = torch.rand(len(rest), generator=gen).double().numpy()
                    c = quota - dominant
                    centres, dist = ref_dpc(sub, c, min(K, c), noise)
                    chosen += list(zip([cells[rest[i]] for i in centres], ref_merge(sub, centres, dist, beta, mode)))
        for cell, row in chosen:
            kept[frame * n + cell] = row
    order = sorted(kept)
    return order, np.stack([kept[i] for i in order]), windows


@functools.lru_cache(maxsize=1)
def scaled_projector_backbone():
    """tiny_llava_onevision with its projector's output x 300 (its own copy, not the shared one): the
    random model's video features lie ~1e-3 apart, so DPC-kNN's densities exp(-dist^2) would all be 1
    up to the 1e-6 tie-break (any float32 / float64 difference would then decide); scaled they lie ~1 apart."""
    bb = sharp.load_backbone("tiny_llava_onevision", attn_implementation="eager")
    with torch.no_grad():
        bb.model.model.multi_modal_projector.linear_2.weight.mul_(300)
        bb.model.model.multi_modal_projector.linear_2.bias.mul_(300)
    return bb


@pytest.mark.parametrize("rounding,D,mode", [("exact", 0.0, "beta"), ("official", 0.5, "mean")])
def test_pre_llm_stage_equals_reference(rounding, D, mode):
    bb = scaled_projector_backbone()
    inputs = structured_video(bb)
    tau, r = 0.8, 0.3
    method = sharp.make_method("holitom", r, llm_layer=None, tau=tau, rounding=rounding,
                               dynamic_cluster_share=D, cluster_merge=mode, positions="original")
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace, torch.no_grad():
        bb.model(**inputs)
    x = layer0_visual_input(bb, inputs)
    attn = eager_vision_attention_ov(bb, inputs)
    order, rows, windows = reference_pre_llm(x, attn, r, tau, rounding, D, mode)
    t = trace.method("holitom")
    assert t.windows[0] == windows and any(e > a for a, e in windows)  # the test video has static windows
    assert trace.stage_layers == [0] and trace.kept[0][0].tolist() == order
    assert trace.visual_tokens_per_layer[0] == len(order)  # layer 0 already sees the reduced sequence
    # the rows the stage wrote, by original visual index
    layer, b, origin, got = recorder.merges[0]
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0].nonzero().squeeze(1)
    index = [int((vis == o).nonzero()) for o in origin.tolist()]
    assert (layer, b) == (0, 0) and index == order
    torch.testing.assert_close(got.double(), torch.from_numpy(rows), atol=1e-4, rtol=1e-5)


def official_order(order, rows, windows, x, tau, D=0.0):
    """The official token order of the pre-LLM output (``holitom/llava_arch.py``, ``holitom``): per
    window [its static tokens, then frame by frame its dynamic tokens], each set in spatial order (with
    D > 0 a frame's dominant tokens before its contextual ones; D = 0 here). ``order``/``rows``: the
    reference's kept ORIGINAL indices (ascending) and rows. Returns the indices in official order."""
    frames, n, _ = x.shape
    xs = x.double().numpy()
    unit = xs / np.linalg.norm(xs, axis=-1, keepdims=True)
    sim = (unit[:-1] * unit[1:]).sum(-1)
    out = []
    for a, e in windows:
        static = {p for p in range(n) if e > a and all(sim[t][p] > tau for t in range(a, e))}
        out += [i for i in order if i // n == a and i % n in static]
        for f in range(a, e + 1):
            out += [i for i in order if i // n == f and i % n not in static]
    assert sorted(out) == list(order)
    return out


def test_compact_positions_put_a_windows_static_tokens_before_its_dynamic_tokens():
    """With compact positions (the official LLM numbers the shorter sequence 0..len-1 in its own order)
    the k kept slots carry the rows in the official order: a window's static tokens first, then its
    dynamic tokens frame by frame. Frames 4-7 of the test video form a window whose static cells are
    the bottom half, so in frame 4 the official order differs from the cell order."""
    bb = scaled_projector_backbone()
    inputs = structured_video(bb)
    tau, r = 0.8, 0.3
    method = sharp.make_method("holitom", r, llm_layer=None, tau=tau, positions="compact")
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace, torch.no_grad():
        bb.model(**inputs)
    x = layer0_visual_input(bb, inputs)
    order, rows, windows = reference_pre_llm(x, eager_vision_attention_ov(bb, inputs), r, tau, "exact", 0.0, "beta")
    assert trace.method("holitom").windows[0] == windows
    assert trace.kept[0][0].tolist() == order  # the same slots (cells) are kept ...
    official = official_order(order, rows, windows, x, tau)
    assert official != order  # (the test video's window 4-7 has static cells after dynamic ones)
    _, _, origin, got = recorder.merges[0]
    assert origin.tolist() == sorted(origin.tolist())  # slot order = sequence order
    by_index = dict(zip(order, rows))
    expected = np.stack([by_index[i] for i in official])  # ... but their rows come in the official order
    torch.testing.assert_close(got.double(), torch.from_numpy(expected), atol=1e-4, rtol=1e-5)
    assert trace.method("holitom").content[0].tolist() == official


# -- (d) the in-LLM stage ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bb_name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("seed,keep,newline_like_video", [  # OV: the newline dropped / kept / kept and absorbing
    (21, 0.5, False), (21, 0.75, False), (3, 0.75, False), (22, 0.5, True)])
def test_in_llm_stage_keeps_top_of_previous_map_and_merges_sequentially(bb_name, seed, keep, newline_like_video):
    """The official in-LLM stage (``holitom/modeling_qwen2.py``) ranks the image SPAN: on LLaVA-OV the
    current visual tokens AND the trailing image_newline (``image_tokens`` counts it), keeps the top
    round(0.5 x span) and merges every other span token, the newline included, into its most similar
    kept one. The engine cannot remove the newline (text): when it is not kept it is still merged
    into its target, and stays in the sequence unchanged."""
    bb = backbone(bb_name)
    inputs = bb.synthetic_inputs(frames=8, seed=seed)
    if newline_like_video and bb.family != "llava_onevision":
        pytest.skip("no image_newline on this backbone")
    if newline_like_video:  # the newline's embedding := the last visual token's, so tokens merge into it
        vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
        last = layer0_input_rows(bb, inputs)[0, vis][-1]
        newline_param = bb.model.model.image_newline
        saved = newline_param.detach().clone()
        with torch.no_grad():
            newline_param.copy_(last)
        try:
            _check_in_llm_stage(bb, inputs, keep, seed, absorbing=True)
        finally:
            with torch.no_grad():
                newline_param.copy_(saved)
        return
    _check_in_llm_stage(bb, inputs, keep, seed, absorbing=False)


def layer0_input_rows(bb, inputs):
    """(b, s, d) the unpruned input of decoder layer 0."""
    seen = {}
    h = bb.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        h.remove()
    return seen["x"]


def _check_in_llm_stage(bb, inputs, keep, seed, absorbing):
    method = sharp.make_method("holitom", 0.5, llm_layer=2, positions="original", llm_keep=keep)
    recorder = Recorder(method)
    pruned_in = {}
    with sharp.prune(bb, method) as trace, torch.no_grad():
        h = bb.layers[2].register_forward_pre_hook(  # after the engine's hook: the stage's output sequence
            lambda m, a, k: pruned_in.update(h=(a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        try:
            bb.model(**inputs)
        finally:
            h.remove()
    pre, post = (k[0] for k in trace.kept)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    s, vis_pos = vis.shape[0], vis.nonzero().squeeze(1)
    has_newline = bb.family == "llava_onevision"
    newline = int(vis_pos[-1]) + 1  # OV: the image_newline follows the last visual placeholder
    if has_newline:
        assert int(inputs["input_ids"][0, newline]) == bb.video_token_id and not bool(vis[newline])
    keys = ~vis.clone()
    keys[vis_pos[pre]] = True
    allowed = ((torch.ones(s, s, dtype=torch.bool).tril() & keys[None, :]) | torch.eye(s, dtype=torch.bool))[None, None]
    _, _, origin0, rows0 = recorder.merges[0]
    seen = {}

    def inject(module, args, kwargs):
        h = args[0].clone()
        h[0, origin0] = rows0.to(h.dtype)
        return (h,) + tuple(args[1:]), kwargs

    hooks = [bb.layers[0].register_forward_pre_hook(inject, with_kwargs=True),
             bb.layers[2].register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0].clone()), with_kwargs=True)]
    try:
        with torch.no_grad(), layer_masks(bb, {layer: allowed for layer in range(bb.num_layers)}):
            att = bb.model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)  # layer 1's map
    finally:
        for h in hooks:
            h.remove()
    span = vis_pos[pre].tolist() + ([newline] if has_newline else [])  # sequence positions, ascending
    k = round(keep * len(span))  # the official round(image_tokens x (1 - HOLITOM_r)) over the span
    top = sorted(torch.topk(att[span], k).indices.tolist())
    kept_span = [span[i] for i in top]
    newline_kept = has_newline and newline in kept_span
    assert torch.equal(post, pre[[i for i in top if i < len(pre)]])
    assert len(post) == k - int(newline_kept)
    assert trace.method("holitom").newline_kept == ([newline_kept] if has_newline else [None])
    # whether the newline is kept is checked above against the independent top-k of layer 1's map, in
    # either outcome; which outcome a case hits depends on the random weights (transformers 4.57 draws an
    # image_newline that is dropped at keep 0.5, 5.x one that is kept). The absorbing case needs it kept
    # (it is, on both lines' weights), so that tokens merge into it.
    if absorbing:
        assert newline_kept
    # the merge, by hand: every dropped span token in index order into its most similar kept one
    rows = {p: seen["h"][0, p].double() for p in span}
    for p in [p for p in span if p not in kept_span]:
        sims = [F.cosine_similarity(rows[p], seen["h"][0, q].double(), dim=0) for q in kept_span]
        target = kept_span[int(torch.stack(sims).argmax())]
        rows[target] = (rows[target] + rows[p]) / 2
    _, _, origin2, rows2 = recorder.merges[1]
    assert torch.equal(origin2, vis_pos[post])
    torch.testing.assert_close(rows2.double(), torch.stack([rows[p] for p in vis_pos[post].tolist()]),
                               atol=1e-5, rtol=1e-5)
    if has_newline:  # the newline row the next layer sees: merged into (kept) or unchanged (dropped)
        after = pruned_in["h"][0, -(s - newline)]  # text after the video is never pruned
        expected = rows[newline] if newline_kept else seen["h"][0, newline].double()
        if absorbing:  # some dropped tokens are merged into the kept newline
            assert not torch.allclose(rows[newline], seen["h"][0, newline].double())
        torch.testing.assert_close(after.double(), expected, atol=1e-5, rtol=1e-5)


# -- (e) budgets, FLOPs, Qwen2-VL, errors ------------------------------------------------------------------
@pytest.mark.parametrize("bb_name,kwargs", [("tiny_llava_onevision", {}),
                                            ("tiny_qwen2_vl", {"positions": "original"})])
def test_exact_budgets_at_each_stage(bb_name, kwargs):
    bb = backbone(bb_name, "sdpa")
    for seed, r, tau in ((1, 0.25, None), (2, 0.5, 0.5), (3, 0.1, 0.3)):
        inputs = bb.synthetic_inputs(frames=8, seed=seed, batch_size=2)
        n = bb.layout(inputs).n_visual
        method = sharp.make_method("holitom", r, llm_layer=2, tau=tau, **kwargs)
        with sharp.prune(bb, method) as trace, torch.no_grad():
            bb.model(**inputs)
        t = trace.method("holitom")
        newline = bb.family == "llava_onevision"  # the in-LLM span: the kept tokens and OV's newline
        assert all((kept is None) != newline for kept in t.newline_kept)
        for b in range(2):
            before = min(budget(n, r), n - int(t.reduced[b]))  # N - R when static merging left fewer
            span = round(0.5 * (before + int(newline)))
            assert len(trace.kept[0][b]) == before and len(trace.kept[1][b]) == span - int(bool(t.newline_kept[b]))
        expected = [len(trace.kept[0][0])] * 2 + [len(trace.kept[1][0])] * 2
        assert trace.visual_tokens_per_layer == expected
        # the nominal schedule is the measured one when static merging left the budget and the newline
        # (OV) was merged away
        if all(n - red >= budget(n, r) for red in t.reduced) and not t.newline_kept[0]:
            assert expected == method.token_schedule(n, bb.num_layers, backbone=bb)
        composed = sharp.make_method("holitom_sharp", r, holitom={"tau": tau, **kwargs},
                                     sharp={"layer": 2, "cache_dir": ""})
        with sharp.prune(bb, composed) as trace, torch.no_grad():
            bb.model(**inputs)
        pre = len(trace.kept[0][0])
        assert trace.stage_owners == ["holitom", "sharp"] and trace.stage_layers == [0, 2]
        assert trace.visual_tokens_per_layer == [pre] * 2 + [min(budget(n, 0.075), pre)] * 2
        assert all(len(k) == min(budget(n, 0.075), len(p)) for k, p in zip(trace.kept[1], trace.kept[0]))


def test_table3_tflops():
    """15 % before the LLM (941 of 6272), half of the official span (471) from layer 18: 4.18 TFLOPs
    (4.27 from layer 19) against Table 3's 4.3; holitom_sharp (ShaRP before layer 18 at 7.5 %, 470) the
    same to 0.01; the official rounding (Table 3's sweep): 960 / 480, 4.27."""
    n = 6272
    dims = flops.lm_dims("llava_onevision_7b")
    d, m = dims.hidden, dims.ffn

    def paper(schedule):
        return sum(4 * k * d * d + 2 * k * k * d + 2 * k * d * m for k in schedule) / 1e12

    for layer, value in ((18, 4.18), (19, 4.27)):
        # in the LLM: round(0.5 x 942) = 471 of the official span (941 tokens + OV's newline, merged away)
        schedule = [941] * layer + [471] * (dims.num_layers - layer)
        got = flops.prefill_tflops("llava_onevision_7b", "holitom", 0.15, visual_tokens=n, llm_layer=layer)
        assert got == pytest.approx(paper(schedule), rel=1e-12) and round(got, 2) == value
        combo = flops.prefill_tflops("llava_onevision_7b", "holitom_sharp", 0.15, visual_tokens=n,
                                     sharp={"layer": layer})  # ShaRP: 7.5 % of the ORIGINAL count, 470
        assert combo == pytest.approx(paper([941] * layer + [470] * (dims.num_layers - layer)), rel=1e-12)
        assert abs(got - 4.3) / 4.3 < 0.05 and abs(combo - 4.3) / 4.3 < 0.05
    default = flops.prefill_tflops("llava_onevision_7b", "holitom", 0.15)
    combo = flops.prefill_tflops("llava_onevision_7b", "holitom_sharp", 0.15)
    assert default == pytest.approx(4.18, abs=0.005) and combo == pytest.approx(4.18, abs=0.005)
    # Table 3's cells (rounding="official"): 960 before the LLM, round(961 / 2) = 480 inside it
    official = flops.prefill_tflops("llava_onevision_7b", "holitom", 0.15, visual_tokens=n, rounding="official")
    assert official == pytest.approx(paper([960] * 18 + [480] * 10), rel=1e-12) and round(official, 2) == 4.27


def table3_method(name):
    """The method of Table 3's sweep cell ``name`` (configs/sweep/table3.yaml), as the harness makes it;
    HoliTom itself (the first child of holitom_sharp)."""
    from sharp.harness.config import cell_from_cfg, cell_overrides, compose, load_sweep

    sweep = load_sweep("table3")
    index = [c["method"] for c in sweep["cells"]].index(name)
    cell = cell_from_cfg(compose(cell_overrides(sweep, index)))
    method = sharp.make_method(cell.method, cell.retention, **cell.method_kwargs)
    return method.flat_children()[0] if name == "holitom_sharp" else method


def official_counts(frames, n, r, tau_windows):
    """The official code's counts on one video, written from ``holitom/llava_arch.py`` and
    ``holitom/modeling_qwen2.py``: windows [(a, e, #static)] -> R = sum (e - a) #static;
    r' = min(r / ((N - R) / N), 1); per window round(#static r') static tokens (``merge_tokens_by_density``)
    and per frame ceil(#dynamic r') dynamic ones (``merge_tokens_by_attention_density``); inside the LLM,
    round(0.5 x (kept + 1)) of the span (the kept tokens and OV's trailing newline)."""
    total = frames * n
    reduced = sum((e - a) * m for a, e, m in tau_windows)
    ratio = min(r / ((total - reduced) / total), 1)
    before = sum(round(m * ratio) + (e - a + 1) * math.ceil((n - m) * ratio) for a, e, m in tau_windows)
    return before, round(0.5 * (before + 1))


@pytest.mark.parametrize("name", ["holitom", "holitom_sharp"])
def test_table3_cells_keep_the_official_counts(name):
    """Table 3's HoliTom cells at the 7B layout (32 frames x 196): frames 0-15 share cells 0-97 (one
    static window), every other token random. The sweep cell's method keeps the official count."""
    method = table3_method(name)
    frames, n, static = 32, 196, 98
    g = torch.Generator().manual_seed(0)
    x = torch.randn(frames, n, 64, generator=g)
    x[1:16, :static] = x[0, :static]
    attention = torch.rand(frames, n, generator=g)
    kept, _, info = method.plan_sample(x, attention, frames * n)
    windows = [(0, 15)] + [(f, f) for f in range(16, 32)]
    assert info["windows"] == windows
    before, _ = official_counts(frames, n, 0.15, [(0, 15, static)] + [(f, f, 0) for f in range(16, 32)])
    assert len(kept) == before == 19 + 16 * 20 + 16 * 39  # r' = 0.1959: 19 static, 20 and 39 per frame
    # no static window: 32 x ceil(196 x 0.15) = 960, then round(961 / 2) = 480 from layer 18 (nominal schedule)
    before, inside = official_counts(frames, n, 0.15, [(f, f, 0) for f in range(frames)])
    assert (before, inside) == (960, 480)
    schedule = flops.token_schedule("llava_onevision_7b", name, 0.15, visual_tokens=frames * n,
                                    **({"rounding": "official"} if name == "holitom" else
                                       {"holitom": {"rounding": "official"}}))
    assert schedule[:18] == [before] * 18
    if name == "holitom":
        assert method.token_schedule(frames * n, 28, "llava_onevision_7b") == [before] * 18 + [inside] * 10


def test_qwen2_vl_windows_are_temporal_patches():
    bb = backbone("tiny_qwen2_vl")
    inputs = structured_video(bb)  # 8 frames -> 4 temporal patches of 2 frames
    layout = bb.layout(inputs)
    with sharp.prune(bb, "holitom", 0.5, llm_layer=None, tau=0.8, positions="original") as trace, torch.no_grad():
        bb.model(**inputs)
    windows = trace.method("holitom").windows[0]
    assert sorted(f for a, e in windows for f in range(a, e + 1)) == list(range(layout.frames))  # patches
    x = layer0_visual_input(bb, inputs)
    sim = H.consecutive_similarity(x)
    expected, _ = H.segment_windows(sim, 0.8)
    assert windows == expected
    kept = trace.kept[0][0]
    frames = kept // layout.tokens_per_frame
    for a, e in windows:  # a window's static tokens sit in its first temporal patch
        static = H.static_mask(sim, (a, e), 0.8)
        later = kept[(frames > a) & (frames <= e)] % layout.tokens_per_frame
        assert not bool(static[later].any())
    with pytest.raises(ValueError, match="compact"):
        with sharp.prune(bb, "holitom", 0.5, llm_layer=2, positions="compact"), torch.no_grad():
            bb.model(**inputs)


def test_bad_values_fail_before_any_forward():
    bb = backbone("tiny_llava_onevision", "sdpa")
    with pytest.raises(ValueError, match="rounding must be one of 'exact', 'official', got 'floor'"):
        sharp.make_method("holitom", 0.15, rounding="floor")
    with pytest.raises(ValueError, match="cluster_merge must be one of 'beta', 'mean'"):
        sharp.make_method("holitom", 0.15, cluster_merge="max")
    with pytest.raises(ValueError, match="llm_keep must be in"):
        sharp.make_method("holitom", 0.15, llm_keep=0.0)
    with pytest.raises(ValueError, match=r"llm_layer must be in 1\.\.3"):
        with sharp.prune(bb, "holitom", 0.15, llm_layer=18):  # an explicit 18 does not exist in 4 layers
            pass
    with pytest.raises(TypeError, match="per-child"):
        sharp.make_method("holitom_sharp", 0.15, llm_layer=2)
    combo = sharp.make_method("holitom_sharp", 0.15, holitom={"seed": 3})
    hol, shp = combo.flat_children()
    assert (hol.llm_layer, hol.seed, hol.retention, shp.layer, shp.retention) == (None, 3, 0.15, 18, 0.075)
    inputs = bb.synthetic_inputs(frames=8, seed=4)
    with pytest.raises(ValueError, match="needs every visual token.*compose holitom first"):
        with sharp.prune(bb, "holitom+holitom", 0.25, **{"holitom@1": {"llm_layer": None},
                                                         "holitom@2": {"llm_layer": None}}), torch.no_grad():
            bb.model(**inputs)


# -- (f) mixed positions in holitom_sharp --------------------------------------------------------------------
def test_holitom_sharp_compact_then_original_positions_decode(monkeypatch):
    """HoliTom compacts (the LLM sees the shorter sequence 0..len-1), ShaRP keeps the positions it
    finds (as the official in-LLM stage keeps its kept tokens' positions): every layer's positions are
    those of the sequence after the pre-LLM stage."""
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=13, batch_size=2)
    method = sharp.make_method("holitom_sharp", 0.25, sharp={"layer": 2, "cache_dir": ""})
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    keys = engine_reference.trace_key_masks(bb, inputs, seq, trace)
    b, s = seq.shape
    prompt = inputs["attention_mask"]
    mask2d = torch.cat([prompt, prompt.new_ones(b, s - prompt.shape[1])], 1)
    after_pre = keys[0] & mask2d.bool()
    positions = {layer: (after_pre.long().cumsum(-1) - 1).clamp_min(0) for layer in range(bb.num_layers)}
    original = engine_reference.layer_masks
    monkeypatch.setattr(engine_reference, "layer_masks",
                        lambda bb_, allowed, _positions=None: original(bb_, allowed, positions))
    ref = replay_reference_logits(bb, inputs, seq, trace, recorder)
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: s - 1], atol=2e-4, rtol=1e-4)
    # re-numbering again after ShaRP's stage (what a compacting second stage would do) is another model
    monkeypatch.setattr(engine_reference, "layer_masks", original)
    recompacted = replay_reference_logits(bb, inputs, seq, trace, recorder, compact_layers=range(bb.num_layers))
    assert not torch.allclose(logits, recompacted[:, p - 1: s - 1], atol=2e-4, rtol=1e-4)


# -- (g) the vectorised pre-LLM stage against the loops it replaced --------------------------------------------
def official_similarity(x):
    """The official s_t(p): F.normalize, then the product of consecutive frames summed over d."""
    unit = F.normalize(x.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


@pytest.mark.parametrize("threads", [1, 2])
def test_consecutive_similarity_is_the_official_formula_bit_for_bit(threads):
    """The frame-by-frame CPU computation gives the same float32 bits as the whole-video formula (so
    every s > tau decision, near-ties included, is the official one): shapes, scales, zero rows (the
    norm's clamp), bf16 and non-contiguous inputs, one frame, one token per frame."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for frames, n, d in [(1, 5, 8), (2, 1, 64), (3, 2, 1), (8, 16, 64), (5, 49, 1024), (9, 7, 100), (4, 70, 33)]:
            for scale in (1e-3, 1.0, 300.0):
                x = torch.randn(frames, n, d, generator=g) * scale
                x[frames // 2, n // 2] = 0.0  # a zero row: the clamp of the norm
                x[-1, 0] = x[0, 0]  # an exact repeat
                for case in (x, x.bfloat16(), x.transpose(0, 1).contiguous().transpose(0, 1)):
                    got = H.consecutive_similarity(case)
                    assert got.dtype == torch.float32 and got.shape == (frames - 1, n)
                    assert torch.equal(got, official_similarity(case)), (frames, n, d, scale, case.dtype)
    finally:
        torch.set_num_threads(saved)


def loop_segmentation(sim, tau, max_window):
    """The official DP loop (counts by cumulative products, candidates tried from the shortest window,
    a candidate replaces the best only when strictly larger)."""
    frames = sim.shape[0] + 1
    above = (sim > tau).int()
    counts = [[0.0] * frames for _ in range(frames)]
    for a in range(frames - 1):
        for t, m in enumerate(torch.cumprod(above[a:], dim=0).sum(dim=1).tolist()):
            counts[a][a + 1 + t] = float((t + 1) * m)
    best, start = [0.0] * frames, [0] * frames
    for i in range(frames):
        value, first = (best[i - 1] if i > 0 else 0.0), i
        for w in range(2, min(i + 1, max_window) + 1):
            candidate = (best[i - w] if i - w >= 0 else 0.0) + counts[i - w + 1][i]
            if candidate > value:
                value, first = candidate, i - w + 1
        best[i], start[i] = value, first
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[-1], counts


def test_segmentation_equals_the_official_loop_ties_included(monkeypatch):
    """Windows and R (a float) equal the official loop's on many small inputs whose similarities take
    few values (many equal counts: ties between windows), NaN included, every max_window; the counts
    are the official ones, also when computed in several blocks of window starts."""
    g = np.random.default_rng(0)
    for case in range(400):
        frames, n = int(g.integers(1, 11)), int(g.integers(1, 6))
        sim = torch.tensor(g.choice([0.1, 0.5, 0.79, 0.8, 0.81, 0.95, np.nan], size=(frames - 1, n)),
                           dtype=torch.float32)
        tau = float(g.choice([0.5, 0.8]))
        if case == 200:
            monkeypatch.setattr(H, "_COMPARISONS", 5)  # from here on, the counts in blocks of window starts
        windows, value, counts = loop_segmentation(sim, tau, 1024)
        assert H.static_counts(H.nonstatic_steps(sim, tau)) == counts
        for max_window in (1, 2, 3, 1024):
            expected = loop_segmentation(sim, tau, max_window)
            got = H.segment_windows(sim, tau, max_window)
            assert got == expected[:2] and type(got[1]) is float


def test_frame_static_masks_equal_static_mask_window_by_window():
    g = np.random.default_rng(1)
    for _ in range(200):
        frames, n = int(g.integers(1, 10)), int(g.integers(1, 7))
        sim = torch.tensor(g.choice([0.2, 0.8, 0.9, np.nan], size=(frames - 1, n)), dtype=torch.float32)
        cuts = sorted(set(g.integers(1, frames + 1, size=3).tolist()) | {frames})
        windows = [(a, e - 1) for a, e in zip([0] + cuts[:-1], cuts)]
        first, last = H.frame_windows(windows)
        assert first == [a for a, e in windows for _ in range(a, e + 1)]
        assert last == [e for a, e in windows for _ in range(a, e + 1)]
        masks = H.frame_static_masks(H.nonstatic_steps(sim, 0.85), first, last)
        expected = torch.stack([H.static_mask(sim, (a, e), 0.85) for a, e in windows for _ in range(a, e + 1)])
        assert torch.equal(masks, expected)


def test_grouped_top_k_equals_one_top_k_per_row_ties_included():
    """One torch.topk per (size, k) bucket picks, row by row, the positions one call per row picks,
    on scores with many equal values (the tie-break is torch.topk's, unchanged)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows, n = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        scores = torch.randint(0, 3, (rows, n), generator=g).float()  # ~n / 3 ties per value
        sizes = [int(torch.randint(1, n + 1, (1,), generator=g)) if bool(torch.rand(1, generator=g) < 0.3) else n
                 for _ in range(rows)]
        ks = [int(torch.randint(0, m + 1, (1,), generator=g)) for m in sizes]
        got = {}
        for members, top in H.grouped_top_k(scores, sizes, ks):
            assert top.shape == (len(members), ks[int(members[0])])
            got.update({r: t for r, t in zip(members.tolist(), top)})
        assert sorted(got) == [r for r in range(rows) if ks[r] > 0]
        for r, top in got.items():
            assert torch.equal(top, torch.topk(scores[r, :sizes[r]].clone(), ks[r]).indices.sort().values)


def per_group_plan(method, x, attention, n_visual, official_order):
    """The pre-LLM stage of one video group by group, as baselines/holitom.py computed it before its
    vectorisation: a static mask per window, each group's rows copied, one top-k and DPC run per group
    (the noise drawn in group order), the rows concatenated in the official order."""
    frames, n, _ = x.shape
    tau = method.threshold
    sim = official_similarity(x)
    windows, reduced, _ = loop_segmentation(sim, tau, method.max_window)
    ratio = H.rescaled_ratio(method.retention, frames * n, reduced)
    cells = torch.arange(n)
    groups = []  # (kind, frame, cells, rows, attention)
    for a, e in windows:
        static = H.static_mask(sim, (a, e), tau)
        if bool(static.any()):
            groups.append(("static", a, cells[static], x[a:e + 1, static].float().mean(dim=0), None))
        for f in range(a, e + 1):
            groups.append(("dynamic", f, cells[~static], x[f, ~static].float(), attention[f, ~static]))
    sizes = [len(group[2]) for group in groups]
    total = min(budget(n_visual, method.retention), sum(sizes))
    quotas = H.group_quotas(sizes, [group[0] for group in groups], ratio, total, method.rounding)
    generator = torch.Generator().manual_seed(method.seed)

    def clusters(c, rows, k):
        if k >= len(c):
            return c, rows, False
        centres, dist = H.dpc_knn_centres(rows, k, min(method.knn_k, k), generator)
        return c[centres], H.merge_into_centres(rows, centres, dist, method.beta, method.cluster_merge), True

    index, out, merged = [], [], []
    for (kind, f, c, rows, att), quota in zip(groups, quotas):
        if quota <= 0:
            continue
        if kind == "static":
            kept_cells, kept_rows, _ = clusters(c, rows, quota)
            pieces = [(kept_cells, kept_rows, True)]
        else:
            dominant = round(quota * (1 - method.dynamic_cluster_share))
            top = torch.topk(att, dominant).indices.sort().values if dominant > 0 else c[:0]
            pieces = [(c[top], rows[top], False)]
            if quota > dominant:
                rest = torch.ones(len(c), dtype=torch.bool)
                rest[top] = False
                pieces.append(clusters(c[rest], rows[rest], quota - dominant))
        for kept_cells, kept_rows, is_merged in pieces:
            index.append(f * n + kept_cells)
            out.append(kept_rows)
            merged.append(torch.full((len(kept_cells),), is_merged))
    index, out, merged = torch.cat(index), torch.cat(out), torch.cat(merged)
    info = {"windows": windows, "reduced": reduced, "ratio": ratio}
    if official_order:
        return index.sort().values, out, {**info, "content": index, "merged": merged}
    order = torch.argsort(index)
    return index[order], out[order], {**info, "content": index[order], "merged": merged[order]}


def random_video(g, frames, n, d, dtype):
    """Random rows with static windows planted (cells repeated over runs of frames, some with a small
    drift) and an attention with many ties."""
    x = torch.randn(frames, n, d, generator=g)
    for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
        a = int(torch.randint(0, frames, (1,), generator=g))
        e = min(frames - 1, a + int(torch.randint(1, 5, (1,), generator=g)))
        cells = torch.rand(n, generator=g) < 0.6
        drift = 0.3 * torch.randn(e - a, int(cells.sum()), d, generator=g) * float(torch.rand(1, generator=g))
        x[a + 1:e + 1, cells] = x[a, cells] + drift
    attention = torch.randint(0, 5, (frames, n), generator=g).float()
    return x.to(dtype), attention


@pytest.mark.parametrize("kwargs", [
    {"retention": 0.25},
    {"retention": 0.1, "rounding": "official"},
    {"retention": 0.5, "dynamic_cluster_share": 0.5, "cluster_merge": "mean", "knn_k": 3},
    {"retention": 0.3, "dynamic_cluster_share": 1.0, "max_window": 3, "seed": 4},
    {"retention": 0.2, "tau": 0.5, "rounding": "official", "dynamic_cluster_share": 0.3},
])
def test_plan_sample_equals_the_per_group_loop_bit_for_bit(kwargs):
    """Kept slots, rows (torch.equal), the official order (content), the merged flags, windows, R and
    r' of random videos with planted static windows and tied attention, both token orders."""
    kwargs = dict(kwargs)
    retention = kwargs.pop("retention")
    method = sharp.make_method("holitom", retention, llm_layer=None, positions="original", **kwargs)
    g = torch.Generator().manual_seed(len(kwargs))
    statics = 0
    for case in range(16):
        frames, n = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 20, (1,), generator=g))
        x, attention = random_video(g, frames, n, 8, torch.bfloat16 if case % 4 == 3 else torch.float32)
        for official in (False, True):
            kept, rows, info = method.plan_sample(x, attention, frames * n, official_order=official)
            ref_kept, ref_rows, ref_info = per_group_plan(method, x, attention, frames * n, official)
            assert torch.equal(kept, ref_kept) and torch.equal(rows, ref_rows) and rows.dtype == torch.float32
            assert info.keys() == ref_info.keys()
            for key in ("content", "merged"):
                assert torch.equal(info[key], ref_info[key]), key
            assert (info["windows"], info["reduced"], info["ratio"]) == \
                (ref_info["windows"], ref_info["reduced"], ref_info["ratio"])
        statics += any(e > a for a, e in info["windows"])
    assert statics >= 4  # the cases do have static windows


def test_pre_llm_stage_copies_the_hidden_states_only_when_a_row_changes():
    """No static window and D = 0: every kept row is its token's own row, the stage returns its input
    (no copy). It returns a copy with the new rows when static windows are merged, and when the
    official order moves unmerged rows to other slots (D = 0.5 at r = 1: a frame's dominant half, then
    the rest, all kept). The input is never written in place."""
    bb = scaled_projector_backbone()
    random_video = bb.synthetic_inputs(frames=8, seed=3, batch_size=2)
    seen = []
    for inputs, r, kwargs in ((random_video, 0.3, {"tau": 0.99}), (structured_video(bb), 0.3, {"tau": 0.8}),
                              (random_video, 1.0, {"tau": 0.99, "dynamic_cluster_share": 0.5})):
        method = sharp.make_method("holitom", r, llm_layer=None, positions="compact", **kwargs)
        select = method.select

        def recording(ctx, select=select):
            before = ctx.hidden_states.clone()
            selection = select(ctx)
            assert torch.equal(ctx.hidden_states, before)  # not written in place
            seen.append((selection.hidden_states is ctx.hidden_states, ctx.trace))
            return selection

        object.__setattr__(method, "select", recording)
        with sharp.prune(bb, method), torch.no_grad():
            bb.model(**inputs)
    assert [same for same, _ in seen] == [True, False, False]
    static_windows = [any(e > a for a, e in windows) for _, t in seen for windows in t.windows]
    assert static_windows == [False, False, True, False, False]
    content, kept = seen[2][1].content[0], seen[2][1].kept_before_llm[0]
    assert kept == len(content) and not torch.equal(content, content.sort().values)  # rows moved
