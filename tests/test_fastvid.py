"""FastVID (baselines/fastvid.py) against independent references.

References: plain numpy loops written from the official code (LunarShen/FastVID @ a40a109:
fastvid_llavaonevision modeling_qwen2.py L900-1074, fastvid_llavavideo modeling_qwen2.py, fastvid_qwen25vl
modeling_qwen2_5_vl.py) for DySeg, the budgets, ATS, the density score and the merge; the SigLIP pooling
head and the Qwen mean-query attention recomputed by hand from the vision tower's own hidden states;
the kept-count formula of the notes. The density's tie-breaking noise is the documented draw
(``torch.rand`` of a CPU generator seeded with ``seed``), the only thing shared with the method.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sharp
from baselines.fastvid import FastVID
from conftest import shared_backbone, random_video_inputs
from sharp.backbones import compat

# -- numpy references -------------------------------------------------------------------------------


def ref_similarities(g):
    g = np.asarray(g, dtype=np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return np.array([float(g[t] @ g[t + 1]) for t in range(len(g) - 1)])


def ref_cuts(g, c, tau):
    """DySeg: the c-1 smallest transitions (all when fewer) and every one below tau; segment sizes."""
    s = ref_similarities(g)
    smallest = sorted(range(len(s)), key=lambda t: s[t])[:min(c - 1, len(s))]
    cuts = sorted(set(smallest) | {t for t in range(len(s)) if s[t] < tau})
    sizes, prev = [], -1
    for cut in cuts + [len(g) - 1]:
        if cut > prev:
            sizes.append(cut - prev)
        prev = cut
    return cuts, sizes


def ref_density(y, noise):
    """rho delta of each row of y (m, D): official L975-989, in float64."""
    y = np.asarray(y, dtype=np.float64)
    m, dim = y.shape
    d = np.sqrt(((y[:, None, :] - y[None, :, :]) ** 2).sum(-1)) / math.sqrt(dim)
    rho = np.array([math.exp(-np.mean(np.sort(d[i])[:min(4, m)] ** 2)) for i in range(m)]) + noise
    delta = np.empty(m)
    for i in range(m):
        higher = d[i][rho > rho[i]]
        delta[i] = higher.min() if higher.size else d.max()
    return rho * delta


def ref_merge(targets, pool, beta, exclude=()):
    """Each pool row (not in ``exclude``) to its most cosine-similar target; w x + (1-w) mean(assigned),
    w = max(1/(k+1), beta). Returns (rows, assigned lists)."""
    targets = np.asarray(targets, dtype=np.float64)
    pool = np.asarray(pool, dtype=np.float64)
    tn = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    assigned = [[] for _ in targets]
    choice = np.argmax((pool / np.linalg.norm(pool, axis=1, keepdims=True)) @ tn.T, axis=1)  # first max
    for j, a in enumerate(choice):
        if j not in exclude:
            assigned[int(a)].append(j)
    rows = []
    for x, members in zip(targets, assigned):
        k = len(members)
        w = max(1.0 / (k + 1), beta)
        mean = pool[members].mean(axis=0) if k else np.zeros_like(x)
        rows.append(w * x + (1 - w) * mean)
    return np.array(rows), assigned


def topk(values, k):
    return [int(i) for i in np.argsort(-np.asarray(values), kind="stable")[:k]]


def ref_onevision(x, att, g, r=0.10, c=8, tau=0.9, d=0.4, p=4, beta=0.6, seed=0, noise_scale=1e-6):
    """The OV "parallel" code with plain loops. Returns dict(keep, salient, anchors: {index: row}, sizes, cuts)."""
    x, att = np.asarray(x, np.float64), np.asarray(att)
    frames, per_frame, _ = x.shape
    retain = max(1, int(per_frame * r))
    salient_n = retain - int(retain * d)
    context_n = retain - salient_n
    cuts, sizes = ref_cuts(g, c, tau)
    salient = [topk(att[t], salient_n) for t in range(frames)]
    rest = [[i for i in range(per_frame) if i not in set(salient[t])] for t in range(frames)]
    m = per_frame - salient_n
    noise = (torch.rand((frames, m), generator=torch.Generator().manual_seed(seed)) * noise_scale).double().numpy()
    score = [ref_density(x[t, rest[t]], noise[t]) for t in range(frames)]
    anchors, start = {}, 0
    for n in sizes:
        per = context_n if n == 1 else (context_n * n) // math.ceil(n / p)
        per = min(per, m)
        for i in range(n):
            if (n - 1 - i) % p or per == 0:
                continue
            f = start + i
            pick = topk(score[f], per)
            targets = x[f, [rest[f][j] for j in pick]]
            pool = x[f, rest[f]] if n == 1 else np.concatenate([x[start + j, rest[start + j]] for j in range(n)])
            rows, _ = ref_merge(targets, pool, beta)
            for j, row in zip(pick, rows):
                anchors[f * per_frame + rest[f][j]] = row
        start += n
    sal = sorted(t * per_frame + i for t in range(frames) for i in salient[t])
    return dict(keep=sorted(sal + list(anchors)), salient=sal, anchors=anchors, sizes=sizes, cuts=cuts,
                budget=(retain, salient_n, context_n))


def ref_segment_rules(x, att, g, qwen, r=0.10, c=8, tau=0.9, d=0.4, p=4, beta=0.6, ignore=None, seed=0,
                      noise_scale=1e-6):
    """The LLaVA-Video (qwen=False) / Qwen2.5-VL (qwen=True) code with plain loops."""
    x, att = np.asarray(x, np.float64), np.asarray(att)
    frames, frm_len, _ = x.shape
    gen = torch.Generator().manual_seed(seed)
    cuts, sizes = ref_cuts(g, c, tau)
    s_all = ref_similarities(g)
    frame_retain = max(1, int(frm_len * r))
    keep, anchors, sal_all, start = [], {}, [], 0
    for n in sizes:
        seg_retain = frame_retain * n
        seg_context = int(seg_retain * d)
        if qwen:
            seg_context = max(seg_context, 1)
        seg_salient = seg_retain - seg_context
        if n == 1:
            frm_sal, frm_ctx = [seg_salient], [seg_context]
        else:
            groups = [1] * n
            if qwen and ignore is not None:
                sims = s_all[start:start + n - 1]
                inner = [i for i in range(n - 1) if sims[i] < ignore]
                if inner:
                    groups = [inner[0] + 1] + [inner[i] - inner[i - 1] for i in range(1, len(inner))]
                    groups.append(n - inner[-1] - 1)
                else:
                    groups = [n]
            v = len(groups)
            sal_v = [seg_salient // v + (1 if i < seg_salient % v else 0) for i in range(v)]
            temp = (v + p - 1) // p
            chunks = [seg_context // temp + (1 if i < seg_context % temp else 0) for i in range(temp)]
            ctx_v, idx = [], 0
            for i in range(v):
                if i % p == 0:
                    ctx_v.append(min(chunks[idx], frm_len // 2) if qwen else chunks[idx])
                    idx += 1
                else:
                    ctx_v.append(0)
            ctx_v.reverse()
            frm_sal, frm_ctx = [], []
            for size, s_v, c_v in zip(groups, sal_v, ctx_v):
                frm_sal += [0] * (size - 1)
                frm_ctx += [0] * (size - 1)
                if qwen:
                    cc = min(c_v, frm_len // 2) if c_v > 0 else 0
                    frm_ctx.append(cc)
                    frm_sal.append(min(s_v, frm_len - cc) if cc > 0 else min(s_v, frm_len))
                else:
                    frm_ctx.append(c_v)
                    frm_sal.append(s_v)
        seg_sal, seg_ctx = [], []
        for i in range(n):
            top = topk(att[start + i], frm_sal[i]) if frm_sal[i] > 0 else []
            seg_sal += [i * frm_len + j for j in top]
            if frm_ctx[i] > 0:
                remaining = [j for j in range(frm_len) if j not in set(top)]
                noise = (torch.rand((1, len(remaining)), generator=gen) * noise_scale).double().numpy()[0]
                score = ref_density(x[start + i, remaining], noise)
                seg_ctx.append((i, sorted(remaining[j] for j in topk(score, frm_ctx[i]))))
        flat = x[start:start + n].reshape(n * frm_len, -1)
        for i, ctx_idx in seg_ctx:
            own = [i * frm_len + j for j in ctx_idx]
            excluded = set(seg_sal) | set(own)
            rows, _ = ref_merge(flat[own], flat, beta, exclude=excluded)
            for j, row in zip(own, rows):
                anchors[start * frm_len + j] = row
        sal_all += [start * frm_len + j for j in seg_sal]
        start += n
    return dict(keep=sorted(sal_all + list(anchors)), salient=sorted(sal_all), anchors=anchors, sizes=sizes, cuts=cuts)


# -- synthetic videos --------------------------------------------------------------------------------

PLANNED = [5, 1, 3, 8, 2, 4, 9]  # 32 frames: segments the global features are built with


def synthetic(seed=0, frames=32, per_frame=196, dim=24, planned=PLANNED, gdim=16):
    """x (T, M, D), attention (T, M), global features (T, d): frames of a planned segment share a
    direction of g (cos ~ 0.99), segments are orthogonal-ish."""
    rng = np.random.default_rng(seed)
    assert sum(planned) == frames
    base = rng.normal(size=(len(planned), gdim))
    g = np.concatenate([base[k] + 0.08 * rng.normal(size=(n, gdim)) for k, n in enumerate(planned)])
    x = rng.normal(size=(frames, per_frame, dim)).astype(np.float32)
    att = rng.random((frames, per_frame)).astype(np.float32)
    return x, att, g.astype(np.float32)


def run_method(method, x, att, g, rules):
    retain = max(1, int(x.shape[1] * method.retention))
    return method.prune_sample(torch.from_numpy(x), torch.from_numpy(att), torch.from_numpy(g), rules, retain)


def anchor_rows(res):
    return {int(i): row.numpy() for i, row in zip(res.anchors, res.rows)}


def assert_matches(res, ref):
    assert res.keep.tolist() == ref["keep"]
    assert res.salient.tolist() == ref["salient"]
    assert res.segments == ref["sizes"] and res.cuts == ref["cuts"]
    rows = anchor_rows(res)
    assert sorted(rows) == sorted(ref["anchors"])
    for i, row in ref["anchors"].items():
        np.testing.assert_allclose(rows[i], row, rtol=1e-5, atol=1e-5)


# -- DySeg and the OV rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed,frames,c,tau", [(0, 32, 8, 0.9), (1, 32, 3, 0.5), (2, 5, 8, 0.9), (3, 1, 8, 0.9)])
def test_dyseg_cuts_equal_reference(seed, frames, c, tau):
    from baselines.fastvid import dyseg_cuts, frame_similarities, segment_sizes

    rng = np.random.default_rng(seed)
    g = rng.normal(size=(frames, 8)).astype(np.float32) + 2.0  # cosines spread around tau
    cuts, sizes = ref_cuts(g, c, tau)
    got = dyseg_cuts(frame_similarities(torch.from_numpy(g)), c, tau)
    assert got.tolist() == cuts
    assert segment_sizes(got, frames) == sizes and sum(sizes) == frames
    assert len(sizes) >= min(c, frames)


def kept_count_formula(sizes, retention=0.10, per_frame=196, d=0.4, p=4):
    """12 F + sum_seg ceil(n/4) floor(7 n / ceil(n/4)) at the defaults; R = int(196 r), S = R - int(R d)."""
    retain = int(per_frame * retention)
    salient = retain - int(retain * d)
    context = retain - salient
    return salient * sum(sizes) + sum(math.ceil(n / p) * ((context * n) // math.ceil(n / p)) for n in sizes)


@pytest.mark.parametrize("seed,retention", [(0, 0.10), (2, 0.25)])
def test_onevision_equals_reference(seed, retention):
    x, att, g = synthetic(seed)
    method = FastVID(retention=retention)
    res = run_method(method, x, att, g, "onevision")
    ref = ref_onevision(x, att, g, r=retention)
    assert_matches(res, ref)
    assert any(n > 1 for n in ref["sizes"]) and any(n == 1 for n in ref["sizes"])  # both merge paths ran
    # kept count = S F + sum_seg ceil(n/p) floor(C n / ceil(n/p)) (12 F + ... at r = 0.10)
    assert len(res.keep) == kept_count_formula(ref["sizes"], retention)
    if retention == 0.10:
        assert len(res.keep) == 12 * 32 + sum(math.ceil(n / 4) * (7 * n // math.ceil(n / 4)) for n in ref["sizes"])
    # indices strictly increasing; every frame's kept set contains topk(a_t, S)
    keep = res.keep.tolist()
    assert all(a < b for a, b in zip(keep, keep[1:]))
    salient_n = ref["budget"][1]
    for t in range(32):
        top = {t * 196 + int(i) for i in torch.topk(torch.from_numpy(att[t]), salient_n).indices}
        assert top <= set(keep)


def test_each_anchor_is_a_beta_mix_of_its_assigned_tokens():
    """Single-frame segments: anchor' = 0.6 x + 0.4 mean(assigned), the assignment recomputed here."""
    x, att, g = synthetic(4)
    res = run_method(FastVID(retention=0.10), x, att, g, "onevision")
    rows = anchor_rows(res)
    start = 0
    checked = 0
    for n in res.segments:
        if n == 1:
            f = start
            top = set(torch.topk(torch.from_numpy(att[f]), 12).indices.tolist())
            rest = [i for i in range(196) if i not in top]
            mine = sorted(i - f * 196 for i in rows if f * 196 <= i < (f + 1) * 196)
            assert len(mine) == 7
            targets = np.asarray(x[f, mine], np.float64)
            tn = targets / np.linalg.norm(targets, axis=1, keepdims=True)
            groups = {a: [] for a in range(7)}
            for j in rest:
                v = np.asarray(x[f, j], np.float64)
                groups[int(np.argmax(tn @ (v / np.linalg.norm(v))))].append(j)
            for a, i in enumerate(mine):
                assert i in groups[a]  # an anchor joins itself
                expected = 0.6 * targets[a] + 0.4 * np.asarray(x[f, groups[a]], np.float64).mean(axis=0)
                np.testing.assert_allclose(rows[f * 196 + i], expected, rtol=1e-5, atol=1e-5)
                checked += 1
        start += n
    assert checked > 0


