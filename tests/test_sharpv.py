"""SharpV (baselines/sharpv.py): spatio-temporal dissimilarity before the LLM, KV drop of degraded layers."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import sharp
from sharp.engine import StageContext, compat
from sharp.methods import budget
from baselines.sharpv import adaptive_ratios, frame_scores, keep_top_per_frame
from sharp import split_budget
from sharp.engine.decode import non_visual_entries

from engine_reference import generate_with_logits, kept_key_mask, layer_masks
from conftest import shared_backbone

BACKBONES = ["tiny_llava_onevision", "tiny_qwen2_vl"]


def backbone(name, impl="eager"):
    return shared_backbone(name, impl)


# -- hand-made frame stack ---------------------------------------------------------------------
# 3 frames of a 2 x 2 grid, d = 2; frame 1 differs from frame 0 in cell 0 only, frame 2 = frame 1.
HAND_X = torch.tensor([[1., 0.], [1., 0.], [1., 0.], [0., 1.],    # frame 0: mean (3, 1)/4
                       [0., 1.], [1., 0.], [1., 0.], [0., 1.],    # frame 1: mean (1, 1)/2
                       [0., 1.], [1., 0.], [1., 0.], [0., 1.]])   # frame 2 = frame 1
HAND_FRAME = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
HAND_CELL = torch.tensor([0, 1, 2, 3] * 3)
# by hand: Dissim(a, b) = sqrt(2 - 2 cos(a, b))
S0_A = math.sqrt(2 - 2 * 3 / math.sqrt(10))  # (1, 0) against (3, 1): 0.32036
S0_B = math.sqrt(2 - 2 * 1 / math.sqrt(10))  # (0, 1) against (3, 1): 1.16942
S1 = math.sqrt(2 - 2 / math.sqrt(2))  # any axis against (1, 1): 0.76537
HAND_S = [S0_A, S0_A, S0_A, S0_B] + [S1] * 8
HAND_T = [S0_A, S0_A, S0_A, S0_B] + [math.sqrt(2), 0, 0, 0] + [0, 0, 0, 0]  # frame 0: T := S
R0 = math.sqrt(3 * S0_A ** 2 + S0_B ** 2) / (2 * 2)  # ||T_0|| / (2 sqrt 4) = 0.32360
R1 = math.sqrt(2) / 4  # 0.35355
HAND_R = [R0, R1, 0.0]


def test_scores_equal_hand_computation():
    scores = frame_scores(HAND_X, HAND_FRAME, HAND_CELL, 4, w=1.0)
    assert scores.rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    torch.testing.assert_close(scores.per_token(scores.spatial), torch.tensor(HAND_S), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.per_token(scores.temporal), torch.tensor(HAND_T), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.per_token(scores.importance), torch.tensor(HAND_T) + torch.tensor(HAND_S),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(adaptive_ratios(scores), torch.tensor(HAND_R), atol=1e-6, rtol=0)
    half = frame_scores(HAND_X, HAND_FRAME, HAND_CELL, 4, w=0.5)
    torch.testing.assert_close(half.per_token(half.importance), torch.tensor(HAND_T) + 0.5 * torch.tensor(HAND_S),
                               atol=1e-6, rtol=0)
    # a frame's scale does not matter (Dissim compares directions; the frame mean scales with it)
    scale = torch.tensor([1.0] * 4 + [3.0] * 4 + [0.5] * 4)[:, None]
    scaled = frame_scores(HAND_X * scale, HAND_FRAME, HAND_CELL, 4, w=1.0)
    torch.testing.assert_close(scaled.importance, scores.importance, atol=1e-6, rtol=0)


def test_missing_cells_fall_back_to_the_spatial_score():
    # frame 1 without cells 0 and 3, frame 2 without cell 1 (as after another pruning method)
    keep = [0, 1, 2, 3, 5, 6, 8, 10, 11]
    scores = frame_scores(HAND_X[keep], HAND_FRAME[keep], HAND_CELL[keep], 4, w=1.0)
    assert scores.rows.tolist() == [[0, 1, 2, 3], [-1, 4, 5, -1], [6, -1, 7, 8]]
    s1 = 0.0  # frame 1 = two (1, 0) tokens: both equal their mean
    # frame 2 = (0, 1), (1, 0), (0, 1) in cells 0, 2, 3: mean (1, 2) / 3
    s01, s10 = math.sqrt(2 - 2 * 2 / math.sqrt(5)), math.sqrt(2 - 2 * 1 / math.sqrt(5))
    expected_s = [S0_A, S0_A, S0_A, S0_B, s1, s1, s01, s10, s01]
    expected_t = [S0_A, S0_A, S0_A, S0_B, 0.0, 0.0, s01, 0.0, s01]  # frame 2 cells 0, 3: not in frame 1 -> S
    torch.testing.assert_close(scores.per_token(scores.spatial), torch.tensor(expected_s), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.per_token(scores.temporal), torch.tensor(expected_t), atol=1e-6, rtol=0)
    # r_t over the PRESENT tokens only: frame 2 has 3 tokens
    r2 = math.sqrt(2 * s01 ** 2) / (2 * math.sqrt(3))
    torch.testing.assert_close(adaptive_ratios(scores), torch.tensor([R0, 0.0, r2]), atol=1e-6, rtol=0)


def hand_keep(rule, w, mode="adaptive", k_fixed=0, x=HAND_X):
    m = sharp.make_method("sharpv", 0.5, mode=mode, adaptive_rule=rule, w=w)
    scores = frame_scores(x, HAND_FRAME, HAND_CELL, 4, w=w)
    kept = keep_top_per_frame(scores, m.frame_budgets(scores, adaptive_ratios(scores), k_fixed)).tolist()
    return [sorted(i for i in kept if HAND_FRAME[i] == t) for t in range(3)]


def test_kept_count_per_frame_follows_the_threshold():
    # ratio rule: round(r_t x 4) = round(1.29), round(1.41), 0 -> the top-I token of frames 0 and 1
    assert hand_keep("ratio", 1.0) == [[3], [4], []]
    # threshold rule, w = 1: every I = T + S exceeds r_t (frame 2: r = 0) -> all kept
    assert hand_keep("threshold", 1.0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # threshold rule, w = 0 (I = T): frame 0 S = 0.3204 < r_0 = 0.3236 < 1.169; frame 1 only sqrt 2
    # exceeds r_1; frame 2: T = 0 is not > 0
    assert hand_keep("threshold", 0.0) == [[3], [4], []]
    # fixed mode: 6 of 12 -> 2 per frame, the top-2 by I (ties in the order of the cells)
    assert hand_keep("ratio", 1.0, mode="fixed", k_fixed=6) == [[0, 3], [4, 5], [8, 9]]
    assert hand_keep("ratio", 1.0, mode="fixed", k_fixed=5) == [[0, 3], [4, 5], [8]]


def test_static_video_keeps_one_token():
    static = HAND_X[:4].repeat(3, 1)  # three identical frames: T = 0 after frame 0
    assert hand_keep("ratio", 1.0, x=static) == [[3], [], []]
    # nothing anywhere (every token equals its frame mean and its predecessor): still one token
    assert sum(len(k) for k in hand_keep("ratio", 1.0, x=torch.ones(12, 2))) == 1


def test_k_scales_the_adaptive_ratio_and_changes_the_selection():
    # Fig. 5's K: r_t = ||T_t||_2 / (K sqrt(f)); the summary's value K = 2 is the default
    scores = frame_scores(HAND_X, HAND_FRAME, HAND_CELL, 4, w=1.0)
    torch.testing.assert_close(adaptive_ratios(scores, k_scale=2.0), torch.tensor(HAND_R), atol=1e-6, rtol=0)
    # K = 1 doubles r_t: 0.6472, 0.7071, 0 -> round(2.59) = 3, round(2.83) = 3, 0 tokens
    torch.testing.assert_close(adaptive_ratios(scores, k_scale=1.0), 2 * torch.tensor(HAND_R), atol=1e-6, rtol=0)
    default = sharp.make_method("sharpv", 0.5)
    assert default.K == 2.0
    m = sharp.make_method("sharpv", 0.5, K=1.0)
    kept = keep_top_per_frame(scores, m.frame_budgets(scores, m.frame_ratios(scores), 0)).tolist()
    # frame 0: I = 2 S (T := S): the three 0.3204 tokens tie below 1.169 -> cells 3, 0, 1;
    # frame 1: I = T + S = sqrt 2 + S1 for cell 0, S1 for the others -> cells 0, 1, 2
    assert sorted(kept) == [0, 1, 3, 4, 5, 6]
    assert sorted(kept) != sorted(sum(hand_keep("ratio", 1.0), []))  # K changes the selection
    # K = 4 halves r_t: round(0.65) = 1, round(0.71) = 1 -> the same top-1 here; K = 8: none, then one kept
    m8 = sharp.make_method("sharpv", 0.5, K=8.0)
    assert int(m8.frame_budgets(scores, m8.frame_ratios(scores), 0).sum()) == 1


def test_f_as_frames_reads_the_frame_count():
    # adaptive_f="frames": r_t = ||T_t||_2 / (K sqrt(F)), F = 3 frames here (n_t = 4 tokens)
    scores = frame_scores(HAND_X, HAND_FRAME, HAND_CELL, 4, w=1.0)
    expected = torch.tensor(HAND_R) * math.sqrt(4 / 3)  # 0.3737, 0.4082, 0
    torch.testing.assert_close(adaptive_ratios(scores, f="frames"), expected, atol=1e-6, rtol=0)
    m = sharp.make_method("sharpv", 0.5, adaptive_f="frames")
    k = m.frame_budgets(scores, m.frame_ratios(scores), 0)
    assert k.tolist() == [round(0.3737 * 4), round(0.4082 * 4), 0] == [1, 2, 0]
    kept = keep_top_per_frame(scores, k).tolist()
    assert sorted(kept) == [3, 4, 5]  # frame 1: sqrt 2 + S1 (cell 0), then the first S1 tie (cell 1)


@pytest.mark.parametrize("name", BACKBONES)
def test_k_and_f_change_the_selection_through_the_engine(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=3)
    counts = {}
    for kw in ({}, {"K": 4.0}, {"adaptive_f": "frames"}):
        with sharp.prune(bb, "sharpv", memory_threshold=0.0, **kw) as trace, torch.no_grad():
            bb.model(**inputs)
        counts[tuple(kw)] = trace.visual_tokens_per_layer[0]  # kept by the stage (all: no kept list)
    assert counts[("K",)] < counts[()]  # K = 4 halves every r_t
    layout = bb.layout(inputs)
    if layout.tokens_per_frame != layout.frames:  # sqrt(n_t / F) != 1
        assert counts[("adaptive_f",)] != counts[()]


def test_split_budget_by_hand():
    assert split_budget(6, [4, 4, 4], rule="largest_remainder") == [2, 2, 2]
    assert split_budget(5, [4, 4, 4], rule="largest_remainder") == [2, 2, 1]  # ties go to the earlier frames
    assert split_budget(3, [4, 2], rule="largest_remainder") == [2, 1]
    assert split_budget(4, [3, 1, 2], rule="largest_remainder") == [2, 1, 1]  # 2, 0.67, 1.33: the remainder to the 0.67
    assert split_budget(6, [3, 1, 2], rule="largest_remainder") == [3, 1, 2]


def test_non_visual_entries_by_hand():
    # sample 0: [pad, t, v, v, t], sample 1: [t, t, v, t, t] -> 2 and 4 real text entries
    vis = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    pad = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert non_visual_entries(vis, pad) is None  # sample 0 has one padding entry, needs two
    pad2 = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # sample 0: [pad, pad, v, v, t]
    vis2 = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    keep = non_visual_entries(vis2, pad2)
    assert [k.tolist() for k in keep] == [[0, 1, 4], [0, 3, 4]]


# -- through the engine: an independent brute-force selection ------------------------------------
def layer_inputs(bb, inputs):
    """Vanilla run: every decoder layer's input (b, s, d)."""
    got = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: got.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach().clone()),
        with_kwargs=True) for i, layer in enumerate(bb.layers)]
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


