"""ShaRP's readings of issue 34: SegM in the forward or only in the pass that ranks (``segm_pass``),
the literal Eq. 4 mask and Eq. 5 on the pre-softmax a~ as defaults, and PosC under the same mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sharp
from sharp.methods import make_method
from sharp.methods.posc import clear_bias_memory
from conftest import shared_backbone

FAMILIES = ["tiny_llava_onevision", "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_llava_video"]


def two_scenes(bb, question="What happens?"):
    """8 frames: one random image for frames 0-3, another for 4-7 (Eq. 3 cuts between them)."""
    h, w = bb.synthetic_frame_size()
    g = np.random.default_rng(0)
    a, b = (g.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2))
    return bb.pixels_to_inputs(np.stack([a] * 4 + [b] * 4), question)


@pytest.fixture
def cache_dir(tmp_path):
    clear_bias_memory()
    yield str(tmp_path)
    clear_bias_memory()


def prefill(bb, inputs):
    with torch.no_grad():
        return bb.model(**inputs).logits


def test_defaults_and_validation():
    m = make_method("sharp", 0.25)
    # Eq. 4 (a visual row sees its segment only), Eq. 2 / 5 (a~ is the pre-softmax score), SegM in the
    # forward (Sec. 4.1's "information flow"; Table 4's Attn. column), centres = the first token
    assert (m.segm_pass, m.segm_sees_text, m.posc_space, m.centre) == ("forward", True, "prob", "first")
    for bad in (dict(segm_pass="ranking"), dict(centre="centroid")):
        with pytest.raises(ValueError, match="must be one of"):
            make_method("sharp", 0.25, **bad)
    # "scoring" recomputes only the layers before the pruning point
    assert make_method("sharp", 0.25, segm_pass="scoring", segm_layers=3).n_segm_layers == 1
    assert make_method("sharp", 0.25, segm_layers=3).n_segm_layers == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_scoring_pass_is_the_identity_at_retention_one(name, cache_dir):
    """segm_pass="scoring" at retention 1.0 generates exactly what the unpruned model generates (on a
    two-scene video, where the scoring pass does run); "forward" changes the prefill there."""
    bb = shared_backbone(name)
    inputs = two_scenes(bb)
    ref_logits = prefill(bb, inputs)
    ref = bb.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    probes = []
    real_probe = sharp.engine.StageContext.probe

    def counting_probe(self, modify, fn):
        probes.append(modify)
        return real_probe(self, modify, fn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sharp.engine.StageContext, "probe", counting_probe)
        with sharp.prune(bb, "sharp", 1.0, segm_pass="scoring", cache_dir=cache_dir) as trace:
            logits = prefill(bb, inputs)
            out = bb.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert len(trace.method("sharp").segments[0]) > 1  # several segments: Eq. 4 restricts
    assert any(getattr(m, "__name__", "") == "_unchanged" for m in probes)  # the scoring pass ran
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out, ref)
    with sharp.prune(bb, "sharp", 1.0, cache_dir=cache_dir) as forward:  # the default, SegM in the forward
        forward_logits = prefill(bb, inputs)
    assert len(forward.method("sharp").segments[0]) > 1
    assert not torch.allclose(forward_logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("sees_text", [False, True])
def test_scoring_pass_ranks_with_the_masked_layer(name, sees_text, cache_dir):
    """The scoring pass recomputes layer 0 under Eq. 4 for the ranking: its scores equal those of the
    forward reading (where layer 1's input IS the masked layer 0's output), computed another way."""
    bb = shared_backbone(name)
    inputs = two_scenes(bb)
    kw = dict(posc=False, regd=False, segm_sees_text=sees_text, posc_space="logit", cache_dir=cache_dir)
    scores = {}
    for segm_pass in ("forward", "scoring"):
        with sharp.prune(bb, "sharp", 0.25, segm_pass=segm_pass, **kw) as t:
            prefill(bb, inputs)
        scores[segm_pass] = t.method("sharp").scores
    with sharp.prune(bb, "sharp", 0.25, segm=False, **{k: v for k, v in kw.items()}) as plain:
        prefill(bb, inputs)
    torch.testing.assert_close(scores["scoring"], scores["forward"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scores["scoring"], plain.method("sharp").scores, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("segm_pass", ["forward", "scoring"])
def test_posc_bias_sees_the_literal_mask(name, segm_pass, cache_dir):
    """With the literal Eq. 4 mask a one-segment (black) video is still restricted (its visual rows lose
    the text keys): the PosC probe applies the same mask, so a black video calibrates to exactly 0."""
    bb = shared_backbone(name)
    black = bb.black_inputs(bb.synthetic_inputs(frames=8, seed=5))
    kw = dict(lam=1.0, regd=False, segm_pass=segm_pass, segm_sees_text=False, posc_space="logit", cache_dir=cache_dir)
    with sharp.prune(bb, "sharp", 0.25, **kw) as literal:
        prefill(bb, black)
    t = literal.method("sharp")
    assert t.segments == [[(0, bb.layout(black).frames - 1)]] and t.bias.abs().max() > 0
    assert torch.equal(t.scores, torch.zeros_like(t.scores))
    with sharp.prune(bb, "sharp", 0.25, segm=False, **kw) as unmasked:
        prefill(bb, black)
    assert not torch.allclose(unmasked.method("sharp").bias, t.bias, atol=1e-6)