def test_llava_video_rules_equal_reference():
    x, att, g = synthetic(5, frames=32, per_frame=169)
    res = run_method(FastVID(retention=0.10), x, att, g, "llava_video")
    ref = ref_segment_rules(x, att, g, qwen=False)
    assert_matches(res, ref)
    assert len(res.keep) == int(169 * 0.10) * 32  # per-segment budgets keep exactly R per frame


@pytest.mark.parametrize("ignore", [0.95, None, 0.999])
def test_qwen_rules_equal_reference(ignore):
    planned = [3, 1, 6, 2, 4]  # 16 temporal patches
    x, att, g = synthetic(6, frames=16, per_frame=100, planned=planned)
    g[4] = g[3] + 1e-4  # a near-duplicate pair inside a segment
    method = FastVID(retention=0.27, tau=0.84, ignore=ignore)
    res = run_method(method, x, att, g, "qwen")
    ref = ref_segment_rules(x, att, g, qwen=True, r=0.27, tau=0.84, ignore=ignore)
    assert_matches(res, ref)


def test_seed_and_noise():
    x, att, g = synthetic(7, frames=16, per_frame=100, planned=[3, 1, 6, 2, 4])
    a = run_method(FastVID(retention=0.10, seed=3), x, att, g, "onevision")
    b = run_method(FastVID(retention=0.10, seed=3), x, att, g, "onevision")
    assert torch.equal(a.keep, b.keep) and torch.equal(a.rows, b.rows)
    quiet = run_method(FastVID(retention=0.10, density_noise=0.0), x, att, g, "onevision")
    assert_matches(quiet, ref_onevision(x, att, g, noise_scale=0.0))