def brute_force_keep(x, layout, mode, retention, w=1.0):
    """SharpV's selection with plain loops: x (N_vis, d) one sample's visual embeddings."""
    f, n = layout.frames, layout.tokens_per_frame

    def dissim(a, b):
        cos = float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))
        return math.sqrt(max(0.0, 2 - 2 * cos))

    kept = []
    k_total = budget(f * n, retention)
    for t in range(f):
        rows = x[t * n:(t + 1) * n]
        mean = rows.mean(0)
        s = [dissim(rows[i], mean) for i in range(n)]
        tt = s if t == 0 else [dissim(rows[i], x[(t - 1) * n + i]) for i in range(n)]
        imp = [a + w * b for a, b in zip(tt, s)]
        if mode == "adaptive":
            k = round(math.sqrt(sum(v * v for v in tt)) / (2 * math.sqrt(n)) * n)
        else:
            k = k_total // f + (1 if t < k_total % f else 0)
        order = sorted(range(n), key=lambda i: -imp[i])
        kept += [t * n + i for i in order[:k]]
    return sorted(kept)


def two_videos(bb, static_first: bool, seed=5):
    """Left-padded batch of 2 (the second question is longer) with DIFFERENT videos: a random one and
    a static one (one random frame repeated), in the order asked."""
    g = np.random.default_rng(seed)
    h, w = bb.synthetic_frame_size()
    moving = g.integers(0, 256, size=(8, h, w, 3), dtype=np.uint8)
    static = np.repeat(moving[:1], 8, axis=0)
    questions = ["What happens?", "What happens? Answer briefly. Answer briefly."]
    videos = [static, moving] if static_first else [moving, static]
    a, b = bb.pixels_to_inputs(videos[0], questions), bb.pixels_to_inputs(videos[1], questions)
    out = dict(a)
    pv_a, pv_b = a["pixel_values_videos"], b["pixel_values_videos"]
    if bb.family == "qwen2_vl":  # rows: sample 0's patches, then sample 1's
        half = pv_a.shape[0] // 2
        out["pixel_values_videos"] = torch.cat([pv_a[:half], pv_b[half:]])
    else:
        out["pixel_values_videos"] = torch.stack([pv_a[0], pv_b[1]])
    return out


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("mode,retention", [("adaptive", 1.0), ("fixed", 0.25), ("fixed", 0.1)])
def test_selection_equals_brute_force(name, mode, retention):
    bb = backbone(name)
    inputs = two_videos(bb, static_first=False)
    layout = bb.layout(inputs)
    x0 = layer_inputs(bb, inputs)[0]
    vis = bb.visual_mask(inputs["input_ids"], layout)
    with sharp.prune(bb, "sharpv", retention, mode=mode, memory_threshold=0.0) as trace, torch.no_grad():
        bb.model(**inputs)
    kept = trace.kept[0]
    for b in range(2):
        expected = brute_force_keep(x0[b][vis[b]], layout, mode, retention)
        assert kept[b].tolist() == expected
    counts = [len(k) for k in kept]
    if mode == "fixed":
        assert counts == [budget(layout.n_visual, retention)] * 2
        assert trace.visual_tokens_per_layer == sharp.make_method("sharpv", retention, mode="fixed").token_schedule(
            layout.n_visual, bb.num_layers)
    else:  # the static video keeps only frame 0's tokens
        m = trace.method("sharpv")
        assert counts[1] < counts[0] and m.frame_kept[1][1:].sum() == 0
        assert m.kept_share == [c / layout.n_visual for c in counts]


