"""Structured SegM attention (sharp/engine/masks.py) equals the dense-mask attention."""
import pytest
import torch
import torch.nn.functional as F

import sharp
from sharp.engine import masks
from sharp.methods.segm import segment_mask


def _dense_reference(q, k, v, seg, sees_text):
    s = q.shape[2]
    allowed = masks.SegmentRestriction(seg, sees_text).dense() & torch.ones(s, s, dtype=torch.bool).tril()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)


@pytest.mark.parametrize("sees_text", [True, False])
@pytest.mark.parametrize("mode", ["segments", "flex"])
def test_segments_attention_equals_dense(sees_text, mode):
    torch.manual_seed(0)
    b, h, kv, s, d = 2, 4, 2, 40, 8
    seg = torch.full((b, s), -1)
    seg[0, 5:30] = torch.tensor([0] * 10 + [1] * 3 + [2] * 12)
    seg[1, 3:33] = torch.tensor([0] * 30)
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    restriction = masks.SegmentRestriction(seg, sees_text)
    plan = masks.plan(restriction, torch.ones(b, s, dtype=torch.long))
    assert plan is not None and plan.samples[0] == (5, 30, [(5, 15), (15, 18), (18, 30)])
    plan.mode = mode
    module = type("M", (), {"num_key_value_groups": h // kv})()
    out, _ = masks.segments_attention(module, q, k, v, plan, scaling=d ** -0.5)
    ref = _dense_reference(q, k, v, seg, sees_text)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dense_form_is_segment_mask():
    seg = torch.tensor([[-1, 0, 0, 1, 1, -1]])
    ref = segment_mask(6, [torch.arange(1, 5)], [torch.tensor([0, 0, 1, 1])])
    assert torch.equal(masks.SegmentRestriction(seg).dense(), ref)


def test_plan_refuses_padding_and_gaps():
    seg = torch.tensor([[-1, 0, 0, 1, 1, -1]])
    assert masks.plan(masks.SegmentRestriction(seg), torch.tensor([[0, 1, 1, 1, 1, 1]])) is None
    gapped = torch.tensor([[-1, 0, -1, 1, 1, -1]])
    assert masks.plan(masks.SegmentRestriction(gapped), None) is None
    back = torch.tensor([[-1, 1, 1, 0, 0, -1]])
    assert masks.plan(masks.SegmentRestriction(back), None) is None


@pytest.mark.parametrize("backbone", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_sharp_prefill_same_in_every_mode(backbone):
    """ShaRP with many segments (tau_seg=1.0): logits and selections equal for dense / segments / flex."""
    bb = sharp.load_backbone(backbone)
    inputs = bb.synthetic_inputs(frames=4, seed=0)
    results = {}
    try:
        for mode in ("dense", "segments"):
            masks.set_mode(mode)
            masks.CALLS.clear()
            with sharp.prune(bb, "sharp", 0.5, tau_seg=1.0, cache_dir="") as trace:
                with torch.no_grad():
                    logits = bb.model(**inputs).logits
            assert masks.CALLS.get("segments", 0) == (0 if mode == "dense" else 1)  # layer 0 only
            results[mode] = (logits, [k.tolist() for k in trace.kept[0]], trace.method("sharp").segments)
    finally:
        masks.set_mode("auto")
    assert len(results["dense"][2][0]) > 1  # SegM really restricts
    assert results["dense"][1] == results["segments"][1]
    torch.testing.assert_close(results["dense"][0], results["segments"][0], atol=1e-5, rtol=1e-4)
    # the layer's attention implementation is restored after the prefill
    assert {layer.self_attn.config._attn_implementation for layer in bb.layers} == {bb.text_config._attn_implementation}
