"""sharp/engine/compat.py, sharp/backbones/compat.py and tests/compat_helpers.py: the same answers on
transformers 4.57.x and 5.x (run on both lines in CI)."""
from __future__ import annotations

import pytest
import torch

import sharp
from sharp.backbones import compat as backbone_compat
from sharp.engine import compat as engine_compat

import compat_helpers


def _qwen():
    return sharp.load_backbone("tiny_qwen2_vl")


def test_qwen2vl_positions_follow_457_rule_when_video_is_longer_than_wide():
    """Text after a video continues after the video's LARGEST position (4.57; 5.x native uses max(h, w))."""
    bb = _qwen()
    inputs = bb.synthetic_inputs(frames=32, batch_size=2, size=(56, 56))  # 16 temporal patches of 2x2 tokens
    t, h, w = (int(x) for x in inputs["video_grid_thw"][0])
    gh, gw = h // 2, w // 2
    assert t > max(gh, gw)  # the case where the two rules differ
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kwargs = {"video_grid_thw": inputs["video_grid_thw"], "attention_mask": mask}
    kwargs.update(backbone_compat.text_inputs(bb.model, ids))
    pos, deltas = bb.model.model.get_rope_index(ids, **kwargs)
    for b in range(2):
        real = mask[b].bool()
        vis = (ids[b][real] == bb.video_token_id).nonzero().squeeze(1)
        first, n = int(vis[0]), len(vis)
        s_real = int(real.sum())
        expect = torch.empty(3, s_real, dtype=torch.long)
        expect[:, :first] = torch.arange(first)
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        expect[:, first:first + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + first
        after = first + max(t, gh, gw)
        expect[:, first + n:] = torch.arange(after, after + s_real - first - n)
        assert torch.equal(pos[:, b, real], expect)
        assert torch.equal(pos[:, b, ~real], torch.ones_like(pos[:, b, ~real]))  # padding: 1, as 4.57
        assert int(deltas[b]) == int(expect.max()) + 1 - ids.shape[1]  # against the padded length, as 4.57


def test_new_qwen_families_pad_and_deltas_as_457():
    """Qwen2.5-VL and Qwen3-VL get the same 4.57 conventions as Qwen2-VL: padded positions 1, deltas
    against the padded length; Qwen2.5-VL's text after the video continues after its largest
    (absolute-time) position, which 5.x's own rule (max(h, w)) would not."""
    for name in ("tiny_qwen2_5_vl", "tiny_qwen3_vl"):
        bb = sharp.load_backbone(name)
        inputs = bb.synthetic_inputs(frames=8, batch_size=2)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
        pos, deltas = compat_helpers.rope_index(bb.model, ids, attention_mask=mask, **extra)
        for b in range(2):
            real = mask[b].bool()
            assert torch.equal(pos[:, b, ~real], torch.ones_like(pos[:, b, ~real]))
            assert int(deltas[b]) == int(pos[:, b, real].max()) + 1 - ids.shape[1]
            vis = (ids[b] == bb.video_token_id).nonzero().squeeze(1)
            after = int(vis[-1]) + 1  # the first token after the (last) video patch
            assert int(pos[0, b, after]) == int(pos[:, b, vis].max()) + 1


@pytest.mark.parametrize("name", ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_generate_prefill_sees_pixels_and_positions_match_rope_index(name):
    """adapt_model: generate's first forward carries the pixels (5.x would pre-encode them), so the
    engine's prefill hook sees the layout; its M-RoPE positions are get_rope_index's."""
    bb = sharp.load_backbone(name)
    inputs = bb.synthetic_inputs(frames=32 if name == "tiny_qwen2_vl" else 8, batch_size=1, size=(56, 56))
    seen = []
    handle = bb.model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            bb.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    first = seen[0]
    assert first.get("pixel_values_videos") is not None and first.get("video_grid_thw") is not None
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values_videos")}
    ref, _ = bb.model.model.get_rope_index(inputs["input_ids"], **extra)
    got = first.get("position_ids")
    if got is not None:  # 5.x: (4, b, s) = text row + the three M-RoPE rows; 4.57 leaves it to the model
        assert torch.equal(got[-3:], ref)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("past", [0, 5])
def test_causal_mask_matches_hand_built(impl, past):
    bb = sharp.load_backbone("tiny_llava_onevision", attn_implementation=impl)
    q = 3 if past else 7
    hidden = torch.zeros(2, q, bb.text_config.hidden_size)
    mask2d = torch.ones(2, past + q, dtype=torch.long)
    mask2d[1, :2] = 0  # left padding of sample 1
    got = engine_compat.causal_mask(bb.text_config, hidden, mask2d, past=past)
    allowed = (torch.arange(past + q)[None, :] <= torch.arange(past, past + q)[:, None])[None, None]
    allowed = allowed & mask2d.bool()[:, None, None, :]
    if impl == "sdpa":
        assert got.dtype == torch.bool and torch.equal(got, allowed)
    else:
        assert torch.equal(got == 0, allowed) and bool((got[~allowed.expand_as(got)] < -1e30).all())


def test_state_dict_names_match_either_line():
    bb = sharp.load_backbone("tiny_llava_onevision")
    own = bb.model.state_dict()
    moved = {}
    for k, v in own.items():  # rename to the OTHER line's names
        if k.startswith("model.vision_tower.vision_model."):
            k = "model.vision_tower." + k[len("model.vision_tower.vision_model."):]
        elif k.startswith("model.vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("model.vision_tower."):]
        moved[k] = v
    assert set(moved) != set(own)
    assert set(backbone_compat.match_state_dict(bb.model, moved)) == set(own)


def test_cache_keyword_helpers():
    out = type("Out", (), {"past_key_values": None, "cache": "C"})()
    assert engine_compat.output_cache(out) == "C"
    assert engine_compat.cache_of({"past_key_values": "P"}) == "P" and engine_compat.cache_of({"cache": "C"}) == "C"
    assert engine_compat.without_cache({"cache": 1, "past_key_values": 2, "x": 3}, "x") == {}