@pytest.mark.parametrize("name", BACKBONES)
def test_batch_equals_single_samples(name):
    bb = backbone(name)
    inputs = two_videos(bb, static_first=True)
    with sharp.prune(bb, "sharpv", memory_threshold=0.0) as trace, torch.no_grad():
        bb.model(**inputs)
    batch_kept = [k.tolist() for k in trace.kept[0]]
    assert len(batch_kept[0]) != len(batch_kept[1])
    for b in range(2):
        single = _sample(bb, inputs, b)
        with sharp.prune(bb, "sharpv", memory_threshold=0.0) as t1, torch.no_grad():
            bb.model(**single)
        assert t1.kept[0][0].tolist() == batch_kept[b]


def _sample(bb, inputs, b):
    ids, mask = inputs["input_ids"][b:b + 1], inputs["attention_mask"][b:b + 1]
    start = int((mask[0] == 0).sum())  # drop its left padding
    out = {"input_ids": ids[:, start:], "attention_mask": mask[:, start:]}
    if "mm_token_type_ids" in inputs:  # transformers 5.x Qwen2-VL
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b:b + 1, start:]
    pv = inputs["pixel_values_videos"]
    if bb.family == "qwen2_vl":
        half = pv.shape[0] // 2
        out["pixel_values_videos"] = pv[b * half:(b + 1) * half]
        out["video_grid_thw"] = inputs["video_grid_thw"][b:b + 1]
    else:
        out["pixel_values_videos"] = pv[b:b + 1]
    return out


