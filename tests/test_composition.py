"""Composition: methods in sequence, checked against independent computations."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import sharp
from sharp import flops
from sharp.methods import PruningMethod, Selection, budget, register_method

from engine_reference import layer_masks
from conftest import shared_backbone

BACKBONES = ["tiny_llava_onevision", "tiny_qwen2_vl"]


def backbone(name, impl="eager"):
    return shared_backbone(name, impl)


@register_method
@dataclass
class _EvenFrames(PruningMethod):
    """Test method: before the LLM keep the tokens of every other frame (a uniform frame sampler)."""

    name = "_test_even_frames"

    def stages(self, n):
        return [0]

    def select(self, ctx):
        return Selection([(ctx.visual_tokens(b).frame % 2 == 0).nonzero().squeeze(1) for b in range(ctx.batch_size)])

    def token_schedule(self, n_visual, num_layers, backbone=None):
        return [n_visual // 2] * num_layers


def layer0_input(bb, inputs):
    seen = {}
    h = bb.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        h.remove()
    return seen["x"]


def expected_segments(bb, inputs, frames, tau):
    """Eq. 3 by hand over the listed frames: (first, last) runs of consecutive kept frames."""
    layout = bb.layout(inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)
    x = layer0_input(bb, inputs)[0, vis[0]].float().view(layout.frames, layout.tokens_per_frame, -1)
    means = [x[f].mean(0) for f in frames]
    segs, start = [], frames[0]
    for prev, cur, a, b in zip(frames, frames[1:], means, means[1:]):
        if F.cosine_similarity(a, b, dim=0) < tau:
            segs.append((start, prev))
            start = cur
    return segs + [(start, frames[-1])]


@pytest.mark.parametrize("name", BACKBONES)
def test_sharp_after_a_frame_sampler(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=31)
    layout = bb.layout(inputs)
    n = layout.n_visual
    with sharp.prune(bb, "_test_even_frames+sharp", 0.2, sharp={"cache_dir": "", "tau_seg": 0.99}) as trace:
        bb.model.generate(**inputs, max_new_tokens=2)
    assert trace.stage_owners == ["_test_even_frames", "sharp"]
    sampled, pruned = trace.kept
    assert torch.equal(sampled[0] // layout.tokens_per_frame % 2, torch.zeros_like(sampled[0]))
    assert len(pruned[0]) == budget(n, 0.2)  # the budget stays a share of the ORIGINAL count
    assert bool(torch.isin(pruned[0], sampled[0]).all())
    frames = list(range(0, layout.frames, 2))
    assert trace.method("sharp").segments[0] == expected_segments(bb, inputs, frames, 0.99)
    assert trace.visual_tokens_per_layer == [n // 2] + [budget(n, 0.2)] * (bb.num_layers - 1)


@pytest.mark.parametrize("name", BACKBONES)
def test_posc_probe_replays_earlier_stages(name):
    """The bias after a sampler = the black video's last-token attention over the kept tokens only."""
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=32)
    with sharp.prune(bb, "_test_even_frames+sharp", 0.25, sharp={"cache_dir": ""}) as trace, torch.no_grad():
        bb.model(**inputs)
    bias = trace.method("sharp").bias[0]
    black = bb.black_inputs(inputs)
    vis = bb.visual_mask(black["input_ids"], bb.layout(black))
    s = vis.shape[1]
    keys = torch.ones(1, s, dtype=torch.bool)
    keys[vis] = False
    keys[0, vis[0].nonzero().squeeze(1)[trace.kept[0][0]]] = True  # the sampled frames' tokens
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool)[None, None]
    with torch.no_grad(), layer_masks(bb, {layer: allowed for layer in range(bb.num_layers)}):
        # the default reading scores with layer 1's map (score_at="stage"); the probe has no SegM
        att = bb.model(**black, output_attentions=True).attentions[1][0, :, -1].mean(0)  # (s,)
    expected = att[vis[0].nonzero().squeeze(1)[trace.kept[0][0]]]
    assert bias.shape == expected.shape
    torch.testing.assert_close(bias, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_fastv_after_fastv_ranks_the_survivors(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=33)
    kwargs = {"fastv@1": {"layer": 1, "retention": 0.5}, "fastv@2": {"layer": 3}}
    with sharp.prune(bb, "fastv+fastv", 0.25, **kwargs) as trace, torch.no_grad():
        bb.model(**inputs)
    first, second = trace.kept
    n = bb.layout(inputs).n_visual
    assert [len(first[0]), len(second[0])] == [budget(n, 0.5), budget(n, 0.25)]
    # independent: eager attentions with layers >= 1 seeing only the first survivors' visual keys
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    s = vis.shape[1]
    vis_pos = vis[0].nonzero().squeeze(1)
    keys = ~vis[0].clone()
    keys[vis_pos[first[0]]] = True
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & keys[None, None, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool)[None, None]
    full = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    masks = {0: full, **{layer: allowed for layer in range(1, bb.num_layers)}}
    with torch.no_grad(), layer_masks(bb, masks):
        att = bb.model(**inputs, output_attentions=True).attentions[2][0, :, -1].mean(0)  # map of layer K-1 = 2
    scores = att[vis_pos[first[0]]]
    expected = first[0][torch.topk(scores, budget(n, 0.25)).indices].sort().values
    assert torch.equal(second[0], expected)


def test_composed_tflops_are_the_sum_over_the_composed_schedule():
    n = 6272
    kwargs = {"fastv": {"layer": 2, "retention": 0.5}, "sharp": {"layer": 4}}
    got = flops.prefill_tflops("llava_onevision_7b", "fastv+sharp", 0.2, visual_tokens=n, **kwargs)
    dims = flops.lm_dims("llava_onevision_7b")
    schedule = [n, n, budget(n, 0.5), budget(n, 0.5)] + [budget(n, 0.2)] * (dims.num_layers - 4)
    d, m = dims.hidden, dims.ffn
    expected = sum(4 * k * d * d + 2 * k * k * d + 2 * k * d * m for k in schedule) / 1e12
    assert got == pytest.approx(expected, rel=1e-12)
    alone = flops.prefill_tflops("llava_onevision_7b", "sharp", 0.2, visual_tokens=n, layer=4)
    assert got < alone  # FastV's 50% in layers 2-3 saves compute against ShaRP alone


def test_composition_api_and_errors():
    a = sharp.make_method("fastv+sharp", 0.3, fastv={"layer": 1, "retention": 0.5}, sharp={"lam": 0.5})
    fastv, shrp = a.flat_children()
    assert (fastv.layer, fastv.retention, shrp.lam, shrp.retention) == (1, 0.5, 0.5, 0.3)
    b = sharp.compose(sharp.make_method("fastv", 0.5, layer=1), sharp.make_method("sharp", 0.3, lam=0.5))
    assert b.token_schedule(100, 4) == a.token_schedule(100, 4) == [100, 30, 30, 30]  # both at layer 1
    with pytest.raises(TypeError, match="per-child kwargs.*fastv, sharp"):
        sharp.make_method("fastv+sharp", 0.3, layer=1)
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        sharp.make_method("fastv+nope", 0.3)
    with pytest.raises(ValueError, match="empty part"):
        sharp.make_method("fastv+", 0.3)
    with pytest.raises(TypeError, match="fastv@1, fastv@2"):
        sharp.make_method("fastv+fastv", 0.3, fastv={"layer": 1})
    m = sharp.make_method("fastv", 0.5)
    with pytest.raises(ValueError, match="same fastv instance"):
        sharp.compose(m, m)
