"""The engine: exactness at retention 1.0, decode correctness after pruning, and every capability
later methods rely on (multi-stage, merging, custom masks, probes, before-LLM reduction, KV drop)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import sharp
import sharp.engine.sequence as sequence
import sharp.engine.prefill as engine_prefill
from sharp.methods import PruningMethod, Selection, budget, register_method

from engine_reference import generate_with_logits, kept_key_mask, masked_reference_logits
from conftest import shared_backbone

BACKBONES = ["tiny_llava_onevision", "tiny_qwen2_vl"]


def backbone(name, impl="sdpa"):
    return shared_backbone(name, impl)


def prefill_logits(bb, inputs):
    with torch.no_grad():
        return bb.model(**inputs).logits


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method", ["vanilla", "fastv"])
def test_retention_one_is_bit_identical(name, impl, batch, method):
    bb = backbone(name, impl)
    inputs = bb.synthetic_inputs(frames=8, seed=1, batch_size=batch)
    if batch == 2:
        assert (inputs["attention_mask"] == 0).any(), "batch 2 must be left-padded"
    ref_prefill = prefill_logits(bb, inputs)
    ref_seq, ref_logits = generate_with_logits(bb, inputs)
    with sharp.prune(bb, method, 1.0) as trace:
        prefill = prefill_logits(bb, inputs)
        seq, logits = generate_with_logits(bb, inputs)
    assert torch.equal(prefill, ref_prefill)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)
    assert trace.visual_tokens_per_layer == [bb.layout(inputs).n_visual] * bb.num_layers
    # and the model is restored afterwards
    assert torch.equal(prefill_logits(bb, inputs), ref_prefill)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_decode_matches_masked_no_cache_reference(name, batch):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=2, batch_size=batch)
    k = 2
    with sharp.prune(bb, "fastv", 0.25, layer=k) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    n_vis = bb.layout(inputs).n_visual
    assert [len(x) for x in trace.kept[0]] == [budget(n_vis, 0.25)] * batch
    assert trace.visual_tokens_per_layer == [n_vis] * k + [budget(n_vis, 0.25)] * (bb.num_layers - k)
    keys = kept_key_mask(bb, inputs, seq, trace.kept[0])
    ref = masked_reference_logits(bb, inputs, seq, {layer: keys for layer in range(k, bb.num_layers)})
    p = inputs["input_ids"].shape[1]
    ref_steps = ref[:, p - 1: seq.shape[1] - 1]
    torch.testing.assert_close(logits, ref_steps, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_position_mistake_is_caught(name, monkeypatch):
    """Re-compacting positions (a classic bug) must break the reference comparison."""
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=2)
    real = sequence.gather_seq

    def compacted(x, index, seq_dim):
        if seq_dim == -2:  # cos/sin: take the first s' positions instead of the kept ones
            return real(x, torch.arange(index.shape[1]).expand_as(index), seq_dim)
        return real(x, index, seq_dim)

    monkeypatch.setattr(sequence, "gather_seq", compacted)
    with sharp.prune(bb, "fastv", 0.25) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    keys = kept_key_mask(bb, inputs, seq, trace.kept[0])
    ref = masked_reference_logits(bb, inputs, seq, {layer: keys for layer in range(2, bb.num_layers)})
    p = inputs["input_ids"].shape[1]
    assert not torch.allclose(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)


# -- FastV selection ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_keeps_topk_of_eager_attentions(name, layer):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=3, batch_size=2)
    with torch.no_grad():
        att = bb.model(**inputs, output_attentions=True).attentions[layer - 1]  # (b, H, s, s)
    scores = att[:, :, -1, :].mean(dim=1)  # last row, head mean
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    with sharp.prune(bb, "fastv", 0.25, layer=layer) as trace:
        with torch.no_grad():
            bb.model(**inputs)
    for i in range(2):
        s = scores[i, vis[i]]
        expected = torch.topk(s, budget(len(s), 0.25)).indices.sort().values
        assert torch.equal(trace.kept[0][i], expected)


@pytest.mark.parametrize("name", BACKBONES)
def test_last_token_attention_with_and_without_rope(name):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=4)
    with torch.no_grad():
        att = bb.model(**inputs, output_attentions=True).attentions
    captured = {}

    @dataclass
    class Capture(PruningMethod):
        name = "_test_capture"

        def stages(self, n):
            return [2]

        def score_layers(self, n):
            return [1]

        def select(self, ctx):
            captured["rope1"] = ctx.last_token_attention(layer=1)
            captured["rope2"] = ctx.last_token_attention()
            captured["q4"] = ctx.last_token_attention(queries=4)
            captured["norope2"] = ctx.last_token_attention(rope=False)
            captured["vis2"] = ctx.last_token_attention(softmax_over="visual")
            return Selection([torch.arange(int(ctx.visual_mask[b].sum())) for b in range(ctx.hidden_states.shape[0])])

    with sharp.prune(bb, Capture()):
        with torch.no_grad():
            bb.model(**inputs)
    torch.testing.assert_close(captured["rope1"], att[1][:, :, -1].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(captured["rope2"], att[2][:, :, -1].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(captured["q4"], att[2][:, :, -4:].mean((1, 2)), atol=1e-6, rtol=1e-5)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    assert torch.allclose(captured["vis2"][vis].sum(), torch.tensor(1.0)) and captured["vis2"][~vis].sum() == 0

    # without RoPE == a run whose cos/sin are (1, 0) in layer 2
    def unit_rope(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, dict(kwargs, position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))

    h = bb.layers[2].register_forward_pre_hook(unit_rope, with_kwargs=True)
    try:
        with torch.no_grad():
            att_norope = bb.model(**inputs, output_attentions=True).attentions[2]
    finally:
        h.remove()
    torch.testing.assert_close(captured["norope2"], att_norope[:, :, -1].mean(1), atol=1e-6, rtol=1e-5)


# -- capabilities for later methods ------------------------------------------------------------
@register_method
@dataclass
class _TwoStage(PruningMethod):
    """Test method: uniform stride keep at two layers, the second merging dropped into kept."""

    name = "_test_two_stage"
    first: int = 1
    second: int = 3
    merge: bool = False

    def stages(self, n):
        return [self.first, self.second]

    def select(self, ctx):
        keep, hidden = [], ctx.hidden_states.clone() if self.merge else None
        for b in range(ctx.hidden_states.shape[0]):
            n = int(ctx.visual_mask[b].sum())
            kv = torch.arange(0, n, 2)  # keep every other visual token
            keep.append(kv)
            if self.merge:  # token 2j absorbs 2j+1: mean of the two
                pos = ctx.visual_positions(b)
                for j in kv.tolist():
                    if j + 1 < n:
                        hidden[b, pos[j]] = 0.5 * (hidden[b, pos[j]] + hidden[b, pos[j + 1]])
        return Selection(keep, hidden)


@pytest.mark.parametrize("name", BACKBONES)
def test_multi_stage_pruning_decodes_like_reference(name):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=5)
    with sharp.prune(bb, "_test_two_stage") as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=3)
    n = bb.layout(inputs).n_visual
    assert len(trace.kept) == 2
    assert torch.equal(trace.kept[0][0], torch.arange(0, n, 2))
    assert torch.equal(trace.kept[1][0], torch.arange(0, n, 4))
    assert trace.visual_tokens_per_layer == [n, n // 2, n // 2, n // 4]
    keys1 = kept_key_mask(bb, inputs, seq, trace.kept[0])
    keys2 = kept_key_mask(bb, inputs, seq, trace.kept[1])
    ref = masked_reference_logits(bb, inputs, seq, {1: keys1, 2: keys1, 3: keys2})
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_merging_changes_kept_hidden_states(name):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=5)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0].clone()

    h = bb.layers[3].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with sharp.prune(bb, "_test_two_stage", merge=False), torch.no_grad():
            bb.model(**inputs)
        plain = seen["h"]
        with sharp.prune(bb, "_test_two_stage", merge=True), torch.no_grad():
            bb.model(**inputs)
        merged = seen["h"]
    finally:
        h.remove()
    assert plain.shape == merged.shape  # same kept layout
    assert not torch.allclose(plain, merged)


@register_method
@dataclass
class _BlockVisual(PruningMethod):
    """Test method: in layer 0, visual tokens may not attend to other visual tokens."""

    name = "_test_block_visual"

    def attention_mask(self, ctx):
        if ctx.layer_idx != 0 or ctx.phase != "prefill":
            return None
        vis = ctx.visual_mask  # (b, s)
        s = vis.shape[1]
        cross = vis[:, :, None] & vis[:, None, :] & ~torch.eye(s, dtype=torch.bool)[None]
        return ~cross[:, None]


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_custom_mask_in_chosen_layer(name, impl):
    bb = backbone(name, impl)
    inputs = bb.synthetic_inputs(frames=8, seed=6)
    with sharp.prune(bb, "_test_block_visual"):
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=3)
    ref_bb = backbone(name, "eager")
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    b, s = seq.shape
    p = inputs["input_ids"].shape[1]
    # reference: layer 0 rows of visual tokens cannot see other visual keys
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    visf = torch.zeros(b, s, dtype=torch.bool)
    visf[:, :p] = vis
    cross = visf[:, :, None] & visf[:, None, :] & ~torch.eye(s, dtype=torch.bool)[None]
    from engine_reference import layer_masks

    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad(), layer_masks(ref_bb, {0: causal & ~cross[:, None]}):
        ref = ref_bb.model(input_ids=seq, attention_mask=torch.ones_like(seq), **kwargs, use_cache=False).logits
    torch.testing.assert_close(logits, ref[:, p - 1: s - 1], atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        plain = ref_bb.model(input_ids=seq, attention_mask=torch.ones_like(seq), **kwargs).logits
    assert not torch.allclose(plain[:, p - 1: s - 1], ref[:, p - 1: s - 1], atol=1e-3)


@pytest.mark.parametrize("name", BACKBONES)
def test_probe_forward_with_black_video(name):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=7)
    black = bb.black_inputs(inputs)
    got = {}

    @dataclass
    class Probe(PruningMethod):
        name = "_test_probe"

        def stages(self, n):
            return [1]

        def score_layers(self, n):
            return [0]

        def select(self, ctx):
            got["real"] = ctx.last_token_attention(layer=0)
            got["black"] = ctx.probe(bb.black_inputs, lambda c: c.last_token_attention(layer=0))
            return Selection([torch.arange(int(ctx.visual_mask[0].sum()))])

    with sharp.prune(bb, Probe()) as trace, torch.no_grad():
        out = bb.model(**inputs).logits
    with torch.no_grad():
        att_black = bb.model(**black, output_attentions=True).attentions[0][:, :, -1].mean(1)
        att_real = bb.model(**inputs, output_attentions=True).attentions[0][:, :, -1].mean(1)
        ref = bb.model(**inputs).logits
    torch.testing.assert_close(got["black"], att_black, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["real"], att_real, atol=1e-6, rtol=1e-5)
    assert torch.equal(out, ref)  # the probe leaves the real forward untouched
    assert trace.prefill_calls == 1
    # every frame of the black video gives the same tokens before the LLM (only positions differ)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    with torch.no_grad():
        emb = {}
        h = bb.layers[0].register_forward_pre_hook(lambda m, a, k: emb.update(x=a[0]), with_kwargs=True)
        bb.model(**black)
        h.remove()
    layout = bb.layout(inputs)
    v = emb["x"][0, vis[0]].view(layout.frames, layout.tokens_per_frame, -1)
    assert torch.allclose(v, v[:1].expand_as(v), atol=1e-5)


@register_method
@dataclass
class _BeforeLLM(PruningMethod):
    """Test method: reduce visual tokens before the LLM (stage at layer 0), keeping the last ones."""

    name = "_test_before_llm"

    def stages(self, n):
        return [0]

    def select(self, ctx):
        keep = []
        for b in range(ctx.hidden_states.shape[0]):
            n = int(ctx.visual_mask[b].sum())
            keep.append(torch.arange(n - budget(n, self.retention), n))
        return Selection(keep)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("batch", [1, 2])
def test_reduction_before_llm(name, batch):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=8, batch_size=batch)
    with sharp.prune(bb, "_test_before_llm", 0.5) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=3)
    n = bb.layout(inputs).n_visual
    assert trace.visual_tokens_per_layer == [n // 2] * bb.num_layers
    keys = kept_key_mask(bb, inputs, seq, trace.kept[0])
    ref = masked_reference_logits(bb, inputs, seq, {layer: keys for layer in range(bb.num_layers)})
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)


@register_method
@dataclass
class _DropKV(PruningMethod):
    """Test method: after prefill, drop the visual KV entries of layer 2 (SharpV's memory stage)."""

    name = "_test_drop_kv"
    layer: int = 2

    def after_prefill(self, session):
        vis = session.backbone.visual_mask(session.prefill_inputs["input_ids"], session.layout)
        keep = [(~vis[b]).nonzero().squeeze(1) for b in range(vis.shape[0])]
        session.drop_kv(self.layer, keep)


@pytest.mark.parametrize("name", BACKBONES)
def test_dropping_kv_cache_entries_during_decode(name):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=9)
    with sharp.prune(bb, "_test_drop_kv"):
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    p = inputs["input_ids"].shape[1]
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    keys = torch.ones(seq.shape, dtype=torch.bool)
    keys[:, :p] = ~vis
    ref = masked_reference_logits(bb, inputs, seq, {2: keys}, query_from={2: p})
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)
    plain = masked_reference_logits(bb, inputs, seq, {})
    assert not torch.allclose(plain[:, p: seq.shape[1] - 1], ref[:, p: seq.shape[1] - 1], atol=1e-4)