# -- Memory SharpV -------------------------------------------------------------------------------
def test_similarity_equals_hand_loop_and_drops_follow_m():
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=2)
    hidden = layer_inputs(bb, inputs)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    v0 = hidden[0][0][vis].double()
    token, mean = [1.0], [1.0]
    for layer in range(1, bb.num_layers):
        v = hidden[layer][0][vis].double()
        token.append(float(np.mean([float(v[i] @ v0[i] / (v[i].norm() * v0[i].norm())) for i in range(len(v))])))
        a, c = v.mean(0), v0.mean(0)
        mean.append(float(a @ c / (a.norm() * c.norm())))
    for kind, ref in (("token", token), ("mean", mean)):
        m_value = sorted(ref)[1] + 1e-3  # between the lowest and the second lowest similarity
        with sharp.prune(bb, "sharpv", visual=False, memory_threshold=m_value, similarity=kind) as trace, \
                torch.no_grad():
            bb.model(**inputs)
        m = trace.method("sharpv")
        assert len(m.similarity) == bb.num_layers  # per layer: one similarity per sample
        assert [row[0] for row in m.similarity] == pytest.approx(ref, abs=1e-5)
        below = [layer for layer in range(1, bb.num_layers) if ref[layer] < m_value]
        assert m.dropped_layers == below and len(below) == 2  # the two least similar layers
    assert token != pytest.approx(mean, abs=1e-3)