def test_bad_kwargs_name_the_kwarg():
    for kw in [dict(rules="ov"), dict(tau=2.0), dict(context_ratio=1.5), dict(anchor_stride=0),
               dict(min_segments=0), dict(beta=-0.1), dict(ignore=3.0), dict(density_noise=-1.0)]:
        with pytest.raises(ValueError, match=next(iter(kw))):
            FastVID(**kw)


def test_family_defaults():
    ov = sharp.resolve_method("fastvid", "tiny_llava_onevision", 0.10).method
    vid = sharp.resolve_method("fastvid", "tiny_llava_video", 0.10).method
    qwen = sharp.resolve_method("fastvid", "tiny_qwen2_5_vl", 0.10).method
    assert (ov.rules, ov.tau, ov.ignore, ov.positions) == ("onevision", 0.9, None, "original")
    assert vid.rules == "llava_video"
    assert (qwen.rules, qwen.tau, qwen.ignore) == ("qwen", 0.84, 0.95)
    for name in ("tiny_qwen2_vl", "tiny_qwen3_vl"):
        m = sharp.resolve_method("fastvid", name, 0.10).method
        assert (m.rules, m.tau, m.ignore) == ("qwen", 0.84, 0.95)


# -- the vision-side inputs ---------------------------------------------------------------------------


