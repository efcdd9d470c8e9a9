"""PruneVid (baselines/prunevid.py) against independent references written here.

(a) refine_clusters on hand-made label sequences (results by hand in the comments) and on random ones
    against a numpy rewrite of the official rules;
(b) DPC-kNN (centres in descending score order, nearest-centre labels, member means) against float64 loops;
(c) stage 1 on a planted video with static segments (density noise 0): segments, static cells, the
    official count sum_seg [c(|S|) + W c(N - |S|)] and every row, in the official order and per slot;
(d) through the tiny LLaVA-OV model: stage-1 and stage-2 counts equal the official formulas, the stage-1
    rows equal the reference computed on the unpruned layer-0 input, and the stage-2 kept set equals the
    per-group top int(0.4 c) of an explicit eager attention (no RoPE, no causal mask, max over heads and
    the query rows after the video) of the captured layer-M input;
(e) retention -> alpha, the nominal schedule, the engine's non-causal max-reduced score, errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sharp
from baselines import prunevid as P
from conftest import shared_backbone
from engine_reference import Recorder, generate_with_logits, layer_input, replay_reference_logits
from test_methods import compact_layers


def c(n: int) -> int:
    """The official cluster count of a set of n tokens (cluster only above 14, ratio 0.5)."""
    return n if n <= 14 else int(0.5 * n)


# -- (a) refine_clusters -------------------------------------------------------------------------------
def ref_refine(labels):
    """numpy rewrite: mark runs that are not their cluster's longest (or whose cluster has only single
    frames) with -1, then fill each -1 block, left to right, from the longer neighbouring block."""
    arr = np.asarray(labels, dtype=np.int64).copy()
    n = len(arr)
    change = np.flatnonzero(np.diff(arr)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [n]])  # exclusive
    lengths = ends - starts
    labs = arr[starts]
    for lab in np.unique(labs):
        mine = labs == lab
        best = lengths[mine].max()
        for s, e, ln in zip(starts[mine], ends[mine], lengths[mine]):
            if best == 1 or ln < best:
                arr[s:e] = -1
    holes = np.flatnonzero(arr == -1)
    blocks = np.split(holes, np.flatnonzero(np.diff(holes) > 1) + 1) if holes.size else []
    for block in blocks:
        s, e = int(block[0]), int(block[-1])
        left = right = None
        left_len = right_len = 0
        if s > 0:
            left = int(arr[s - 1])
            before = arr[:s][::-1]
            left_len = int(np.argmax(before != left)) if (before != left).any() else s
        if e < n - 1:
            right = int(arr[e + 1])
            after = arr[e + 1:]
            right_len = int(np.argmax(after != right)) if (after != right).any() else n - e - 1
        if left is None and right is None:
            fill = 0
        elif right is None or (left is not None and left_len >= right_len):
            fill = left
        else:
            fill = right
        arr[s:e + 1] = fill
    return arr.tolist()


@pytest.mark.parametrize("labels,expected", [
    ([1, 0, 0, 0, 0, 0, 0, 0], [0] * 8),  # cluster 1 only a single frame: dissolved, joins the run on its right
    ([0, 0, 1, 1, 0, 2, 2, 2], [0, 0, 1, 1, 2, 2, 2, 2]),  # 0's shorter run -> the longer neighbour (2: 3 > 1's 2)
    ([0, 0, 1, 2, 2], [0, 0, 0, 2, 2]),  # a tie (2 vs 2): left
    ([0, 1, 2], [0, 0, 0]),  # every cluster dissolved, no neighbour: label 0
    ([0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]),  # two longest runs of cluster 0: both kept (3 segments)
    # cluster 0's runs (3,3) and (6,9): frame 3 -> -1, neighbours 2 (3 frames) and 1 (2 frames): -> 2
    ([2, 2, 2, 0, 1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 1, 1, 0, 0, 0, 0]),
])
def test_refine_clusters_by_hand(labels, expected):
    assert P.refine_clusters(labels) == expected
    assert ref_refine(labels) == expected


@pytest.mark.parametrize("seed", range(6))
def test_refine_clusters_equals_reference(seed):
    g = np.random.default_rng(seed)
    for _ in range(100):
        labels = g.integers(0, int(g.integers(1, 6)), size=int(g.integers(1, 17))).tolist()
        assert P.refine_clusters(labels) == ref_refine(labels), labels


# -- (b) DPC-kNN ----------------------------------------------------------------------------------------
def ref_dpc(x: np.ndarray, clusters: int, k: int):
    """float64 loops, noise 0: (centres in descending rho x delta order, nearest-centre label of every
    token (first centre on ties, a centre its own), member means in cluster order)."""
    m, d = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / math.sqrt(d)
    kk = min(k, m)
    rho = np.array([math.exp(-np.mean(np.sort(dist[i])[:kk] ** 2)) for i in range(m)])
    delta = np.array([min([dist[i, j] for j in range(m) if rho[j] > rho[i]], default=dist.max())
                      for i in range(m)])
    centres = np.argsort(-(rho * delta), kind="stable")[:clusters].tolist()
    labels = [int(np.argmin([dist[centre, i] for centre in centres])) for i in range(m)]
    for j, centre in enumerate(centres):
        labels[centre] = j
    means = [x[[i for i in range(m) if labels[i] == j]].mean(axis=0) for j in range(clusters)]
    return centres, labels, np.stack(means)


@pytest.mark.parametrize("m,clusters", [(20, 10), (31, 15), (9, 3)])
def test_dpc_knn_equals_reference(m, clusters):
    g = np.random.default_rng(m)
    x = g.normal(size=(3, m, 12)).astype(np.float32)
    centres, assignment = P.dpc_knn(torch.tensor(x), clusters, 7, torch.zeros(3, m))
    means = P.cluster_means(torch.tensor(x), assignment, clusters)
    for i in range(3):
        ref_c, ref_l, ref_m = ref_dpc(x[i].astype(np.float64), clusters, 7)
        assert centres[i].tolist() == ref_c
        assert assignment[i].tolist() == ref_l
        np.testing.assert_allclose(means[i].numpy(), ref_m, rtol=1e-5, atol=1e-6)


# -- (c) stage 1 on a planted video ---------------------------------------------------------------------
def planted_video(seed=0, n=36, d=16, scenes=((4, 20), (4, 10))):
    """(T, n, d): scenes of (frames, static cells); a scene's first ``static`` cells repeat a base token
    with small noise, the other cells are fresh per frame; each scene has its own offset so that the
    frame means separate the scenes."""
    g = np.random.default_rng(seed)
    frames = []
    for s, (w, static) in enumerate(scenes):
        base = g.normal(size=(n, d))
        offset = (1.0 if s % 2 == 0 else -1.0) * np.ones(d) * 0.5
        for _ in range(w):
            f = g.normal(size=(n, d))
            f[:static] = base[:static] + 0.05 * g.normal(size=(static, d))
            frames.append(f + offset)
    return np.stack(frames).astype(np.float32)


def ref_static(seg: np.ndarray, tau: float) -> list[int]:
    """Cells whose mean cosine over ordered frame pairs w != t exceeds tau (none for one frame)."""
    w, n, _ = seg.shape
    if w < 2:
        return []
    unit = seg / np.linalg.norm(seg, axis=-1, keepdims=True)
    out = []
    for p in range(n):
        cos = [float(unit[a, p] @ unit[b, p]) for a in range(w) for b in range(w) if a != b]
        if np.mean(cos) > tau:
            out.append(p)
    return out


def ref_segments(x: np.ndarray, ratio=0.25, k=7) -> list[int]:
    frames = x.shape[0]
    _, labels, _ = ref_dpc(x.astype(np.float64).mean(axis=1), max(1, int(frames * ratio)), k)
    refined = ref_refine(labels)
    sizes, start = [], 0
    for i in range(1, frames + 1):
        if i == frames or refined[i] != refined[start]:
            sizes.append(i - start)
            start = i
    return sizes


def ref_stage1(x: np.ndarray, tau=0.8):
    """Per segment: (static cells, [(cell, frame, row)] in the official order: static clusters (descending
    score; the segment's first frame), then each frame's dynamic clusters), from the references above."""
    n = x.shape[1]
    out, start = [], 0
    for w in ref_segments(x):
        seg = x[start:start + w].astype(np.float64)
        static = ref_static(seg, tau)
        dynamic = [p for p in range(n) if p not in static]
        items = []
        if static:
            items += ref_sets(seg[:, static].mean(axis=0), static, start)
        for i in range(w):
            if dynamic:
                items += ref_sets(seg[i, dynamic], dynamic, start + i)
        out.append((static, items))
        start += w
    return out


def ref_sets(tokens: np.ndarray, cells: list[int], frame: int):
    if len(cells) <= 14:
        return [(p, frame, tokens[j]) for j, p in enumerate(cells)]
    centres, _, means = ref_dpc(tokens, int(0.5 * len(cells)), 7)
    return [(cells[ctr], frame, means[j]) for j, ctr in enumerate(centres)]


@pytest.mark.parametrize("official_order", [False, True])
def test_stage1_equals_reference_on_planted_video(official_order):
    x = planted_video()
    frames, n, _ = x.shape
    method = sharp.make_method("prunevid", 0.2, density_noise=0.0)
    res = method.stage1(torch.tensor(x), official_order=official_order)
    ref = ref_stage1(x)
    assert res.segments == ref_segments(x) == [4, 4]  # the planted scenes
    assert [cells.tolist() for cells in res.static_cells] == [s for s, _ in ref]
    assert [len(s) for s, _ in ref] == [20, 10]  # one static set clustered (20 > 14), one not
    # the official count: sum_seg [c(|S|) + W c(N - |S|)]
    expected = sum(c(len(s)) + w * c(n - len(s)) for (s, _), w in zip(ref, res.segments))
    assert len(res.slots) == expected == 10 + 4 * 8 + 10 + 4 * 13
    items = [it for _, seg in ref for it in seg]
    flat = torch.tensor([f * n + p for p, f, _ in items])
    rows = np.stack([r for _, _, r in items])
    if official_order:  # each segment's rows in the official order, slots ascending
        assert torch.equal(res.content, flat)
        np.testing.assert_allclose(res.rows.numpy(), rows, rtol=1e-5, atol=1e-5)
        start = 0
        for _, seg in ref:
            block = res.slots[start:start + len(seg)]
            assert torch.equal(block, flat[start:start + len(seg)].sort().values)
            start += len(seg)
    else:  # every row in its own centre's slot
        order = torch.argsort(flat)
        assert torch.equal(res.slots, flat[order]) and torch.equal(res.content, flat[order])
        np.testing.assert_allclose(res.rows.numpy(), rows[order.numpy()], rtol=1e-5, atol=1e-5)
    assert torch.equal(res.slots, res.slots.sort().values)


def test_single_frame_segment_is_all_dynamic():
    """W = 1: the official (cos - 1) / 0 is NaN (no static token); T = 1 gives one such segment."""
    x = torch.randn(1, 20, 8)
    assert not P.static_positions(x, 0.8).any()
    res = sharp.make_method("prunevid", 0.2, density_noise=0.0).stage1(x)
    assert res.segments == [1] and len(res.slots) == c(20) and res.group_sizes == [10]


# -- (d) through the model ---------------------------------------------------------------------------------
def scene_video_inputs(bb, seed=0):
    """8 frames, two scenes of 4: the left half of each frame is its scene's image, the right half fresh
    noise every frame (scene 2 brighter), so that the tiny model's features have static and dynamic cells
    and separate frame means (checked: segments [4, 4], 8 and 16 static cells)."""
    h, w = bb.synthetic_frame_size()
    g = np.random.default_rng(seed)
    images = [g.integers(0, 256, (h, w, 3)), g.integers(64, 256, (h, w, 3))]
    frames = []
    for t in range(8):
        f = images[t // 4].copy()
        f[:, w // 2:] = g.integers(0 if t < 4 else 64, 256, (h, w - w // 2, 3))
        frames.append(f)
    pixels = [bb.video_pixels(np.stack(frames).astype(np.uint8))]
    out = bb._tokenize([bb.build_prompt("What happens?", bb.n_placeholders(**pixels[0]))])
    out.update(bb.collate_pixels(pixels))
    return bb._to_model(out)


def eager_stage2_scores(bb, layer: int, hidden: torch.Tensor, video_start: int, n_visual: int) -> torch.Tensor:
    """(n_visual,): the official score of each visual row of ``hidden`` (1, s, d), layer ``layer``'s input:
    softmax(q k^T / sqrt(d_h)) over ALL keys (no RoPE, no causal mask), max over heads, then over the
    query rows after the video."""
    block = bb.layers[layer]
    attn = block.self_attn
    cfg = attn.config
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    with torch.no_grad():
        x = block.input_layernorm(hidden)
        s = x.shape[1]
        q = attn.q_proj(x).view(1, s, heads, hd).transpose(1, 2).float()
        k = attn.k_proj(x).view(1, s, kv, hd).transpose(1, 2).float().repeat_interleave(heads // kv, dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)[0]  # (H, s, s)
    after = video_start + n_visual
    return probs[:, after:, video_start:after].amax(dim=0).amax(dim=0)


def test_model_counts_rows_and_stage2_selection():
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = scene_video_inputs(bb)
    layout = bb.layout(inputs)
    frames, n = layout.frames, layout.tokens_per_frame
    method = sharp.resolve_method("prunevid", bb, 0.2, density_noise=0.0, positions="original").method
    m_layer = method.layer
    assert m_layer == round(10 * bb.num_layers / 28) and method.kept_share == 0.4
    unpruned, _ = layer_input(bb, inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)[0]
    start = int(vis.nonzero()[0])
    hidden, trace = layer_input(bb, inputs, method, layer=m_layer)
    t = trace.method("prunevid")
    segments, statics = t.segments[0], t.static[0]
    assert segments == [4, 4] and 0 < statics[0] < n and statics[1] > 14  # static and dynamic cells, clustering
    # stage 1: the official count, and the reference's cells on the unpruned input
    x = unpruned[0, vis].float().view(frames, n, -1).numpy()
    ref = ref_stage1(x)
    assert ref_segments(x) == segments and [s for s, _ in ref] == [c.tolist() for c in t.static_cells[0]]
    stage1 = sum(c(s) + w * c(n - s) for s, w in zip(statics, segments))
    kept1 = trace.kept[0][0]
    assert len(kept1) == t.kept_stage1[0] == stage1
    assert torch.equal(kept1, torch.tensor(sorted(f * n + p for _, seg in ref for p, f, _ in seg)))
    # stage 2: the official count and the per-group top-k of the explicit eager score
    stage2 = sum(int(0.4 * c(s)) + w * int(0.4 * c(n - s)) for s, w in zip(statics, segments))
    kept2 = trace.kept[1][0]
    assert len(kept2) == t.kept_stage2[0] == stage2
    score = eager_stage2_scores(bb, m_layer, hidden, start, len(kept1))
    seg_of_frame = [i for i, w in enumerate(segments) for _ in range(w)]
    first = [sum(segments[:i]) for i in range(len(segments))]
    groups: dict = {}
    for j, o in enumerate(kept1.tolist()):
        f, p = divmod(o, n)
        s = seg_of_frame[f]
        key = ("static", s) if p in t.static_cells[0][s].tolist() else ("dynamic", f)
        assert key[0] == "dynamic" or f == first[s]  # a static token sits in its segment's first frame
        groups.setdefault(key, []).append(j)
    expected = []
    for members in groups.values():
        k = int(0.4 * len(members))
        top = torch.topk(score[members], k).indices.tolist() if k else []
        expected += [int(kept1[members[i]]) for i in top]
    assert sorted(expected) == kept2.tolist()


def test_model_compact_positions_write_the_official_order():
    """positions="compact" (OV's automatic choice): the video rows entering the LLM are each segment's
    rows in the official order (static clusters, then frame by frame), from the unpruned layer-0 input."""
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = scene_video_inputs(bb)
    layout = bb.layout(inputs)
    n = layout.tokens_per_frame
    method = sharp.resolve_method("prunevid", bb, 0.2, density_noise=0.0).method
    assert method.positions == "compact"
    unpruned, _ = layer_input(bb, inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)[0]
    start = int(vis.nonzero()[0])
    hidden, trace = layer_input(bb, inputs, method, layer=0)
    x = unpruned[0, vis].float().view(layout.frames, n, -1).numpy()
    rows = np.stack([r for _, seg in ref_stage1(x) for _, _, r in seg])
    got = hidden[0, start:start + len(rows)].float().numpy()
    np.testing.assert_allclose(got, rows, rtol=1e-4, atol=1e-5)
    content = [f * n + p for _, seg in ref_stage1(x) for p, f, _ in seg]
    assert trace.method("prunevid").content[0].tolist() == content


def test_qwen_temporal_patches_are_frames():
    bb = shared_backbone("tiny_qwen2_vl", "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=3)
    layout = bb.layout(inputs)
    with sharp.prune(bb, "prunevid", 0.2) as trace, torch.no_grad():
        bb.model(**inputs)
    t = trace.method("prunevid")
    assert sum(t.segments[0]) == layout.frames  # temporal patches
    n = layout.tokens_per_frame
    assert t.kept_stage1[0] == sum(c(s) + w * c(n - s) for s, w in zip(t.static[0], t.segments[0]))


# -- (e) knobs, the engine's score, errors --------------------------------------------------------------
def test_retention_maps_to_alpha_and_schedule():
    assert sharp.make_method("prunevid", 0.2).kept_share == 0.4  # the official alpha
    assert sharp.make_method("prunevid", 0.1).kept_share == 0.2
    assert sharp.make_method("prunevid", 0.05).kept_share == 0.1
    assert sharp.make_method("prunevid", 0.5).kept_share == 1.0
    assert sharp.make_method("prunevid", 0.9).kept_share == 1.0
    assert sharp.make_method("prunevid", 0.05, alpha=0.4).kept_share == 0.4
    m = sharp.make_method("prunevid", 0.25, layer=2)
    assert m.token_schedule(6272, 4) == [3136] * 3 + [1568]  # 0.5 N until layer 2, r N after it


def test_engine_score_is_non_causal_max_over_heads_and_queries():
    """ctx.last_token_attention(rope=False, causal=False, reduce="max") equals the explicit eager map on
    the layer's input (a test-only method records it)."""
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = scene_video_inputs(bb, seed=1)
    seen = {}

    @sharp.register_method
    class _Probe(sharp.PruningMethod):
        name = "_prunevid_score_probe"

        def stages(self, num_layers):
            return [2]

        def select(self, ctx):
            q = ctx.seq_len - 1 - int(ctx.visual_positions(0)[-1])
            seen["score"] = ctx.last_token_attention(queries=q, rope=False, causal=False, reduce="max")
            seen["start"], seen["n"] = int(ctx.visual_positions(0)[0]), ctx.visual_counts[0]
            return sharp.Selection.unchanged()

    hidden, _ = layer_input(bb, inputs, "_prunevid_score_probe", layer=2)
    ref = eager_stage2_scores(bb, 2, hidden, seen["start"], seen["n"])
    got = seen["score"][0, seen["start"]:seen["start"] + seen["n"]]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"tau": 2.0}, "tau"),
    ({"cluster_ratio": 0.0}, "cluster_ratio"), ({"segment_ratio": 1.5}, "segment_ratio"),
    ({"cluster_above": -1}, "cluster_above"), ({"knn_k": 0}, "knn_k"), ({"density_noise": -1.0}, "density_noise"),
])
def test_bad_values_fail(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharp.make_method("prunevid", 0.2, **kwargs)


def test_layer_outside_the_model_fails():
    with pytest.raises(ValueError, match="layer"):
        sharp.make_method("prunevid", 0.2, layer=4).stages(4)
    with pytest.raises(ValueError, match="layer"):
        sharp.make_method("prunevid", 0.2, layer=0).stages(4)


@pytest.mark.parametrize("prefix_kv", ["official", "kept"])
def test_decoding_hides_stage_two_drops_in_the_prefix_layers(prefix_kv):
    """Official ``prompt_prefill`` gathers the KV of layers 0..M too: every decode step sees only stage 2's
    kept tokens in every layer (a decode stage before layer 0); ``"kept"``: layers 0..M keep stage 1's.
    Each step's logits equal the masked no-cache reference that replays it."""
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = scene_video_inputs(bb)
    method = sharp.resolve_method("prunevid", bb, 0.2, density_noise=0.0, prefix_kv=prefix_kv).method
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=3)
    kept2 = trace.kept[1][0]
    if prefix_kv == "official":
        assert len(trace.decode_steps) == 2  # the decode steps after the prefill
        for step in trace.decode_steps:
            (layer, key, kept), = step
            assert (layer, key) == (0, "prunevid") and torch.equal(kept[0], kept2)
    else:
        assert trace.decode_steps == []
    ref = replay_reference_logits(bb, inputs, seq, trace, recorder, compact_layers=compact_layers(method, trace, bb.num_layers))
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)