def layer_outputs(bb, inputs):
    """Vanilla run: every decoder layer's output (b, s, d)."""
    got = {}

    def keep(m, a, kw, out, i):
        got[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    hooks = [layer.register_forward_hook(lambda m, a, kw, out, i=i: keep(m, a, kw, out, i), with_kwargs=True)
             for i, layer in enumerate(bb.layers)]
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("name", BACKBONES)
def test_memory_features_output_reads_each_layers_output(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=2)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    v0 = layer_inputs(bb, inputs)[0][0][vis].double()
    outs = layer_outputs(bb, inputs)
    ref = []
    for layer in range(bb.num_layers):  # V_l = layer l's OUTPUT, against V_0 = layer 0's input
        v = outs[layer][0][vis].double()
        ref.append(float(np.mean([float(v[i] @ v0[i] / (v[i].norm() * v0[i].norm())) for i in range(len(v))])))
    with sharp.prune(bb, "sharpv", visual=False, memory_threshold=1.0, memory_features="output") as trace, \
            torch.no_grad():
        bb.model(**inputs)
    m = trace.method("sharpv")
    assert [row[0] for row in m.similarity] == pytest.approx(ref, abs=1e-5)
    assert ref[0] < 1.0  # layer 0's output is not V_0 ...
    assert m.dropped_layers == list(range(1, bb.num_layers))  # ... but layer 0 is never dropped (M = 1)
    with sharp.prune(bb, "sharpv", visual=False, memory_threshold=1.0) as t_in, torch.no_grad():
        bb.model(**inputs)
    assert [row[0] for row in t_in.method("sharpv").similarity][1:] != pytest.approx(ref[1:], abs=1e-4)


def memory_reference_logits(bb, inputs, sequences, kept_visual, dropped_layers):
    """No-cache logits of the UNPRUNED model over prompt + generated tokens: every layer sees the
    text and the kept visual keys; in ``dropped_layers`` the generated tokens' queries (rows >= the
    prompt length) see no visual key at all (eager attention)."""
    b, s = sequences.shape
    p = inputs["input_ids"].shape[1]
    prompt_mask = inputs["attention_mask"]
    mask2d = torch.cat([prompt_mask, prompt_mask.new_ones(b, s - p)], dim=1).bool()
    vis = torch.zeros(b, s, dtype=torch.bool)
    vis[:, :p] = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    keys = kept_key_mask(bb, inputs, sequences, kept_visual)  # (b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    eye = torch.eye(s, dtype=torch.bool)[None, None]
    base = causal & mask2d[:, None, None, :] & keys[:, None, None, :]
    allowed = {}
    for layer in range(bb.num_layers):
        a = base.clone()
        if layer in dropped_layers:
            a[:, :, p:, :] &= ~vis[:, None, None, :]
        allowed[layer] = a | eye
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kwargs.update(input_ids=sequences, attention_mask=mask2d.long())
    if bb.kind == "llava_onevision":  # generate's positions for left padding
        pos = mask2d.long().cumsum(-1) - 1
        kwargs["position_ids"] = pos.masked_fill(~mask2d, 1)
    with torch.no_grad(), layer_masks(bb, allowed):
        return bb.model(**kwargs, use_cache=False).logits


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("case", ["single", "batch-static-first", "batch-static-last"])
def test_decode_after_kv_drop_equals_masked_reference(name, case):
    bb = backbone(name)
    inputs = (bb.synthetic_inputs(frames=8, seed=13) if case == "single"
              else two_videos(bb, static_first=case == "batch-static-first"))
    with sharp.prune(bb, "sharpv", memory_threshold=1.0) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    m = trace.method("sharpv")
    assert m.dropped_layers == list(range(1, bb.num_layers))  # M = 1: every layer but V_0's
    if case != "single":  # different visual counts and question lengths: the padding evens them out
        counts = [len(k) for k in trace.kept[0]]
        assert counts[0] != counts[1]
        assert all(r["dropped"] == counts for r in m.memory_layers[1:])
    ref = memory_reference_logits(bb, inputs, seq, trace.kept[0], m.dropped_layers)
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)