@sharp.register_method
class _FramePoolingProbe(FastVID):
    """Test-only: FastVID that also keeps ctx.frame_pooling on its trace."""

    name = "_fastvid_pooling_probe"

    def select(self, ctx):
        self_pool = ctx.frame_pooling("feature")
        ctx.trace.pooling = self_pool
        return super().select(ctx)


def video_inputs(bb, frames, seeds=(1,)):
    return random_video_inputs(bb, seeds, frames)


def hand_head_ov(bb, inputs):
    """Post-LN + MAP head by hand on the tower's feature-layer hidden states: (g (b,T,d), a (b, N))."""
    head, _ = bb.pooling_head()
    pv = inputs["pixel_values_videos"]
    b = pv.shape[0]
    tower = bb.model.model.vision_tower
    with torch.no_grad():
        hs = tower(pv.flatten(0, 1), output_hidden_states=True).hidden_states[bb.feature_layer + 1]
        x = F.layer_norm(hs, hs.shape[-1:], head.post_layernorm.weight, head.post_layernorm.bias,
                         head.post_layernorm.eps)
        dim = x.shape[-1]
        heads = head.attention.num_heads
        wq, wk, wv = head.attention.in_proj_weight.split(dim)
        bq, bk, bv = head.attention.in_proj_bias.split(dim)
        q = (head.probe[0] @ wq.T + bq).reshape(1, heads, -1)  # (1, h, hd)
        k = (x @ wk.T + bk).reshape(x.shape[0], x.shape[1], heads, -1)
        v = (x @ wv.T + bv).reshape(x.shape[0], x.shape[1], heads, -1)
        logits = torch.einsum("qhd,nphd->nhp", q, k) / math.sqrt(dim // heads)
        probs = logits.softmax(-1)  # (n, h, P)
        ctx_ = torch.einsum("nhp,nphd->nhd", probs, v).reshape(x.shape[0], dim)
        out = head.attention.out_proj(ctx_)
        y = head.layernorm(out)
        pooled = out + head.fc2(F.gelu(head.fc1(y), approximate="tanh"))
        att = probs.mean(1)  # (n, P)
        side = math.isqrt(att.shape[1])
        grid = att.reshape(-1, 1, side, side)
        pooled_att = F.interpolate(grid, size=(math.ceil(side / 2),) * 2, mode="bilinear")
    return pooled.reshape(b, -1, dim), pooled_att.reshape(b, -1)


def test_frame_pooling_ov_equals_hand_computed_head():
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = video_inputs(bb, 8, seeds=(1, 2))
    with torch.no_grad(), sharp.prune(bb, "_fastvid_pooling_probe", 0.25) as trace:
        bb.model(**inputs)
    pooling = trace.method("_fastvid_pooling_probe").pooling
    g, a = hand_head_ov(bb, inputs)
    torch.testing.assert_close(pooling.global_features, g.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooling.attention, a.float(), rtol=1e-5, atol=1e-6)
    assert pooling.source == "random (seed 0)"
    assert trace.method("_fastvid_pooling_probe").pooling_source == "random (seed 0)"


def test_frame_pooling_qwen_equals_hand_computed_mean_query_attention():
    bb = shared_backbone("tiny_qwen2_vl", "eager")
    inputs = video_inputs(bb, 8)
    with torch.no_grad(), sharp.prune(bb, "_fastvid_pooling_probe", 0.25) as trace:
        bb.model(**inputs)
    pooling = trace.method("_fastvid_pooling_probe").pooling
    assert pooling.global_features is None
    vis = bb.model.model.visual
    block = vis.blocks[-1]
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"], kw=kw),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            vis(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    finally:
        hook.remove()
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    with torch.no_grad():
        xq = seen["x"]
        qkv = block.attn.qkv(block.norm1(xq)).reshape(xq.shape[0], 3, block.attn.num_heads, -1)
        cos, sin = seen["kw"]["position_embeddings"]
        q, k = mq.apply_rotary_pos_emb_vision(qkv[:, 0].float(), qkv[:, 1].float(), cos, sin)
        t, h, w = inputs["video_grid_thw"][0].tolist()
        rows = h * w
        out = []
        for c in range(t):
            qs, ks = q[c * rows:(c + 1) * rows], k[c * rows:(c + 1) * rows]
            qm = qs.mean(0)  # (heads, hd)
            kg = ks.reshape(rows // 4, 4, *ks.shape[1:]).mean(1)  # (G, heads, hd)
            logits = (kg * qm[None]).sum(-1).T * block.attn.head_dim ** -0.5  # (heads, G)
            out.append(logits.softmax(-1).mean(0))
    torch.testing.assert_close(pooling.attention[0], torch.cat(out), rtol=1e-5, atol=1e-6)


def test_end_to_end_tiny_ov_equals_reference():
    """Through sharp.prune: kept indices and the rows entering layer 0 equal the OV reference computed
    from the unpruned layer-0 input and the hand-computed head (16 frames, c = 3: multi-frame segments)."""
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = video_inputs(bb, 16)
    layout = bb.layout(inputs)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    hook = bb.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        hook.remove()
    with torch.no_grad(), sharp.prune(bb, "fastvid", 0.5, min_segments=3) as trace:
        hook = bb.layers[0].register_forward_pre_hook(grab, with_kwargs=True)  # after the engine's stage
        try:
            bb.model(**inputs)
        finally:
            hook.remove()
    full, pruned = seen["x"]
    vis_pos = bb.visual_mask(inputs["input_ids"], layout)[0].nonzero().squeeze(1)
    x = full[0, vis_pos].reshape(layout.frames, layout.tokens_per_frame, -1).numpy()
    g, a = hand_head_ov(bb, inputs)
    ref = ref_onevision(x, a[0].reshape(layout.frames, -1).numpy(), g[0].numpy(), r=0.5, c=3)
    assert any(n > 1 for n in ref["sizes"])
    assert trace.kept[0][0].tolist() == ref["keep"]
    # the rows entering layer 0: salient rows unchanged, anchors merged, text untouched
    start = int(vis_pos[0])
    kept_rows = pruned[0, start:start + len(ref["keep"])].numpy()
    for row, i in zip(kept_rows, ref["keep"]):
        expected = ref["anchors"].get(i, x.reshape(-1, x.shape[-1])[i])
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)
    assert trace.visual_tokens_per_layer[0] == len(ref["keep"])


# -- the hub head ---------------------------------------------------------------------------------------


def test_hub_head_loads_siglip_checkpoint_names():
    """SiglipPoolingHead loads a SigLIP checkpoint's head / post_layernorm tensors (HF names) and gives
    the HF head's pooled output."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from sharp.backbones.vision import random_pooling_head

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                             image_size=28, patch_size=14, vision_use_head=True)
    torch.manual_seed(0)
    hf = SiglipVisionModel(cfg).eval()
    # the hub file holds the whole SigLIP (text_model.*, vision_model.*); transformers 5 names the
    # vision model's own keys without the prefix
    full = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in hf.state_dict().items()}
    tensors = {k: v for k, v in full.items()
               if k.startswith("vision_model.head.") or k.startswith("vision_model.post_layernorm.")}
    assert len(tensors) == 13
    head = random_pooling_head(cfg, seed=5)
    head.load_checkpoint_tensors(tensors)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        pooled, att = head(x)
        tower = getattr(hf, "vision_model", hf)  # transformers 4.57: .vision_model; 5.x: the model itself
        ref = tower.head(tower.post_layernorm(x))
    torch.testing.assert_close(pooled, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att.sum(-1), torch.ones(3))


def test_pretrained_backbone_without_the_hub_head_fails_clearly(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    bb = sharp.load_backbone("tiny_llava_onevision", device="cpu")
    bb.pretrained = True  # as if loaded from the hub
    with pytest.raises(RuntimeError, match="google/siglip-so400m-patch14-384"):
        bb.pooling_head()