# -- errors ------------------------------------------------------------------------------------
def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*tiny_llava_onevision"):
        sharp.load_backbone("nope")


def test_unknown_method_and_bad_retention():
    bb = backbone("tiny_llava_onevision")
    with pytest.raises(ValueError, match="unknown pruning method 'nope'.*fastv.*vanilla"):
        with sharp.prune(bb, "nope", 0.5):
            pass
    for r in (0, -0.1, 1.5, "x"):
        with pytest.raises(ValueError, match=r"retention must be"):
            with sharp.prune(bb, "fastv", r):
                pass
    with pytest.raises(TypeError, match="unknown argument.*nope.*valid arguments: layer"):
        with sharp.prune(bb, "fastv", 0.5, nope=1):
            pass


def test_inputs_without_visual_tokens():
    bb = backbone("tiny_qwen2_vl")
    inputs = bb.synthetic_inputs(frames=4)
    text_only = {"input_ids": inputs["input_ids"][:, :10], "attention_mask": inputs["attention_mask"][:, :10]}
    with sharp.prune(bb, "fastv", 0.5):
        with pytest.raises(ValueError, match="no visual tokens"):
            bb.model.generate(**text_only, max_new_tokens=2)


def test_hooks_removed_after_exception():
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=4)
    ref = prefill_logits(bb, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with sharp.prune(bb, "fastv", 0.25):
            raise RuntimeError("boom")
    assert not bb.model._forward_pre_hooks and not any(layer._forward_pre_hooks for layer in bb.layers)
    assert torch.equal(prefill_logits(bb, inputs), ref)


# -- compacted positions (PyramidDrop's official re-numbering) -----------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("spec", [("fastv", {"layer": 2}),
                                  ("fastv+fastv", {"fastv@1": {"layer": 1, "retention": 0.5, "positions": "compact"},
                                                   "fastv@2": {"layer": 3, "positions": "compact"}})])