def _cache_bytes(cache):
    return [int(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
            for layer in cache.layers]


@pytest.mark.parametrize("name", BACKBONES)
def test_memory_threshold_one_shrinks_degraded_layers_zero_keeps_cache(name):
    bb = backbone(name, "sdpa")
    inputs = bb.synthetic_inputs(frames=8, seed=4, batch_size=2)
    caches, traces = {}, {}
    for m_value in (0.0, 1.0):
        with sharp.prune(bb, "sharpv", memory_threshold=m_value) as trace, torch.no_grad():
            out = bb.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        caches[m_value], traces[m_value] = _cache_bytes(compat.output_cache(out)), trace.method("sharpv")
    with torch.no_grad():
        seq_len = bb.model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1]
    # M = 0: no memory stage; the cache has the visual stage's length in every layer
    assert not hasattr(traces[0.0], "memory_layers") and len(set(caches[0.0])) == 1
    full, shrunk = caches[0.0], caches[1.0]
    assert shrunk[0] == full[0] and all(s < f for s, f in zip(shrunk[1:], full[1:]))
    m = traces[1.0]
    assert m.kv_bytes_saved == sum(full) - sum(shrunk) > 0
    assert m.kv_bytes_before == sum(full) - _generated_bytes(bb, inputs, seq_len, full)
    for row in m.memory_layers[1:]:
        assert row["dropped"] == row["visual_entries"] and row["degraded"] == [True, True]
        assert row["bytes_saved"] == full[row["layer"]] - shrunk[row["layer"]]


def _generated_bytes(bb, inputs, seq_len, full):
    """Bytes the generated tokens (all but the last, which is never cached) add to every layer."""
    new = seq_len - inputs["input_ids"].shape[1] - 1
    attn = bb.layers[0].self_attn
    per_entry = 2 * attn.config.num_key_value_heads * attn.head_dim * bb.dtype.itemsize
    return new * inputs["input_ids"].shape[0] * per_entry * len(full)


