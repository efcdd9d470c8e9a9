"""ShaRP as a method on the tiny backbones: FastV equivalence, SegM isolation, PosC, RegD budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sharp
from sharp.methods import budget, make_method
from sharp.methods.posc import clear_bias_memory
from sharp.methods.sharp import matched_retention
from conftest import shared_backbone

BACKBONES = ["tiny_llava_onevision", "tiny_qwen2_vl"]
OFF = dict(posc=False, segm=False, regd=False)


def backbone(name):
    return shared_backbone(name)


def prefill(bb, inputs):
    with torch.no_grad():
        return bb.model(**inputs).logits


def two_scenes(bb, perturb_frame=None, question="What happens?"):
    """8 frames: scene A (frames 0-3) then scene B (4-7); Eq. 3 splits them at tau_seg = 0.9.

    perturb_frame: add noise to that frame (its scene keeps its segment)."""
    side = bb.frame_size() if bb.kind == "llava_onevision" else 2 * bb.frame_size()
    g = np.random.default_rng(0)
    a, b = (g.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(2))
    frames = np.stack([a] * 4 + [b] * 4)
    if perturb_frame is not None:
        noise = np.random.default_rng(1).integers(-20, 21, frames[perturb_frame].shape)
        frames[perturb_frame] = np.clip(frames[perturb_frame].astype(int) + noise, 0, 255).astype(np.uint8)
    return bb.pixels_to_inputs(frames, question)


@pytest.fixture
def cache_dir(tmp_path):
    clear_bias_memory()
    yield str(tmp_path)
    clear_bias_memory()


# -- configuration -----------------------------------------------------------------------------
def test_defaults_are_the_papers():
    m = make_method("sharp", 0.25)
    assert (m.posc, m.segm, m.regd) == (True, True, True)
    assert (m.lam, m.beta, m.tau_seg, m.tau_filter, m.tau_merge, m.tau_cluster, m.layer) == (
        0.6, 0.008, 0.9, 0.7, 0.8, 0.4, 1)
    assert m.stages(28) == [1] and m.score_layers(28) == [0]
    assert "sharp" in sharp.methods.method_names()
    with pytest.raises(ValueError):
        make_method("sharp", 0.25, absorb="sum")
    with pytest.raises(ValueError):
        make_method("sharp", 0.25, layer=0, score_at="previous")  # "previous" needs layer - 1
    with pytest.raises(TypeError):
        make_method("sharp", 0.25, tau=0.3)


def test_flops_matching_table1():
    # Table 1 (LLaVA-OV, 6272 tokens): FastV 25/20/15/10% <-> ShaRP 28.2/23.5/18.8/14.0%
    for fastv, paper in ((0.25, 0.282), (0.20, 0.235), (0.15, 0.188), (0.10, 0.140)):
        assert abs(matched_retention("llava_onevision_7b", "fastv", fastv) - paper) < 0.0015
    m = make_method("sharp", 0.25, match_flops="fastv", flops_backbone="llava_onevision_7b")
    assert abs(m.effective_retention(6272) - 0.282) < 0.001
    tf_sharp = sharp.flops.prefill_tflops("llava_onevision_7b", m)
    tf_fastv = sharp.flops.prefill_tflops("llava_onevision_7b", "fastv", 0.25)
    assert abs(tf_sharp - tf_fastv) / tf_fastv < 1e-3
    # sharp.flops hands the backbone to the schedule: no flops_backbone needed
    assert sharp.flops.prefill_tflops("llava_onevision_7b", "sharp", 0.25, match_flops="fastv") == pytest.approx(
        tf_fastv, rel=1e-3)
    with pytest.raises(ValueError):
        make_method("sharp", 0.25, match_flops="fastv").token_schedule(6272, 28)  # no dims known


# -- equivalences ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_all_off_keeps_fastvs_tokens(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=3, batch_size=2)
    with sharp.prune(bb, "fastv", 0.25, layer=1) as ft:
        prefill(bb, inputs)
    with sharp.prune(bb, "sharp", 0.25, score_at="previous", posc_space="prob", **OFF) as st:
        prefill(bb, inputs)
    for f, s, t in zip(ft.kept[0], st.kept[0], st.method("sharp").after_topk):
        assert torch.equal(f.sort().values, s.sort().values)
        assert torch.equal(s.sort().values, t)
    # the default "stage" reading scores with layer 1's own map: FastV's choice at K = 2
    with sharp.prune(bb, "fastv", 0.25, layer=2) as ft2:
        prefill(bb, inputs)
    with sharp.prune(bb, "sharp", 0.25, posc_space="prob", **OFF) as st2:
        prefill(bb, inputs)
    for f, s in zip(ft2.kept[0], st2.kept[0]):
        assert torch.equal(f.sort().values, s.sort().values)
    assert st2.visual_tokens_per_layer[1] == budget(bb.layout(inputs).n_visual, 0.25)


@pytest.mark.parametrize("name", BACKBONES)
def test_retention_one_all_off_is_bit_identical(name):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=1, batch_size=2)
    ref = prefill(bb, inputs)
    ref_gen = bb.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with sharp.prune(bb, "sharp", 1.0, **OFF):
        out = prefill(bb, inputs)
        gen = bb.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


# -- SegM --------------------------------------------------------------------------------------
def _layer0_outputs(bb, inputs, **kw):
    captured = {}

    def hook(module, args, output):
        captured["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = bb.layers[0].register_forward_hook(hook)
    try:
        with sharp.prune(bb, "sharp", 1.0, posc=False, regd=False, **kw) as trace:
            prefill(bb, inputs)
    finally:
        handle.remove()
    return captured["out"][0], trace


@pytest.mark.parametrize("name", BACKBONES)
def test_segm_isolates_segments(name):
    bb = backbone(name)
    base, perturbed = two_scenes(bb), two_scenes(bb, perturb_frame=1)
    layout = bb.layout(base)
    vis = bb.visual_mask(base["input_ids"], layout)[0].nonzero().squeeze(1)
    per_scene = layout.n_visual // 2  # scene A = first half of the visual tokens
    scene_b = vis[per_scene:]
    last = base["input_ids"].shape[1] - 1

    out0, tr0 = _layer0_outputs(bb, base, segm=True)
    out1, tr1 = _layer0_outputs(bb, perturbed, segm=True)
    half = layout.frames // 2
    assert tr0.method("sharp").segments == tr1.method("sharp").segments == [[(0, half - 1), (half, layout.frames - 1)]]
    # with SegM, scene B's visual tokens cannot see scene A: bit-for-bit the same outputs
    torch.testing.assert_close(out1[scene_b], out0[scene_b], rtol=0, atol=1e-6)
    # ... while the text after the video sees every frame
    assert (out1[last] - out0[last]).abs().max() > 1e-4
    # without SegM, scene B depends on scene A
    off0, _ = _layer0_outputs(bb, base, segm=False)
    off1, _ = _layer0_outputs(bb, perturbed, segm=False)
    assert (off1[scene_b] - off0[scene_b]).abs().max() > 1e-4
    assert (off1[last] - off0[last]).abs().max() > 1e-4
    # SegM never changes the text rows of layer 0 (text attends as usual)
    torch.testing.assert_close(out0[last], off0[last], rtol=0, atol=1e-6)
    # segm_layers=0 switches the mask off
    zero, _ = _layer0_outputs(bb, base, segm=True, segm_layers=0)
    assert torch.equal(zero, off0)


@pytest.mark.parametrize("name", BACKBONES)
def test_segm_and_the_score_readings(name, cache_dir):
    """score_at="previous" ranks with layer 0's map (its input is the embedding): SegM cannot change
    the scores; score_at="stage" ranks after the masked layer, so SegM changes them."""
    bb = backbone(name)
    inputs = two_scenes(bb)
    scores = {}
    for at in ("previous", "stage"):
        for segm in (True, False):
            with sharp.prune(bb, "sharp", 0.25, score_at=at, segm=segm, regd=False, cache_dir=cache_dir) as t:
                prefill(bb, inputs)
            scores[at, segm] = t.method("sharp").scores
    assert torch.equal(scores["previous", True], scores["previous", False])
    assert not torch.equal(scores["stage", True], scores["stage", False])


# -- PosC --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_posc_lambda_zero_equals_no_posc(name, cache_dir):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=4)
    with sharp.prune(bb, "sharp", 0.25, lam=0.0, cache_dir=cache_dir) as a:
        prefill(bb, inputs)
    with sharp.prune(bb, "sharp", 0.25, posc=False, cache_dir=cache_dir) as b:
        prefill(bb, inputs)
    assert "probe" not in a.stage_times and a.method("sharp").bias is None
    assert torch.equal(a.method("sharp").scores, b.method("sharp").scores)
    assert all(torch.equal(x, y) for x, y in zip(a.kept[0], b.kept[0]))
    assert all(torch.equal(x, y) for x, y in zip(a.method("sharp").after_topk, b.method("sharp").after_topk))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("space", ["prob", "logit"])
def test_posc_black_video_calibrates_to_zero(name, space, cache_dir):
    bb = backbone(name)
    black = bb.black_inputs(bb.synthetic_inputs(frames=8, seed=5))
    with sharp.prune(bb, "sharp", 0.25, lam=1.0, posc_space=space, segm=False, regd=False,
                     cache_dir=cache_dir) as trace:
        prefill(bb, black)
    assert trace.method("sharp").bias.abs().max() > 0
    assert torch.equal(trace.method("sharp").scores, torch.zeros_like(trace.method("sharp").scores))


def test_posc_bias_is_cached_per_layout(cache_dir, monkeypatch):
    bb = backbone("tiny_llava_onevision")
    probes = []
    real_probe = sharp.engine.StageContext.probe

    def counting_probe(self, modify, fn):
        probes.append(1)
        return real_probe(self, modify, fn)

    monkeypatch.setattr(sharp.engine.StageContext, "probe", counting_probe)
    kw = dict(segm=False, regd=False, cache_dir=cache_dir)
    first = bb.synthetic_inputs(frames=8, seed=6)
    other_pixels = bb.synthetic_inputs(frames=8, seed=7)
    with sharp.prune(bb, "sharp", 0.25, **kw) as t1:
        prefill(bb, first)
        prefill(bb, other_pixels)  # same layout: cached in memory
    assert len(probes) == 1 and "probe" not in t1.stage_times
    bias = t1.method("sharp").bias
    clear_bias_memory()
    with sharp.prune(bb, "sharp", 0.25, **kw) as t2:  # a new process would read the disk cache
        prefill(bb, first)
    assert len(probes) == 1 and torch.equal(t2.method("sharp").bias, bias)
    with sharp.prune(bb, "sharp", 0.25, **kw) as t3:  # another layout: one more probe
        prefill(bb, bb.synthetic_inputs(frames=4, seed=6))
    assert len(probes) == 2 and "probe" in t3.stage_times
    with sharp.prune(bb, "sharp", 0.25, posc_key="prompt", **kw):  # the prompt is part of the key
        prefill(bb, first)
        prefill(bb, bb.synthetic_inputs(frames=8, seed=6, question="What is shown in the clip?"))
        prefill(bb, first)
    assert len(probes) == 4
    with sharp.prune(bb, "sharp", 0.25, **{**kw, "cache_dir": ""}):  # memory only
        clear_bias_memory()
        prefill(bb, first)
    assert len(probes) == 5


# -- the whole method --------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_sharp_generates_with_exact_budget(name, cache_dir):
    bb = backbone(name)
    inputs = bb.synthetic_inputs(frames=8, seed=8, batch_size=2)
    n_vis = bb.layout(inputs).n_visual
    with sharp.prune(bb, "sharp", 0.3, cache_dir=cache_dir, tau_seg=0.999) as trace:
        out = bb.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    k = budget(n_vis, 0.3)
    assert [len(x) for x in trace.kept[0]] == [k, k]
    assert trace.visual_tokens_per_layer == [n_vis] + [k] * (bb.num_layers - 1)
    assert len(trace.method("sharp").segments) == 2 and all(s[0][0] == 0 for s in trace.method("sharp").segments)
    for after, kept in zip(trace.method("sharp").after_regd, trace.kept[0]):
        assert torch.equal(after, kept.sort().values.cpu())
    assert all(len(t) == k for t in trace.method("sharp").after_topk)
    for key in ("attn", "probe", "filter", "dedup", "fill", "forward", "prefill"):
        assert key in trace.stage_times, key


@pytest.mark.parametrize("name", BACKBONES)
def test_regd_changes_the_selection_and_keeps_budget(name, cache_dir):
    bb = backbone(name)
    inputs = two_scenes(bb)  # 4 identical frames per scene
    n_vis = bb.layout(inputs).n_visual
    # random tiny weights: force some deduplication (every register pair merges) and keep the tokens
    # for it (almost no pre-filtering), so the case holds for the random weights of either transformers line
    kw = dict(cache_dir=cache_dir, tau_merge=0.0, tau_filter=0.99)
    with sharp.prune(bb, "sharp", 0.3, **kw) as trace:
        prefill(bb, inputs)
    k = budget(n_vis, 0.3)
    assert len(trace.method("sharp").after_regd[0]) == len(trace.method("sharp").after_topk[0]) == k
    assert not torch.equal(trace.method("sharp").after_regd[0], trace.method("sharp").after_topk[0])
    assert trace.stage_times["dedup"] > 0 and trace.stage_times["fill"] > 0
    # absorb="drop" selects the same tokens (merging only changes hidden states)
    with sharp.prune(bb, "sharp", 0.5, absorb="drop", **kw) as dropped:
        logits_drop = prefill(bb, inputs)
    with sharp.prune(bb, "sharp", 0.5, **kw) as merged:
        logits_mean = prefill(bb, inputs)
    assert torch.equal(dropped.kept[0][0], merged.kept[0][0])
    assert not torch.equal(logits_drop, logits_mean)


def test_match_flops_in_a_session(cache_dir):
    bb = backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=9)
    n_vis = bb.layout(inputs).n_visual
    with sharp.prune(bb, "sharp", 0.25, match_flops="fastv", cache_dir=cache_dir) as trace:
        prefill(bb, inputs)
    expected = matched_retention(bb, "fastv", 0.25, n_visual=n_vis)
    assert trace.method("sharp").retention == expected > 0.25
    assert len(trace.kept[0][0]) == budget(n_vis, expected)


# -- the ranking follows the question (issue: a query-guided default) ----------------------------
def test_default_ranking_follows_the_question(name="toy_llava_onevision"):
    """Same video, two questions of equal token length that differ in one colour word: the default
    (score_at="stage") keeps different tokens; the old default ("previous", layer 0's map computed
    from the embeddings, where the last token's query is its id and position) keeps the same ones.
    (On toy_qwen2_vl the kept sets coincide in both readings for such pairs: its layer-1 ranking is
    dominated by the video; docs/sharp.md.) Ranked post-softmax (``posc_space="prob"``): with the
    default pre-softmax logits the kept sets of this pair coincide on toy_llava_onevision too (measured,
    docs/sharp.md)."""
    from sharp.synthetic import ensure_split
    from sharp.toy import question_text

    bb = sharp.load_backbone(name)
    doc = next(d for d in ensure_split("test", n=40) if d["question"].startswith("When does the yellow"))
    q1 = question_text(doc)
    q2 = q1.replace("yellow", "green", 1)
    assert len(bb.tokenizer(q1)["input_ids"]) == len(bb.tokenizer(q2)["input_ids"])
    kept = {}
    for at in ("stage", "previous"):
        for q in (q1, q2):
            kwargs = {} if at == "stage" else {"score_at": at}
            with sharp.prune(bb, "sharp", 0.25, cache_dir="", posc_space="prob", segm_sees_text=True,
                             **kwargs) as trace:
                prefill(bb, bb.prepare(doc["video"], q))
            kept[at, q] = trace.kept[0][0]
    assert make_method("sharp", 0.25).score_at == "stage"
    assert not torch.equal(kept["stage", q1], kept["stage", q2])
    assert torch.equal(kept["previous", q1], kept["previous", q2])


@pytest.mark.parametrize("name", BACKBONES)
def test_literal_segm_mask_does_not_depend_on_the_batch(name):
    """segm_sees_text=False: a one-segment sample's visual rows lose the text keys alone or batched."""
    bb = backbone(name)
    side = bb.frame_size() if bb.kind == "llava_onevision" else 2 * bb.frame_size()
    g = np.random.default_rng(5)
    one_scene = np.stack([g.integers(0, 256, (side, side, 3), dtype=np.uint8)] * 8)
    alone = bb.pixels_to_inputs(one_scene, "What happens?")
    kw = dict(segm_sees_text=False, cache_dir="", posc=False)
    with sharp.prune(bb, "sharp", 0.25, **kw) as t_alone:
        out_alone = prefill(bb, alone)
    assert t_alone.method("sharp").segments == [[(0, bb.layout(alone).frames - 1)]]
    two = two_scenes(bb, question="What happens?")
    batch = {k: torch.cat([alone[k], two[k]]) for k in alone}
    with sharp.prune(bb, "sharp", 0.25, **kw) as t_batch:
        out_batch = prefill(bb, batch)
    assert torch.equal(t_alone.kept[0][0], t_batch.kept[0][0])
    torch.testing.assert_close(out_alone[0], out_batch[0], atol=1e-5, rtol=1e-5)