def test_compact_positions_decode_like_reference(batch, spec):
    from engine_reference import Recorder, replay_reference_logits

    bb = backbone("tiny_llava_onevision", "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=21, batch_size=batch)
    name, kwargs = spec
    if name == "fastv":
        kwargs = dict(kwargs, positions="compact")
    method = sharp.make_method(name, 0.25, **kwargs)
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    first = trace.stage_layers[0]
    ref = replay_reference_logits(bb, inputs, seq, trace, recorder, compact_layers=range(first, bb.num_layers))
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)
    # and the reference tells the two position readings apart
    original = replay_reference_logits(bb, inputs, seq, trace, recorder)
    assert not torch.allclose(original[:, p - 1: seq.shape[1] - 1], ref[:, p - 1: seq.shape[1] - 1], atol=1e-3)


def test_compact_positions_refused_on_mrope():
    bb = backbone("tiny_qwen2_vl")
    with pytest.raises(ValueError, match="compact.*M-RoPE"):
        with sharp.prune(bb, "fastv", 0.25, positions="compact"):
            pass
    with pytest.raises(ValueError, match="positions must be one of"):
        sharp.make_method("fastv", 0.25, positions="shifted")


# -- free no-op stages ---------------------------------------------------------------------------
@register_method
@dataclass
class _EveryLayer(PruningMethod):
    """Test method: a stage at every layer that only acts at ``act_at`` (FrameFusion's pattern)."""

    name = "_test_every_layer"
    act_at: int = 2

    def stages(self, n):
        return list(range(n))

    def select(self, ctx):
        if ctx.layer_idx != self.act_at:
            return Selection.unchanged()
        return Selection.top_k(ctx.gather_visual(ctx.hidden_states[..., 0].float()), ctx.budget(self.retention))


