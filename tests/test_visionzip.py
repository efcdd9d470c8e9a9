"""VisionZip and visionzip_sharp (baselines/visionzip.py) against independent references.

References: the vision tower's own eager attention weights (SigLIP: ``output_attentions``; Qwen2-VL:
transformers' ``eager_attention_forward`` recorded), its keys recomputed from the layer's input,
mapped with F.interpolate (LLaVA-OV) or a 4-patch mean (Qwen2-VL); the selection and the merged
rows by a plain-loop VisionZip over those maps; hand-made groups with hand-computed results.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sharp
from baselines.visionzip import dominant_split, visionzip_group, visionzip_groups
from sharp import split_budget
from sharp import flops
from sharp.methods import budget
from engine_reference import layer_input
from conftest import shared_backbone, random_video_inputs
from sharp.backbones import compat

NAMES = ["tiny_llava_onevision", "tiny_qwen2_vl"]
FRAMES = 8


def backbone(name):
    return shared_backbone(name, "eager")


def is_ov(bb) -> bool:
    return isinstance(bb, sharp.backbones.LlavaOneVisionBackbone)


def native_kwargs(bb) -> dict:
    """Qwen2-VL has M-RoPE: no compacted positions."""
    return {} if is_ov(bb) else {"positions": "original"}


def video_inputs(bb, seeds=(1,)):
    return random_video_inputs(bb, seeds, FRAMES)


# -- independent vision references ----------------------------------------------------------------


def _pool_ov(x: torch.Tensor, b: int) -> torch.Tensor:
    """(b*T, P, C) -> (b, T * ceil(s/2)^2, C): LLaVA-OV's bilinear pooling of each frame's s x s grid."""
    n, p, c = x.shape
    s = math.isqrt(p)
    grid = x.reshape(n, s, s, c).permute(0, 3, 1, 2)
    y = F.interpolate(grid, size=(math.ceil(s / 2), math.ceil(s / 2)), mode="bilinear")
    return y.permute(0, 2, 3, 1).reshape(b, -1, c)


def reference_maps_ov(bb, inputs):
    """(attention (b, N), keys (b, N, h)) of SigLIP's last layer (OV's feature layer), eager weights."""
    pv = inputs["pixel_values_videos"]
    b = pv.shape[0]
    tower = bb.model.model.vision_tower
    layer = len(compat.siglip_encoder(tower).layers) - 1  # vision_feature_layer -1
    with torch.no_grad():
        out = tower(pv.flatten(0, 1), output_hidden_states=True, output_attentions=True)
        block = compat.siglip_encoder(tower).layers[layer]
        x = out.hidden_states[layer]
        k = block.self_attn.k_proj(block.layer_norm1(x)).view(*x.shape[:2], block.self_attn.num_heads, -1).mean(2)
    received = out.attentions[layer].mean(dim=(1, 2))  # (b*T, P): heads and queries
    return _pool_ov(received[..., None], b)[..., 0], _pool_ov(k, b)


def reference_maps_qwen(bb, inputs, monkeypatch):
    """(attention (b, N), keys (b, N, h)) of vision block depth-2 (EffiVLM-Bench's block 30 of 32):
    the eager weights of each temporal patch, heads and queries averaged, 4-patch merger groups."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    vis = bb.model.model.visual
    layer = len(vis.blocks) - 2
    recorded, original = [], mq.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module is vis.blocks[layer].attn:
            recorded.append(weights.detach())
        return out, weights

    captured = {}
    hook = vis.blocks[layer].register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0]), with_kwargs=True)
    monkeypatch.setattr(mq, "eager_attention_forward", recording)
    try:
        with torch.no_grad():
            vis(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
            block = vis.blocks[layer]
            qkv = block.attn.qkv(block.norm1(captured["x"])).reshape(captured["x"].shape[0], 3, block.attn.num_heads, -1)
    finally:
        hook.remove()
        monkeypatch.setattr(mq, "eager_attention_forward", original)
    b = inputs["video_grid_thw"].shape[0]
    received = torch.cat([w.mean(dim=(0, 1, 2)) for w in recorded])  # (rows,)
    keys = qkv[:, 1].mean(dim=1)  # (rows, head_dim), before the rotary embedding
    return received.reshape(b, -1, 4).mean(2), keys.reshape(b, -1, 4, keys.shape[-1]).mean(2)


def reference_maps(bb, inputs, monkeypatch):
    return reference_maps_ov(bb, inputs) if is_ov(bb) else reference_maps_qwen(bb, inputs, monkeypatch)


def reference_visionzip(att, keys, emb, groups, budgets, ratio):
    """Plain-loop VisionZip over groups of original indices: (dominant, targets, {target: row})."""
    dominant, targets, rows = [], [], {}
    for g, k in zip(groups, budgets):
        d = math.floor(k * ratio)
        c = k - d
        ranked = sorted(g, key=lambda j: -float(att[j]))
        dom = sorted(ranked[:d])
        rest = [j for j in g if j not in dom]
        step = max(1, len(rest) // c)
        tg = rest[::step][:c]
        assigned = {t: [] for t in tg}
        for j in rest:
            if j not in tg:
                cos = [float(F.cosine_similarity(keys[j].float(), keys[t].float(), dim=0)) for t in tg]
                assigned[tg[cos.index(max(cos))]].append(j)
        for t in tg:
            extra = torch.stack([emb[j] for j in assigned[t]]).float().mean(0) if assigned[t] else 0.0
            rows[t] = emb[t].float() + extra
        dominant += dom
        targets += tg
    return sorted(dominant), sorted(targets), rows


# -- hand-made groups --------------------------------------------------------------------------------


def test_dominant_split_and_frame_budgets_by_hand():
    assert dominant_split(25, 54 / 64) == (21, 4)  # 12.8% of a 196-token frame
    assert dominant_split(26, 54 / 64) == (21, 5)
    assert dominant_split(64, 54 / 64) == (54, 10)  # the README's 54 + 10
    assert dominant_split(1, 54 / 64) == (0, 1) and dominant_split(4, 1.0) == (4, 0)
    # 803 = round(0.128 x 6272) over 32 frames of 196: floor(803 (f+1) / 32) - floor(803 f / 32)
    per_frame = split_budget(803, [196] * 32)
    assert sum(per_frame) == 803 and [f for f, k in enumerate(per_frame) if k == 26] == [10, 21, 31]
    assert split_budget(800, [196] * 32) == [25] * 32
    assert split_budget(26, [16] * 8) == [3, 3, 3, 4, 3, 3, 3, 4]
    assert split_budget(5, [2, 0, 8]) == [1, 0, 4] and split_budget(3, [0, 0]) == [0, 0]


def _hand_group():
    attention = torch.tensor([0.10, 0.30, 0.05, 0.02, 0.25, 0.08, 0.20])
    hidden = torch.tensor([[float(j), 10.0 * j] for j in range(7)])
    keys = torch.tensor([[1.0, 0.0], [5.0, 5.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.1, 3.0], [1.0, 1.2]])
    return attention, keys, hidden


def test_group_by_hand():
    attention, keys, hidden = _hand_group()
    # k = 4, ratio 1/2: d = 2 dominant = the top-2 attention {1, 4}; rest [0, 2, 3, 5, 6], c = 2 targets
    # at stride 5 // 2 = 2: rest[0], rest[2] = tokens 0 and 3; token 2 -> 0, 5 -> 3, 6 -> 3 (cos 0.77 > 0.64)
    res = visionzip_group(attention, keys, hidden, 4, 0.5)
    assert res.dominant.tolist() == [1, 4] and res.targets.tolist() == [0, 3]
    assert res.absorbed.tolist() == [[2, 0], [5, 3], [6, 3]]
    torch.testing.assert_close(res.rows, torch.tensor([[0 + 2.0, 0 + 20.0], [3 + 5.5, 30 + 55.0]]))
    # token 6 pointing at target 0 instead: target 3 keeps only token 5, target 0 averages 2 and 6
    keys[6] = torch.tensor([1.0, 0.5])
    res = visionzip_group(attention, keys, hidden, 4, 0.5)
    assert res.absorbed.tolist() == [[2, 0], [5, 3], [6, 0]]
    torch.testing.assert_close(res.rows, torch.tensor([[0 + 4.0, 0 + 40.0], [3 + 5.0, 30 + 50.0]]))
    # a target nobody joins is unchanged (x_t + 0): every non-target key points at token 0
    keys[5] = keys[6] = torch.tensor([1.0, 0.0])
    res = visionzip_group(attention, keys, hidden, 4, 0.5)
    torch.testing.assert_close(res.rows[1], hidden[3])
    # ratio 1: attention top-k only, nothing merged; k = n: every token kept, nothing merged
    res = visionzip_group(attention, keys, hidden, 3, 1.0)
    assert res.dominant.tolist() == [1, 4, 6] and len(res.targets) == 0 and len(res.absorbed) == 0
    res = visionzip_group(attention, keys, hidden, 7)
    assert sorted(res.dominant.tolist() + res.targets.tolist()) == list(range(7)) and len(res.absorbed) == 0
    with pytest.raises(ValueError, match="budget must be in 0..7"):
        visionzip_group(attention, keys, hidden, 8)


@pytest.mark.parametrize("seed", range(6))
def test_groups_at_once_equal_one_by_one(seed):
    """visionzip_groups (LLaVA-OV's frames together) = visionzip_group on each group alone, exactly:
    random groups, and groups with tied attention and identical keys (ties broken the same way)."""
    gen = torch.Generator().manual_seed(seed)
    g, n = 5, 9 + 7 * seed
    attention, keys, hidden = torch.rand(g, n, generator=gen), torch.randn(g, n, 6, generator=gen), \
        torch.randn(g, n, 8, generator=gen)
    if seed % 2:
        attention[1:3] = 0.5  # ties
        keys[2:4] = 1.0  # identical keys: every similarity ties
    for k, ratio in ((n // 3, 54 / 64), (n // 2, 0.5), (n, 0.5), (0, 0.5), (n - 1, 0.0), (n // 2, 1.0)):
        batch = visionzip_groups(attention, keys, hidden, k, ratio)
        for i in range(g):
            one = visionzip_group(attention[i], keys[i], hidden[i], k, ratio)
            for field in ("dominant", "targets", "absorbed", "rows"):
                assert torch.equal(getattr(batch, field)[i], getattr(one, field)), (k, ratio, i, field)



@pytest.mark.parametrize("seed", range(6))
def test_groups_over_flat_rows_equal_gathered_groups(seed):
    """visionzip_groups on the rows themselves (``index``: each group's rows, ascending inside the group,
    groups in any order, rows outside every group) = on the gathered (G, n, D) groups, exactly: the
    contextual sums add the same rows in the same order."""
    gen = torch.Generator().manual_seed(100 + seed)
    g, n, width = 4, 8 + 5 * seed, 16
    rows = torch.randn(g * n + 11, width, generator=gen)  # 11 rows in no group
    index = torch.randperm(len(rows), generator=gen)[: g * n].view(g, n).sort(dim=1).values  # (G, n) ascending
    attention, keys = torch.rand(g, n, generator=gen), torch.randn(g, n, 6, generator=gen)
    if seed % 2:
        keys[1] = 1.0  # every similarity of group 1 ties
    for k, ratio in ((n // 3, 54 / 64), (n // 2, 0.5), (n, 0.5), (n // 2, 1.0), (n - 1, 0.0)):
        flat = visionzip_groups(attention, keys, rows, k, ratio, index=index)
        gathered = visionzip_groups(attention, keys, rows[index], k, ratio)
        for field in ("dominant", "targets", "absorbed", "rows"):
            assert torch.equal(getattr(flat, field), getattr(gathered, field)), (k, ratio, field)
        for i in range(g):  # each contextual row by a plain loop: its target's row + the mean of its tokens
            for j, t in enumerate(flat.targets[i].tolist()):
                absorbed = [int(o) for o, tt in flat.absorbed[i].tolist() if tt == t]
                want = rows[index[i, t]].clone()
                if absorbed:
                    total = torch.zeros(width)
                    for o in absorbed:  # in sequence order, as the official sum
                        total += rows[index[i, o]]
                    want += total / len(absorbed)
                torch.testing.assert_close(flat.rows[i, j], want, rtol=0, atol=1e-6)

def test_context_rows_view_or_gather():
    """StageContext.rows: hidden_states[b, positions] for any positions; one ascending run is a view
    (no copy, the same storage), anything else the gathered rows."""
    from types import SimpleNamespace
    from sharp.engine.context import StageContext

    hidden = torch.randn(2, 30, 4)
    ctx = SimpleNamespace(hidden_states=hidden)
    run = torch.arange(5, 17).view(3, 4)
    got = StageContext.rows(ctx, 1, run)
    assert torch.equal(got, hidden[1, run]) and got.data_ptr() == hidden[1, 5].data_ptr()
    for positions in (torch.tensor([[5, 6], [8, 9]]), torch.tensor([3, 2, 4]), torch.tensor([7]), torch.tensor([], dtype=torch.long)):
        assert torch.equal(StageContext.rows(ctx, 0, positions), hidden[0, positions])


# -- the method against the eager vision attention -----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("retention,ratio", [(0.5, 54 / 64), (0.25, 0.5)])
def test_selection_and_rows_equal_eager_reference(name, retention, ratio, monkeypatch):
    """Dominant set = top-k of the eager vision attention; targets, merged rows = the plain-loop
    VisionZip on the eager maps and the vanilla input embeddings; two different videos in a batch."""
    bb = backbone(name)
    inputs = video_inputs(bb, seeds=(1, 2))
    layout = bb.layout(inputs)
    att, keys = reference_maps(bb, inputs, monkeypatch)
    emb, _ = layer_input(bb, inputs)
    got, trace = layer_input(bb, inputs, "visionzip", retention, dominant_ratio=ratio, **native_kwargs(bb))
    t = trace.method("visionzip")
    assert t.vision_layer == ("feature" if is_ov(bb) else -2) and t.scope == ("frame" if is_ov(bb) else "video")
    n, per = layout.n_visual, layout.tokens_per_frame
    k = budget(n, retention)
    # OV per frame (budgets divisible by the frames here), Qwen2-VL one group
    groups = [list(range(f * per, (f + 1) * per)) for f in range(layout.frames)] if is_ov(bb) else [list(range(n))]
    budgets = [k // len(groups)] * len(groups)
    assert sum(budgets) == k
    vis = bb.visual_mask(inputs["input_ids"], layout)
    start = int(vis[0].nonzero()[0])
    for b in range(2):
        dominant, targets, rows = reference_visionzip(att[b], keys[b], emb[b, vis[b]], groups, budgets, ratio)
        assert t.dominant[b].tolist() == dominant
        assert t.contextual[b].tolist() == targets
        kept = trace.kept[0][b].tolist()
        assert kept == sorted(dominant + targets) and len(kept) == k
        visual_rows = got[b, start:start + k]  # the pruned layer-0 input: text, kept visual tokens, text
        for i, j in enumerate(kept):
            want = rows[j] if j in rows else emb[b, vis[b]][j].float()
            torch.testing.assert_close(visual_rows[i].float(), want, atol=1e-5, rtol=1e-5)
    assert trace.stage_layers == [0] and trace.visual_tokens_per_layer == [k] * bb.num_layers


@pytest.mark.parametrize("name", NAMES)
def test_scope_and_layer_kwargs_change_the_selection(name, monkeypatch):
    """The other port's grouping and a non-default layer select what their reference says."""
    bb = backbone(name)
    inputs = video_inputs(bb)
    layout = bb.layout(inputs)
    att, _ = reference_maps(bb, inputs, monkeypatch)
    k = budget(layout.n_visual, 0.25)
    d = dominant_split(k, 54 / 64)[0]
    other = "video" if is_ov(bb) else "frame"
    _, trace = layer_input(bb, inputs, "visionzip", 0.25, scope=other, **native_kwargs(bb))
    got = trace.method("visionzip").dominant[0].tolist()
    if other == "video":
        assert got == sorted(torch.topk(att[0], d).indices.tolist())
    else:
        per, k_f = layout.tokens_per_frame, k // layout.frames
        want = [f * per + j for f in range(layout.frames)
                for j in torch.topk(att[0, f * per:(f + 1) * per], dominant_split(k_f, 54 / 64)[0]).indices.tolist()]
        assert got == sorted(want)
    # the default layer's ranking is not the other layer's (the layer choice is tested above)
    port = len(bb.vision_layers) - 1 if is_ov(bb) else len(bb.vision_layers) - 2
    _, t2 = layer_input(bb, inputs, "visionzip", 0.25, vision_layer=1 - port, **native_kwargs(bb))
    _, t1 = layer_input(bb, inputs, "visionzip", 0.25, **native_kwargs(bb))
    assert t2.method("visionzip").dominant[0].tolist() != t1.method("visionzip").dominant[0].tolist()


# -- visionzip_sharp ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_visionzip_sharp_keeps_both_budgets(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=FRAMES, seed=21)
    layout = bb.layout(inputs)
    n = layout.n_visual
    kw = {"visionzip": native_kwargs(bb), "sharp": {"cache_dir": ""}}
    with sharp.prune(bb, "visionzip_sharp", 0.2, **kw) as trace, torch.no_grad():
        bb.model(**inputs)
    zipped, pruned = trace.kept
    assert trace.stage_owners == ["visionzip", "sharp"] and trace.stage_layers == [0, 1]
    assert len(zipped[0]) == budget(n, 0.2) and len(pruned[0]) == budget(n, 0.124)
    assert bool(torch.isin(pruned[0], zipped[0]).all())
    assert trace.visual_tokens_per_layer == [budget(n, 0.2)] + [budget(n, 0.124)] * (bb.num_layers - 1)
    if is_ov(bb):  # per frame: round(0.2 x 128) = 26 over 8 frames of 16 -> 3, 3, 3, 4, 3, 3, 3, 4
        frames = torch.bincount(zipped[0] // layout.tokens_per_frame, minlength=layout.frames)
        assert frames.tolist() == [3, 3, 3, 4, 3, 3, 3, 4]


def test_visionzip_sharp_child_kwargs():
    m = sharp.make_method("visionzip_sharp", 0.3, visionzip={"dominant_ratio": 0.5}, sharp={"lam": 0.5})
    vz, sh = m.flat_children()
    assert (vz.retention, vz.dominant_ratio, sh.retention, sh.lam, sh.layer) == (0.3, 0.5, 0.124, 0.5, 1)
    sh = sharp.make_method("visionzip_sharp", 0.2, sharp={"retention": 0.1}).flat_children()[1]
    assert sh.retention == 0.1
    with pytest.raises(TypeError, match="visionzip, sharp"):
        sharp.make_method("visionzip_sharp", 0.2, dominant_ratio=0.5)


def test_compact_visionzip_then_sharp_keeps_the_compact_positions():
    """VisionZip (compact, LLaVA-OV's port) then ShaRP (original): from layer 1 on the kept tokens keep
    the positions VisionZip numbered 0..len-1, in prefill and in decode."""
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=FRAMES, seed=22)
    layout = bb.layout(inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)[0]
    start, s = int(vis.nonzero()[0]), inputs["input_ids"].shape[1]
    seen = []
    with sharp.prune(bb, "visionzip_sharp", 0.25, sharp={"cache_dir": ""}) as trace:
        h = bb.layers[1].register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_embeddings"][0][0].clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                bb.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            h.remove()
    zipped, pruned = trace.kept[0][0], trace.kept[1][0]
    k0 = len(zipped)
    rank = {int(j): start + i for i, j in enumerate(zipped.tolist())}  # position in VisionZip's sequence
    tail = s - start - layout.n_visual
    want = list(range(start)) + [rank[int(j)] for j in pruned] + [start + k0 + i for i in range(tail)]
    probe = torch.zeros(1, 1, bb.text_config.hidden_size)
    cos = bb.language_model.rotary_emb(probe, torch.tensor([want + [start + k0 + tail]]))[0][0]
    torch.testing.assert_close(seen[0], cos[:-1])  # prefill, layer 1
    torch.testing.assert_close(seen[1], cos[-1:])  # first decode step: position = compact length


# -- FLOPs (Table 3) ---------------------------------------------------------------------------------


def _paper_tflops(schedule):
    dims = flops.lm_dims("llava_onevision_7b")
    d, m = dims.hidden, dims.ffn
    return sum(4 * k * d * d + 2 * k * k * d + 2 * k * d * m for k in schedule) / 1e12


def test_table3_tflops():
    n = 6272  # 32 frames x 196
    got = flops.prefill_tflops("llava_onevision_7b", "visionzip", 0.128, visual_tokens=n)
    assert flops.token_schedule("llava_onevision_7b", "visionzip", 0.128, visual_tokens=n) == [803] * 28
    assert got == pytest.approx(_paper_tflops([803] * 28), rel=1e-12)
    assert got == pytest.approx(4.3, rel=0.05)  # 4.34
    exact = flops.prefill_tflops("llava_onevision_7b", "visionzip", 25 / 196, visual_tokens=n)
    assert round(exact, 2) == 4.32  # the official 25 tokens per frame
    combo = flops.prefill_tflops("llava_onevision_7b", "visionzip_sharp", 0.2, visual_tokens=n)
    assert combo == pytest.approx(_paper_tflops([1254] + [778] * 27), rel=1e-12)
    assert combo == pytest.approx(4.3, rel=0.05)  # 4.29


# -- errors ------------------------------------------------------------------------------------------


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="scope must be one of 'auto', 'frame', 'video', got 'clip'"):
        sharp.make_method("visionzip", 0.2, scope="clip")
    with pytest.raises(ValueError, match=r"dominant_ratio must be in \[0, 1\]"):
        sharp.make_method("visionzip", 0.2, dominant_ratio=1.5)
    with pytest.raises(ValueError, match="vision_layer must be None .* 'feature', got 'last'"):
        sharp.make_method("visionzip", 0.2, vision_layer="last")
    # the official compact numbering, asked for explicitly on M-RoPE
    with pytest.raises(ValueError, match="positions='compact' needs 1-D RoPE"), \
            sharp.prune(backbone("tiny_qwen2_vl"), "visionzip", 0.2, positions="compact"):
        pass
    with pytest.raises(ValueError, match="vision layer"), sharp.prune(backbone("tiny_llava_onevision"), "visionzip",
                                                                      0.2, vision_layer=7):
        pass


# -- Table 3's cell: the port's exact count -----------------------------------------------------------


def test_table3_cell_keeps_the_ports_800_tokens():
    """HoliTom's OV port (``visionzip/llava_arch.py``) with SPATIAL_TOKENS = 25 keeps 25 per frame, of
    which int(25 x 54 / 64) = 21 dominant and 4 contextual: 32 x 25 = 800 of 32 x 196 (12.76 %, the
    table's "12.8 %"). The Table 3 sweep cell must keep exactly that, frame by frame."""
    from sharp.harness.config import cell_from_cfg, cell_overrides, compose, load_sweep
    from baselines.visionzip import dominant_split
    from sharp import split_budget

    sweep = load_sweep("table3")
    index = [c["method"] for c in sweep["cells"]].index("visionzip")
    cell = cell_from_cfg(compose(cell_overrides(sweep, index)))
    frames, per_frame, spatial_tokens = 32, 196, 25  # the port's settings (official formula below)
    official_total = frames * spatial_tokens
    official_split = (int(spatial_tokens * 54 / 64), spatial_tokens - int(spatial_tokens * 54 / 64))
    assert (official_total, official_split) == (800, (21, 4))
    n = frames * per_frame
    k = budget(n, cell.retention)
    assert k == official_total
    per = split_budget(k, [per_frame] * frames)
    assert per == [spatial_tokens] * frames and {dominant_split(q, 54 / 64) for q in per} == {official_split}
    assert flops.token_schedule("llava_onevision_7b", "visionzip", cell.retention, visual_tokens=n) == [800] * 28
