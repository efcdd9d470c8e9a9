"""Vision-tower maps (Backbone.vision_maps) against independent references on the tiny backbones.

The references are written here without the backbone's helpers: the tower's own hidden states /
eager attention weights, mapped with F.interpolate (LLaVA-OV) or reshape-and-mean (Qwen2-VL).
Captured layer calls come from hooks like the engine's (args, kwargs, output of one layer).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_video_inputs
import sharp
from sharp.backbones import VisionMaps
from sharp.backbones.vision import ATTENTION_BUDGET, chunk_groups, received_attention
from sharp.backbones import compat

import compat_helpers

NAMES = ["tiny_llava_onevision", "tiny_qwen2_vl"]
FRAMES = 4  # LLaVA-OV: 4 frames of 8x8 patches; Qwen2-VL: 2 temporal patches of 8x8 patches
_EAGER: dict = {}


@pytest.fixture(scope="module", params=[(n, a) for n in NAMES for a in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def bb(request):
    name, attn = request.param
    return sharp.load_backbone(name, attn_implementation=attn, device="cpu")


def eager_twin(bb):
    """The same weights with eager attention everywhere (the reference's attention weights)."""
    if bb.name not in _EAGER:
        _EAGER[bb.name] = sharp.load_backbone(bb.name, attn_implementation="eager", device="cpu")
    ref = _EAGER[bb.name]
    state, ref_state = bb.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    return ref


def video_inputs(bb, seeds=(1, 2)):
    return random_video_inputs(bb, seeds, FRAMES)


class _Captured(Exception):
    pass


def capture(bb, layer: int, inputs: dict) -> dict:
    """{"args", "kwargs", "output"} of vision layer ``layer``'s call during a prefill (as the engine)."""
    box: dict = {}
    module = bb.vision_layers[layer]

    def pre(mod, args, kwargs):
        box["args"], box["kwargs"] = args, kwargs

    def post(mod, args, output):
        box["output"] = output
        raise _Captured  # the rest of the prefill is not needed here

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            bb.model(**inputs)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return box


# -- independent references -------------------------------------------------------------------


def _pool_ov(x: torch.Tensor, b: int) -> torch.Tensor:
    """(b*T, P, C) -> (b, T * ceil(s/2)^2, C): bilinear on each frame's s x s grid, every channel."""
    n, p, c = x.shape
    s = math.isqrt(p)
    grid = x.reshape(n, s, s, c).permute(0, 3, 1, 2)
    y = F.interpolate(grid, size=(math.ceil(s / 2), math.ceil(s / 2)), mode="bilinear")
    return y.permute(0, 2, 3, 1).reshape(b, -1, c)


def reference_ov(ref, layer: int, inputs: dict) -> VisionMaps:
    pv = inputs["pixel_values_videos"]
    b = pv.shape[0]
    with torch.no_grad():
        out = ref.model.model.vision_tower(pv.flatten(0, 1), output_hidden_states=True, output_attentions=True)
        block = compat.siglip_encoder(ref.model.model.vision_tower).layers[layer]
        x = out.hidden_states[layer]  # input of the layer, (b*T, P, d)
        k = block.self_attn.k_proj(block.layer_norm1(x))
        k = k.view(*x.shape[:2], block.self_attn.num_heads, -1).mean(dim=2)
    received = out.attentions[layer].mean(dim=(1, 2))  # (b*T, P): mean over heads and queries
    return VisionMaps(hidden=_pool_ov(out.hidden_states[layer + 1], b), keys=_pool_ov(k, b),
                      attention=_pool_ov(received[..., None], b)[..., 0])


def _merge_qwen(x: torch.Tensor, b: int) -> torch.Tensor:
    """(N, C) -> (b, N / 4 / b, C): the merger's 4 consecutive patches, mean."""
    return x.reshape(b, -1, 4, x.shape[-1]).mean(dim=2)


def _vision_rope_of(vis, pv, thw):
    """The (cos, sin) the tower gives its blocks (4.57 computes them from ``rot_pos_emb``, 5.x from
    its ``rotary_pos_emb`` module): read off block 0's call."""
    got = {}
    handle = vis.blocks[0].register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    try:
        vis(pv, grid_thw=thw)
    finally:
        handle.remove()
    if got.get("position_embeddings") is not None:
        return got["position_embeddings"]
    emb = torch.cat((got["rotary_pos_emb"], got["rotary_pos_emb"]), dim=-1)
    return emb.cos(), emb.sin()


def reference_qwen(ref, layer: int, inputs: dict, monkeypatch) -> VisionMaps:
    """The tower run block by block (its own rotary / cu_seqlens recipe), with the eager attention
    weights of block ``layer`` recorded from transformers' eager_attention_forward."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    vis = ref.model.model.visual
    target = vis.blocks[layer].attn
    recorded = []
    original = mq.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module is target:
            recorded.append(weights.detach())
        return out, weights

    monkeypatch.setattr(mq, "eager_attention_forward", recording)
    pv, thw = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    b = thw.shape[0]
    with torch.no_grad():
        cos, sin = _vision_rope_of(vis, pv, thw)
        recorded.clear()  # that whole-tower call recorded the target block too
        x = vis.patch_embed(pv)
        cu = F.pad(torch.repeat_interleave(thw[:, 1] * thw[:, 2], thw[:, 0]).cumsum(0, dtype=torch.int32), (1, 0))
        for block in vis.blocks[: layer + 1]:
            x_in = x
            x = block(x, cu_seqlens=cu, position_embeddings=(cos, sin))
        qkv = block.attn.qkv(block.norm1(x_in)).reshape(x.shape[0], 3, block.attn.num_heads, -1)
    monkeypatch.setattr(mq, "eager_attention_forward", original)
    assert len(recorded) == len(cu) - 1  # one call per temporal patch
    received = torch.cat([w.mean(dim=(0, 1, 2)) for w in recorded])  # (N,)
    return VisionMaps(hidden=_merge_qwen(x, b), keys=_merge_qwen(qkv[:, 1].mean(dim=1), b),
                      attention=_merge_qwen(received[:, None], b)[..., 0])


def reference(bb, layer, inputs, monkeypatch) -> VisionMaps:
    ref = eager_twin(bb)
    if isinstance(bb, sharp.backbones.LlavaOneVisionBackbone):
        return reference_ov(ref, layer, inputs)
    return reference_qwen(ref, layer, inputs, monkeypatch)


def assert_maps_close(got: VisionMaps, want: VisionMaps, atol=1e-5):
    for field in ("hidden", "keys", "attention"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.shape == w.shape, (field, g.shape, w.shape)
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=1e-4, msg=lambda m: f"{field}: {m}")


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, -1])
def test_vision_maps_match_reference(bb, layer, monkeypatch):
    inputs = video_inputs(bb)
    idx = bb.resolve_vision_layer(layer)
    maps = bb.vision_maps(idx, capture(bb, idx, inputs), batch_size=2)
    n_visual = bb.layout(inputs).n_visual
    block = bb.vision_layers[idx]
    head_dim = (block.attn if hasattr(block, "attn") else block.self_attn).head_dim
    assert maps.hidden.shape[:2] == maps.keys.shape[:2] == maps.attention.shape == (2, n_visual)
    assert maps.keys.shape[-1] == head_dim and maps.attention.dtype == torch.float32
    assert_maps_close(maps, reference(bb, idx, inputs, monkeypatch))


def test_batch_is_sample_major(bb):
    """Sample i's maps in a batch of two different videos equal that video's maps alone."""
    layer = bb.feature_layer
    both = bb.vision_maps(layer, capture(bb, layer, video_inputs(bb, (1, 2))), batch_size=2)
    assert not torch.allclose(both.hidden[0], both.hidden[1])
    for i, seed in enumerate((1, 2)):
        alone = bb.vision_maps(layer, capture(bb, layer, video_inputs(bb, (seed,))), batch_size=1)
        assert_maps_close(VisionMaps(both.hidden[i:i + 1], both.keys[i:i + 1], both.attention[i:i + 1]), alone)


def test_chunked_attention_equals_one_chunk(bb):
    """A budget of one frame per chunk gives the same attention as all frames at once."""
    inputs = video_inputs(bb)
    captured = capture(bb, 0, inputs)
    whole = bb.vision_maps(0, captured, batch_size=2)
    bb.attention_budget = 1
    try:
        chunked = bb.vision_maps(0, captured, batch_size=2)
    finally:
        del bb.attention_budget
    torch.testing.assert_close(chunked.attention, whole.attention, atol=1e-7, rtol=1e-6)


def _session_captured(bb, inputs) -> dict:
    """The feature layer's captured call in a real pruning session (VisionZip reads the maps)."""
    got = {}
    original = bb.vision_maps

    def spy(layer, captured, batch_size):
        got["captured"] = captured
        return original(layer, captured, batch_size)

    bb.vision_maps = spy
    try:
        method = sharp.resolve_method("visionzip", bb, 0.5).method
        with sharp.prune(bb, method), torch.no_grad():
            bb.model(**inputs, use_cache=True)
    finally:
        del bb.vision_maps
    return got["captured"]


def test_session_keeps_the_layers_own_queries_and_keys(bb):
    """Where the family taps the layer's projections (LLaVA-OV), the session's captured q / k are the
    recomputed ones exactly, and the maps from them equal the maps recomputed from the layer input."""
    inputs = video_inputs(bb)
    captured = _session_captured(bb, inputs)
    layer = bb.feature_layer
    block = bb.vision_layers[layer]
    if bb.vision_qk_capture(block) is None:  # Qwen2-VL: recomputed from the fused qkv
        assert "qk" not in captured
        return
    q, k = bb._vision_qk(block, captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"])
    assert torch.equal(captured["qk"][0], q) and torch.equal(captured["qk"][1], k)
    tapped = bb.vision_maps(layer, captured, batch_size=2)
    recomputed = bb.vision_maps(layer, {key: v for key, v in captured.items() if key != "qk"}, batch_size=2)
    for field in VisionMaps.FIELDS:
        assert torch.equal(getattr(tapped, field), getattr(recomputed, field)), field
    assert_maps_close(tapped, reference_ov(eager_twin(bb), layer, inputs))


def test_vision_maps_are_lazy(bb):
    """A field is computed when first read, once: reading the attention computes neither the hidden
    states nor the keys."""
    layer = bb.feature_layer
    maps = bb.vision_maps(layer, capture(bb, layer, video_inputs(bb)), batch_size=2)
    assert maps.computed() == ()
    attention = maps.attention
    assert maps.computed() == ("attention",) and maps.attention is attention
    maps.keys
    assert maps.computed() == ("keys", "attention")
    given = VisionMaps(maps.hidden, maps.keys, maps.attention)
    assert given.computed() == VisionMaps.FIELDS and given.attention is attention


def test_feature_layer_feeds_the_llm(bb):
    """The feature layer's output, through the model's own projector/merger, is the LLM's video features."""
    inputs = video_inputs(bb)
    layer = bb.feature_layer
    out = capture(bb, layer, inputs)["output"]
    inner = bb.model.model
    with torch.no_grad():
        if isinstance(bb, sharp.backbones.LlavaOneVisionBackbone):
            want = compat_helpers.llava_ov_video_features(inner, inputs["pixel_values_videos"])
            got = inner.apply_pooling(inner.multi_modal_projector(out)).reshape(want.shape)
        else:
            want = compat_helpers.vision_tokens(inner.visual(inputs["pixel_values_videos"],
                                                             grid_thw=inputs["video_grid_thw"]))
            got = inner.visual.merger(out)
    torch.testing.assert_close(got, want)


def n_patches(bb, inputs) -> int:
    """Vision-tower rows of the inputs (all samples): LLaVA-OV frames x patches; Qwen2-VL pixel rows."""
    pv = inputs["pixel_values_videos"]
    if isinstance(bb, sharp.backbones.LlavaOneVisionBackbone):
        vc = bb.config.vision_config
        return pv.shape[0] * pv.shape[1] * (vc.image_size // vc.patch_size) ** 2
    return pv.shape[0]


def test_features_to_tokens_order_and_shapes(bb):
    """Per-patch row numbers map sample-major, frame-major; 1-D and (N, C) inputs agree."""
    inputs = video_inputs(bb)
    layout = bb.layout(inputs)
    per_patch = torch.arange(n_patches(bb, inputs), dtype=torch.float32)
    flat = bb.visual_features_to_tokens(per_patch, batch_size=2)
    chans = bb.visual_features_to_tokens(torch.stack([per_patch, -per_patch], dim=-1), batch_size=2)
    assert flat.shape == (2, layout.n_visual) and chans.shape == (2, layout.n_visual, 2)
    torch.testing.assert_close(chans[..., 0], flat)
    torch.testing.assert_close(chans[..., 1], -flat)
    frames = flat.reshape(2 * layout.frames, layout.tokens_per_frame)  # (sample, frame) rows in order
    assert bool((frames[1:].min(dim=1).values > frames[:-1].max(dim=1).values).all())


def test_resolve_vision_layer(bb):
    n = len(bb.vision_layers)
    assert bb.resolve_vision_layer(None) == bb.resolve_vision_layer("feature") == bb.feature_layer
    assert bb.resolve_vision_layer(-1) == n - 1 and bb.resolve_vision_layer(-n) == 0
    assert bb.resolve_vision_layer(1) == 1
    for bad in (n, -n - 1, 99):
        with pytest.raises(ValueError, match=rf"valid {-n}\.\.{n - 1}"):
            bb.resolve_vision_layer(bad)
    for bad in ("last", 1.5, True):
        with pytest.raises(ValueError, match="vision layer"):
            bb.resolve_vision_layer(bad)


def test_vision_layer_paths(bb):
    inner = bb.model.model
    if isinstance(bb, sharp.backbones.LlavaOneVisionBackbone):
        assert bb.vision_layers is compat.siglip_encoder(inner.vision_tower).layers
        assert bb.feature_layer == len(bb.vision_layers) - 1  # vision_feature_layer -1
    else:
        assert bb.vision_layers is inner.visual.blocks
        assert bb.feature_layer == bb.config.vision_config.depth - 1


def test_llava_feature_layer_follows_config():
    bb = sharp.load_backbone("tiny_llava_onevision", device="cpu")  # 2 vision layers
    for value, layer in ((-1, 1), (-2, 0), (1, 0), (2, 1)):
        bb.config.vision_feature_layer = value
        assert bb.feature_layer == layer
    for value in (0, -3, [-1, -2]):
        bb.config.vision_feature_layer = value
        with pytest.raises(ValueError):
            bb.feature_layer


def test_llava_mapping_odd_grid():
    """An odd patch grid (7B: 27x27 -> 14x14; here 9x9 -> 5x5), where bilinear is not a 2x2 mean."""
    bb = sharp.load_backbone("tiny_llava_onevision", device="cpu")
    bb.config.vision_config.image_size = 63  # patch 7 -> 9x9 patches
    per_patch = torch.randn(2 * 3 * 81, 5, generator=torch.Generator().manual_seed(0))
    got = bb.visual_features_to_tokens(per_patch, batch_size=2)
    assert got.shape == (2, 3 * 25, 5)
    torch.testing.assert_close(got, _pool_ov(per_patch.reshape(6, 81, 5), 2))
    mean2x2 = F.avg_pool2d(per_patch.reshape(6, 9, 9, 5).permute(0, 3, 1, 2), 2, ceil_mode=True)
    assert not torch.allclose(got, mean2x2.permute(0, 2, 3, 1).reshape(2, -1, 5))


def test_received_attention_per_chunk():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 5, 2]
    q, k = torch.randn(15, 2, 4, generator=g), torch.randn(15, 2, 4, generator=g)
    calls = []

    def rope(qs, ks, start, end):
        calls.append((start, end))
        return qs * 2, ks

    got = received_attention(q, k, 0.5, lengths, rope=rope, budget=2 * 5 * 5)
    assert calls == [(0, 3), (3, 8), (8, 13), (13, 15)]  # one 5-row chunk per group at this budget
    start, want = 0, []
    for n in lengths:
        qs, ks = q[start:start + n].transpose(0, 1) * 2, k[start:start + n].transpose(0, 1)  # (heads, n, d)
        want.append(torch.softmax(qs @ ks.transpose(1, 2) * 0.5, dim=-1).mean(dim=(0, 1)))
        start += n
    torch.testing.assert_close(got, torch.cat(want))
    with pytest.raises(ValueError, match="sum to"):
        received_attention(q, k, 0.5, [3, 5])


def test_chunk_groups_bound_7b_memory():
    """LLaVA-OV-7B, 32 frames x 729 patches x 16 heads: groups of a few frames, none over budget."""
    groups = list(chunk_groups([729] * 32, heads=16))
    assert sum(c for _, c, _ in groups) == 32 and [s for s, _, _ in groups] == [729 * sum(
        c for _, c, _ in groups[:i]) for i in range(len(groups))]
    assert all(1 <= c <= 4 and c * 16 * 729 * 729 <= ATTENTION_BUDGET for _, c, _ in groups)
    assert list(chunk_groups([4, 4, 2, 4], heads=1, budget=10**6)) == [(0, 2, 4), (8, 1, 2), (10, 1, 4)]