@pytest.mark.parametrize("name", BACKBONES)
def test_unchanged_stages_cost_nothing(name, monkeypatch):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=22)
    masks = []
    real = engine_prefill.compat.causal_mask
    monkeypatch.setattr(engine_prefill.compat, "causal_mask", lambda *a, **kw: masks.append(1) or real(*a, **kw))
    with sharp.prune(bb, "_test_every_layer", 0.25) as trace, torch.no_grad():
        bb.model(**inputs)
    n = bb.layout(inputs).n_visual
    assert trace.stage_layers == [2] and len(masks) == 1  # one gather + one mask, at the acting layer
    assert trace.visual_tokens_per_layer == [n, n] + [budget(n, 0.25)] * (bb.num_layers - 2)
    masks.clear()
    with sharp.prune(bb, "_test_every_layer", 0.25, act_at=99) as trace, torch.no_grad():
        out = bb.model(**inputs).logits
    with torch.no_grad():
        ref = bb.model(**inputs).logits
    assert trace.kept == [] and masks == [] and torch.equal(out, ref)


# -- vision-tower access for pre-LLM methods -----------------------------------------------------
@register_method
@dataclass
class _VisionTopK(PruningMethod):
    """Test method: before the LLM keep the visual tokens the feature layer's patches attend to most."""

    name = "_test_vision_topk"

    def vision_layers(self):
        return ["feature"]

    def stages(self, n):
        return [0]

    def select(self, ctx):
        maps = ctx.vision()
        scores = torch.stack([maps.attention[b, ctx.visual_tokens(b).index] for b in range(ctx.batch_size)])
        return Selection.top_k(scores, ctx.budget(self.retention))