# -- no attention scores, FLOPs, identity, bad values ---------------------------------------------------
def _raise(*args, **kwargs):
    raise AssertionError("SharpV must not compute attention scores")


@pytest.mark.parametrize("name", BACKBONES)
def test_never_calls_an_attention_score_function(name, monkeypatch):
    from sharp.engine import attention, context
    from sharp.engine.prefill import PrefillRunner

    monkeypatch.setattr(attention, "attention_of_last_tokens", _raise)
    monkeypatch.setattr(sharp.engine, "attention_of_last_tokens", _raise)
    monkeypatch.setattr(context, "attention_of_last_tokens", _raise)
    monkeypatch.setattr(StageContext, "last_token_attention", _raise)
    monkeypatch.setattr(StageContext, "vision", _raise)
    monkeypatch.setattr(PrefillRunner, "vision_maps", _raise)
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("transformers.models.")
                and hasattr(module, "eager_attention_forward")):
            monkeypatch.setattr(module, "eager_attention_forward", _raise)
    bb = backbone(name, "sdpa")
    assert bb.text_config._attn_implementation == "sdpa"
    inputs = bb.synthetic_inputs(frames=8, seed=6, batch_size=2)
    for kw in ({}, {"mode": "fixed", "memory_threshold": 1.0}):
        with sharp.prune(bb, "sharpv", 0.25, **kw) as trace, torch.no_grad():
            out = bb.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert trace.visual_tokens_per_layer[0] < bb.layout(inputs).n_visual
    assert trace.method("sharpv").dropped_layers == list(range(1, bb.num_layers))


def test_token_schedules():
    n, layers = 6272, 28
    assert sharp.make_method("sharpv", 0.25, mode="fixed").token_schedule(n, layers) == [budget(n, 0.25)] * layers
    assert sharp.make_method("sharpv", 0.25).token_schedule(n, layers) == [budget(n, 0.12)] * layers  # nominal
    assert sharp.make_method("sharpv", 0.25, nominal_retention=0.2).token_schedule(n, layers) == [1254] * layers
    assert sharp.make_method("sharpv", 0.25, visual=False).token_schedule(n, layers) == [n] * layers
    # fixed mode prunes before layer 0: its TFLOPs are those of the unpruned model on the kept tokens
    assert sharp.flops.prefill_tflops("llava_onevision_7b", "sharpv", 0.25, visual_tokens=n, mode="fixed") == \
        pytest.approx(sharp.flops.prefill_tflops("llava_onevision_7b", "vanilla", 1.0, visual_tokens=budget(n, 0.25)))


@pytest.mark.parametrize("name", BACKBONES)
def test_fixed_mode_at_full_retention_without_memory_is_identity(name):
    bb = backbone(name, "sdpa")
    inputs = bb.synthetic_inputs(frames=8, seed=12, batch_size=2)
    ref_seq, ref_logits = generate_with_logits(bb, inputs)
    with sharp.prune(bb, "sharpv", 1.0, mode="fixed", memory_threshold=0.0):
        seq, logits = generate_with_logits(bb, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "fast"}, "mode must be one of 'adaptive', 'fixed', got 'fast'"),
    ({"adaptive_rule": "norm"}, "adaptive_rule must be one of 'ratio', 'threshold'"),
    ({"similarity": "cos"}, "similarity must be one of 'token', 'mean'"),
    ({"memory_threshold": 1.5}, r"memory_threshold must be in \[0, 1\].*1.5"),
    ({"w": -1.0}, "w must be a finite number >= 0"),
    ({"nominal_retention": 0.0}, r"nominal_retention must be in \(0, 1\]"),
    ({"K": 0.0}, "K must be a finite number > 0"),
    ({"K": float("inf")}, "K must be a finite number > 0"),
    ({"adaptive_f": "cells"}, "adaptive_f must be one of 'tokens', 'frames', got 'cells'"),
    ({"memory_features": "middle"}, "memory_features must be one of 'input', 'output', got 'middle'"),
])
def test_bad_values_fail_with_the_valid_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharp.make_method("sharpv", 0.5, **kwargs)