def captured_vision_call(bb, inputs, layer):
    """The (args, kwargs, output) of one vision layer in a plain forward, captured by the test."""
    captured = {}
    module = bb.vision_layers[layer]
    h1 = module.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    h2 = module.register_forward_hook(lambda m, a, k, o: captured.update(output=o), with_kwargs=True)
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    return captured


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("batch", [1, 2])
def test_pre_llm_stage_reads_the_vision_tower(name, batch):
    bb = backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=23, batch_size=batch)
    with sharp.prune(bb, "_test_vision_topk", 0.25) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=3)
    layer = bb.resolve_vision_layer("feature")
    maps = bb.vision_maps(layer, captured_vision_call(bb, inputs, layer), batch)
    k = budget(bb.layout(inputs).n_visual, 0.25)
    for b in range(batch):
        assert torch.equal(trace.kept[0][b], torch.topk(maps.attention[b], k).indices.sort().values)
    keys = kept_key_mask(bb, inputs, seq, trace.kept[0])
    ref = masked_reference_logits(bb, inputs, seq, {layer: keys for layer in range(bb.num_layers)})
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)


def test_vision_layers_are_hooked_only_when_asked():
    bb = backbone("tiny_llava_onevision")
    hooked = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in bb.vision_layers)  # noqa: E731
    own = hooked()  # transformers 5.x itself hooks layers to record outputs
    with sharp.prune(bb, "fastv", 0.25):
        assert hooked() == own
    with sharp.prune(bb, "_test_vision_topk", 0.25):
        assert hooked() == own + 2
    assert hooked() == own

    @dataclass
    class Unasked(_VisionTopK):
        name = "_test_vision_unasked"

        def vision_layers(self):
            return []

    with sharp.prune(bb, Unasked(retention=0.25)), torch.no_grad():
        with pytest.raises(RuntimeError, match="not requested"):
            bb.model(**bb.synthetic_inputs(frames=4))


# -- Selection.new_rows: kept rows written without a copy of the whole input -------------------------
@dataclass
class _RowWriter(PruningMethod):
    """Keeps every other visual token and the last (all of them with ``drop=False``) and gives 3 visual
    tokens new rows (one of them dropped, when dropping): as ``new_rows``, or as a whole ``hidden_states``."""

    name = "_test_row_writer"
    as_rows: bool = True
    drop: bool = True

    def stages(self, num_layers):
        return [1]

    def select(self, ctx):
        keep, new_rows = [], []
        hidden = ctx.hidden_states.clone()
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            n = len(tokens)
            keep.append(torch.cat([torch.arange(0, n - 1, 2 if self.drop else 1), torch.tensor([n - 1])]))
            chosen = torch.tensor([0, 1, n - 1])  # token 1 is dropped when dropping
            rows = 10.0 + torch.arange(3.0)[:, None].expand(3, ctx.hidden_states.shape[-1])
            positions = tokens.positions[chosen]
            new_rows.append((positions, rows))
            hidden[b, positions] = rows.to(hidden.dtype)
        if self.as_rows:
            return Selection(keep, new_rows=new_rows)
        return Selection(keep, hidden_states=hidden)


register_method(_RowWriter)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("drop", [True, False])
def test_new_rows_equal_a_replaced_input(name, drop):
    """``Selection(keep, new_rows=...)`` gives layer 1 exactly the input that the same rows written into a
    copy of the whole input (``hidden_states``) give; rows of dropped tokens are not used; nothing dropped:
    the rows are still written. Left-padded batch of two prompts of different lengths."""
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=4, seed=3, batch_size=2, pad=True)
    seen, out = {}, {}

    def grab(module, args, kwargs):  # registered after the engine's hook: layer 1's input after the stage
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    for as_rows in (True, False):
        with sharp.prune(bb, "_test_row_writer", as_rows=as_rows, drop=drop), torch.no_grad():
            h = bb.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                out[as_rows] = bb.model(**inputs).logits
            finally:
                h.remove()
        seen[as_rows] = seen.pop("h")
    assert torch.equal(seen[True], seen[False]) and torch.equal(out[True], out[False])
    # the written rows really are in layer 1's input: 10.0 (token 0) and 12.0 (the last token) per sample
    assert bool((seen[True] == 10.0).all(dim=-1).any(dim=1).all()) and bool((seen[True] == 12.0).all(dim=-1).any(dim=1).all())
    assert bool((seen[True] == 11.0).all(dim=-1).any(dim=1).all()) is (not drop)


def test_new_rows_and_hidden_states_are_exclusive():
    with pytest.raises(ValueError, match="hidden_states or new_rows"):
        Selection([torch.arange(2)], hidden_states=torch.zeros(1, 2, 3), new_rows=[(torch.arange(1), torch.zeros(1, 3))])
