"""PruMerge+ (baselines/prumerge_plus.py) against independent references.

The reference is a plain-loop numpy PruMerge+ written from the official code (42Shawn/LLaVA-PruMerge
``clip_encoder.py`` at 097c041: ``outlier_dectection``, ``token_prune_merge_advanced_plus``; the
DivPrune copy's NOT_ADAPTIVE + PLUS for the fixed mode), one frame at a time, one kept token at a
time, in float64. It is run on synthetic attention / keys / features (a stand-in context, B = 1 and
2, frames of unequal size after an earlier pruning), and on the engine's own vision maps of the tiny
backbones through ``sharp.prune`` (maps read by a test-only method, rows read at decoder layer 0).
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Union

import numpy as np
import pytest
import torch

import sharp
from baselines.prumerge_plus import PruMergePlus, fixed_kept
from engine_reference import layer_input
from conftest import shared_backbone, random_video_inputs
from sharp import flops
from sharp.methods import PruningMethod, Selection, budget, register_method, split_budget

FRAMES = 8


# -- the numpy reference (official loops) --------------------------------------------------------------


def ref_merge(a, keys, y, kept, q=32, normalize=False):
    """{i: y_i + sum_{j in NN_q(i)} a_j y_j} for each kept i (NN over ALL other tokens by key cosine),
    the extra token sum_{j not kept} a_j y_j and its carrier (the last dropped token)."""
    n = len(a)
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    rows = {}
    for i in kept:
        others = [j for j in range(n) if j != i]
        cos = {j: float(unit[i] @ unit[j]) for j in others}
        near = sorted(others, key=lambda j: -cos[j])[:min(q, n - 1)]
        acc = sum(a[j] * y[j] for j in near) if near else np.zeros_like(y[i])
        if normalize and near:
            acc = acc / sum(a[j] for j in near)
        rows[i] = y[i] + acc
    dropped = [j for j in range(n) if j not in kept]
    carrier, extra = None, None
    if dropped:
        extra = sum(a[j] * y[j] for j in dropped)
        if normalize:
            extra = extra / sum(a[j] for j in dropped)
        carrier = max(dropped)
    return rows, extra, carrier


def ref_fixed(a, k, share=0.5):
    """(outliers, uniform) of a frame with budget 1 <= k < n: u = int((k-1) share) samples at stride
    n // u from (n // u) // 2 (DivPrune's arange(int(step/2), 575, step)), then the top by a of the rest."""
    n = len(a)
    slots = k - 1
    u = int(slots * share)
    uniform = [(n // u) // 2 + (n // u) * j for j in range(u)] if u else []
    ranked = [j for j in sorted(range(n), key=lambda j: (-a[j], j)) if j not in uniform]
    return ranked[:slots - u], uniform


def ref_adaptive(a):
    """(outliers, uniform) as ``outlier_dectection`` + the PLUS adaptive branch (float32 numpy)."""
    attn_np = a.astype(np.float32)
    q1, q3 = np.percentile(attn_np, 25), np.percentile(attn_np, 75)
    ratio = len(np.where(attn_np > q3 + 1.5 * (q3 - q1))[0]) / len(attn_np)
    n = len(a)
    idx = [int(j) for j in np.argsort(-attn_np, kind="stable")[:int(n * ratio)]]
    step = int(1 / ratio) if ratio > 0 else n  # ratio 0: the official divides by zero (ours: 1 / n)
    seq = np.arange(0, n - 1, max(1, int(step / 3)))
    return idx, [int(x) for x in seq if x not in idx]


def ref_sample(att, keys, y, index, per_frame, k, mode="fixed", share=0.5, q=32, normalize=False, norm="frame"):
    """PruMerge+ of one sample's current tokens (ORIGINAL indices ``index``; att, keys over the ORIGINAL
    tokens; ``y`` the current tokens' rows, in their order): kept ORIGINAL
    indices (sorted), {original index: new row}, outliers, uniform, carriers, frame counts."""
    att = np.asarray(att, np.float64)
    frames = sorted(set(int(i) // per_frame for i in index))
    counts = [sum(1 for i in index if int(i) // per_frame == f) for f in frames]
    budgets = split_budget(k, counts) if mode == "fixed" else [None] * len(frames)
    out = SimpleNamespace(kept=[], rows={}, outliers=[], uniform=[], carriers=[], frame_kept=[])
    for f, n, k_f in zip(frames, counts, budgets):
        pos = [p for p, i in enumerate(index) if int(i) // per_frame == f]
        orig = [int(index[p]) for p in pos]
        a = att[orig] / (att[f * per_frame:(f + 1) * per_frame].sum() if norm == "frame" else 1.0)
        if mode == "fixed" and k_f >= n:
            out.kept += orig
            out.frame_kept.append(n)
            continue
        if mode == "fixed" and k_f == 0:
            out.frame_kept.append(0)
            continue
        outl, unif = ref_fixed(a, k_f, share) if mode == "fixed" else ref_adaptive(a.astype(np.float32))
        kept = outl + unif
        rows, extra, carrier = ref_merge(a, keys[orig].astype(np.float64), y[pos].astype(np.float64), kept, q,
                                         normalize)
        out.rows.update({orig[i]: r for i, r in rows.items()})
        out.kept += [orig[i] for i in kept]
        out.outliers += [orig[i] for i in outl]
        out.uniform += [orig[i] for i in unif]
        if carrier is not None:
            out.rows[orig[carrier]] = extra
            out.kept.append(orig[carrier])
            out.carriers.append(orig[carrier])
        out.frame_kept.append(len(kept) + (carrier is not None))
    for key in ("kept", "outliers", "uniform", "carriers"):
        setattr(out, key, sorted(getattr(out, key)))
    return out


# -- a stand-in StageContext on synthetic maps -----------------------------------------------------------


class SyntheticContext:
    """What PruMergePlus.select reads of a StageContext: the visual tokens ``index[b]`` (ORIGINAL
    indices, sequence order) of every sample at positions 0..n_b-1 (padding rows after them)."""

    def __init__(self, attention, keys, rows, index, per_frame):
        self.n_visual = attention.shape[1]
        self.layout = SimpleNamespace(tokens_per_frame=per_frame, n_visual=self.n_visual)
        self._maps = SimpleNamespace(attention=attention, keys=keys)
        self._index = index
        width = max(len(i) for i in index)
        self.hidden_states = torch.zeros(len(index), width + 2, rows.shape[-1])
        for b, i in enumerate(index):
            self.hidden_states[b, :len(i)] = rows[b, i]
        self.visual_counts = [len(i) for i in index]
        self.trace = SimpleNamespace()
        self.split_budget = staticmethod(split_budget)

    def budget(self, retention):
        return [min(budget(self.n_visual, retention), n) for n in self.visual_counts]

    def vision(self, layer):
        return self._maps

    def timed(self, key):
        return contextlib.nullcontext()

    def visual_tokens(self, b):
        index = self._index[b]
        return SimpleNamespace(positions=torch.arange(len(index)), index=index,
                               frame=index // self.layout.tokens_per_frame)


def synthetic(seed, b=1, frames=4, per_frame=36, h=6, d=8, peaky=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, frames, per_frame, generator=g) * (2.5 if peaky else 1.0)
    attention = torch.softmax(logits, dim=-1).reshape(b, -1) * 0.3  # a mapped map: no longer sums to 1
    keys = torch.randn(b, frames * per_frame, h, generator=g)
    rows = torch.randn(b, frames * per_frame, d, generator=g)
    return attention, keys, rows


def run_synthetic(method, attention, keys, rows, index, per_frame):
    ctx = SyntheticContext(attention, keys, rows, index, per_frame)
    sel = method.select(ctx)
    return ctx, sel


def check_against_reference(ctx, sel, attention, keys, rows, index, per_frame, k_total, **ref_kw):
    t = ctx.trace
    for b, idx in enumerate(index):
        ref = ref_sample(attention[b].numpy(), keys[b].numpy(), rows[b, idx].numpy(), idx.tolist(), per_frame,
                         k_total[b], **ref_kw)
        got = sorted(idx[sel.keep_visual[b]].tolist())
        assert got == ref.kept
        assert t.outliers[b].tolist() == ref.outliers and t.uniform[b].tolist() == ref.uniform
        assert t.carriers[b].tolist() == ref.carriers and t.frame_kept[b].tolist() == ref.frame_kept
        row_of = {int(i): p for p, i in enumerate(idx.tolist())}
        for i in got:  # every kept row: merged, extra token, or unchanged
            want = ref.rows.get(i, rows[b, i].double().numpy())
            np.testing.assert_allclose(sel.hidden_states[b, row_of[i]].double().numpy(), want, atol=1e-5, rtol=1e-5)
    return t


# -- synthetic maps, B = 1 and B = 2 -------------------------------------------------------------------


@pytest.mark.parametrize("retention", [0.25, 0.5, 0.1])
def test_fixed_mode_equals_numpy_reference(retention):
    """B = 1, 4 frames of 36 (6 x 6): kept count, outliers, samples, carriers, merged rows and extra tokens."""
    attention, keys, rows = synthetic(0)
    index = [torch.arange(144)]
    ctx, sel = run_synthetic(PruMergePlus(retention=retention, vision_layer=-1), attention, keys, rows, index, 36)
    k = budget(144, retention)
    t = check_against_reference(ctx, sel, attention, keys, rows, index, 36, [k])
    assert len(sel.keep_visual[0]) == k and sum(t.frame_kept[0].tolist()) == k
    assert t.budget == [k] and t.mode == "fixed" and t.vision_layer == -1


@pytest.mark.parametrize("kwargs", [{"normalize": True}, {"uniform_share": 0.0}, {"uniform_share": 1.0},
                                    {"neighbours": 3, "attention_norm": "none"}])
def test_readings_equal_numpy_reference(kwargs):
    """Each reading kwarg changes what its reference says; B = 2, different maps per sample."""
    attention, keys, rows = synthetic(1, b=2)
    index = [torch.arange(144)] * 2
    method = PruMergePlus(retention=0.25, vision_layer=-1, **kwargs)
    ctx, sel = run_synthetic(method, attention, keys, rows, index, 36)
    ref_kw = {"share": kwargs.get("uniform_share", 0.5), "q": kwargs.get("neighbours", 32),
              "normalize": kwargs.get("normalize", False), "norm": kwargs.get("attention_norm", "frame")}
    check_against_reference(ctx, sel, attention, keys, rows, index, 36, [36, 36], **ref_kw)
    if kwargs.get("uniform_share") == 0.0:
        assert all(len(u) == 0 for u in ctx.trace.uniform)  # PruMerge's fixed mode: outliers only


def test_uneven_frames_after_an_earlier_pruning():
    """Current tokens a subset (frames of 36, 20, 36, 9): budgets split over the current counts, the
    frame weights still normalised over each frame's ORIGINAL tokens; a frame whose budget covers it
    stays unchanged."""
    attention, keys, rows = synthetic(2, b=2)
    g = torch.Generator().manual_seed(5)
    drop1 = torch.randperm(36, generator=g)[:16] + 36
    drop3 = torch.randperm(36, generator=g)[:27] + 108
    keep = torch.ones(144, dtype=torch.bool)
    keep[drop1] = keep[drop3] = False
    index = [keep.nonzero().squeeze(1), torch.arange(144)]
    ctx, sel = run_synthetic(PruMergePlus(retention=0.3, vision_layer=-1), attention, keys, rows, index, 36)
    k = budget(144, 0.3)
    check_against_reference(ctx, sel, attention, keys, rows, index, 36, [min(k, 101), k])
    # one frame kept whole: budget 10 over frames of [1, 50]
    attention, keys, rows = synthetic(3, frames=2, per_frame=50)
    index = [torch.tensor([7] + list(range(50, 100)))]
    ctx, sel = run_synthetic(PruMergePlus(retention=0.1, vision_layer=-1), attention, keys, rows, index, 50)
    assert split_budget(10, [1, 50]) == [0, 10]
    check_against_reference(ctx, sel, attention, keys, rows, index, 50, [10])
    ctx, sel = run_synthetic(PruMergePlus(retention=0.5, vision_layer=-1), attention, keys, rows, index, 50)
    assert split_budget(50, [1, 50]) == [0, 50]  # frame 0 dropped, frame 1 whole: unchanged, no extra token
    assert ctx.trace.frame_kept[0].tolist() == [0, 50] and len(ctx.trace.carriers[0]) == 0
    assert sorted(sel.keep_visual[0].tolist()) == list(range(1, 51))
    assert torch.equal(sel.hidden_states, ctx.hidden_states)


def test_adaptive_mode_equals_official_count_on_576_tokens():
    """One CLIP-sized image (576 tokens, peaky CLS-like weights, B = 1): the kept count is int(576 ratio)
    outliers + the samples not among them + 1 (official), and the merged rows match."""
    attention, keys, rows = synthetic(4, frames=1, per_frame=576, peaky=True)
    index = [torch.arange(576)]
    ctx, sel = run_synthetic(PruMergePlus(retention=0.25, mode="adaptive", vision_layer=-1), attention, keys, rows,
                             index, 576)
    t = check_against_reference(ctx, sel, attention, keys, rows, index, 576, [None], mode="adaptive")
    outl, unif = ref_adaptive((attention[0] / attention[0].sum()).numpy())
    a32 = (attention[0] / attention[0].sum()).numpy().astype(np.float32)
    q1, q3 = np.percentile(a32, 25), np.percentile(a32, 75)
    ratio = int((a32 > q3 + 1.5 * (q3 - q1)).sum()) / 576
    assert ratio > 0 and len(outl) == int(576 * ratio)
    assert len(sel.keep_visual[0]) == int(576 * ratio) + len(unif) + 1 == len(t.outliers[0]) + len(t.uniform[0]) + 1


def test_adaptive_mode_per_frame_b2():
    attention, keys, rows = synthetic(6, b=2, peaky=True)
    index = [torch.arange(144)] * 2
    ctx, sel = run_synthetic(PruMergePlus(retention=0.25, mode="adaptive", vision_layer=-1), attention, keys, rows,
                             index, 36)
    check_against_reference(ctx, sel, attention, keys, rows, index, 36, [None, None], mode="adaptive")
    assert PruMergePlus(mode="adaptive").input_dependent_schedule and not PruMergePlus().input_dependent_schedule


def test_fixed_samples_are_divprunes_arange():
    """NOT_ADAPTIVE = 1/8 with TYPE = PLUS on 576 tokens keeps int(576/8) = 72 outliers plus
    arange(4, 575, 8) (72 samples) plus the extra token: 145 = our budget 145 of one 576-token frame.
    196 tokens at 25% (49): 24 outliers, 24 samples at 4, 12, ..., 188, 1 extra."""
    a = torch.rand(2, 576)
    out, uni = fixed_kept(a, torch.tensor([145, 145]), 0.5)
    assert uni[0].nonzero().squeeze(1).tolist() == list(range(4, 575, 8)) and out.sum(1).tolist() == [72, 72]
    out, uni = fixed_kept(a[:, :196], torch.tensor([49, 49]), 0.5)
    assert uni[0].nonzero().squeeze(1).tolist() == list(range(4, 196, 8)) and out.sum(1).tolist() == [24, 24]
    assert not (out & uni).any()


# -- through sharp.prune on the tiny backbones --------------------------------------------------------


@register_method
@dataclass
class _PruMergeMapsSpy(PruningMethod):
    """Test-only: records ``ctx.vision(layer)`` (the engine's maps, tests/test_vision.py checks them
    against the towers' eager attention) and changes nothing."""

    name = "_prumerge_maps_spy"
    vision_layer: Union[int, str] = -1

    def stages(self, num_layers):
        return [0]

    def vision_layers(self):
        return [self.vision_layer]

    def select(self, ctx):
        maps = ctx.vision(self.vision_layer)
        ctx.trace.attention, ctx.trace.keys = maps.attention.clone(), maps.keys.float().clone()
        return Selection.unchanged()


def video_inputs(bb, seeds):
    return random_video_inputs(bb, seeds, FRAMES)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_through_prune_equals_reference_on_engine_maps(name, mode):
    """Two videos in a batch: kept set, per-frame counts and layer-0 rows equal the numpy reference over
    the engine's maps of the family's layer (the tower's last) and the vanilla input embeddings."""
    bb = shared_backbone(name, "eager")
    inputs = video_inputs(bb, (1, 2))
    layout = bb.layout(inputs)
    emb, spy = layer_input(bb, inputs, "_prumerge_maps_spy", 1.0)
    maps = spy.method("_prumerge_maps_spy")
    got, trace = layer_input(bb, inputs, "prumerge_plus", 0.25, mode=mode)
    t = trace.method("prumerge_plus")
    ov = name == "tiny_llava_onevision"
    assert t.vision_layer == ("feature" if ov else -1) and t.mode == mode
    n, per = layout.n_visual, layout.tokens_per_frame
    vis = bb.visual_mask(inputs["input_ids"], layout)
    start = int(vis[0].nonzero()[0])
    k = budget(n, 0.25)
    for b in range(2):
        ref = ref_sample(maps.attention[b].numpy(), maps.keys[b].numpy(), emb[b, vis[b]].float().numpy(),
                         list(range(n)), per, k, mode=mode)
        kept = trace.kept[0][b].tolist()
        assert kept == ref.kept and t.frame_kept[b].tolist() == ref.frame_kept
        assert t.carriers[b].tolist() == ref.carriers and len(ref.carriers) == layout.frames
        if mode == "fixed":
            assert len(kept) == k
        shift = max(len(kept_b) for kept_b in trace.kept[0]) - len(kept)  # the engine left-pads shorter samples
        rows = got[b, shift + start:shift + start + len(kept)]  # text, kept visual tokens in order, text
        for p, j in enumerate(kept):
            np.testing.assert_allclose(rows[p].double().numpy(), ref.rows.get(j, emb[b, vis[b]][j].double().numpy()),
                                       atol=1e-5, rtol=1e-5)
    if mode == "fixed":
        assert trace.visual_tokens_per_layer == [k] * bb.num_layers
    else:  # measured: the trace follows what was kept
        assert trace.visual_tokens_per_layer == [len(trace.kept[0][0])] * bb.num_layers


def test_full_retention_is_identity_in_adaptive_mode():
    bb = shared_backbone("tiny_llava_onevision", "eager")
    inputs = bb.synthetic_inputs(frames=FRAMES, seed=3)
    with torch.no_grad():
        want = bb.model(**inputs).logits
    with sharp.prune(bb, "prumerge_plus", 1.0, mode="adaptive") as trace, torch.no_grad():
        got = bb.model(**inputs).logits
    assert torch.equal(got, want) and trace.visual_tokens_per_layer == [bb.layout(inputs).n_visual] * bb.num_layers


def test_family_vision_layers():
    for name, layer in [("tiny_llava_onevision", "feature"), ("tiny_llava_video", "feature"), ("tiny_qwen2_vl", -1),
                        ("tiny_qwen2_5_vl", -1), ("tiny_qwen3_vl", -1)]:
        assert sharp.resolve_method("prumerge_plus", name, 0.25).method.vision_layer == layer
    assert sharp.resolve_method("prumerge_plus", "tiny_llava_onevision", 0.25).method.positions == "compact"
    assert sharp.resolve_method("prumerge_plus", "tiny_qwen2_vl", 0.25).method.positions == "original"


# -- FLOPs, errors ----------------------------------------------------------------------------------------


def test_token_schedule_and_tflops():
    n = 6272  # 32 x 196
    assert flops.token_schedule("llava_onevision_7b", "prumerge_plus", 0.25, visual_tokens=n) == [1568] * 28
    assert split_budget(1568, [196] * 32) == [49] * 32  # 24 outliers + 24 samples + 1 extra per frame
    fixed = flops.prefill_tflops("llava_onevision_7b", "prumerge_plus", 0.25, visual_tokens=n)
    assert fixed == pytest.approx(flops.prefill_tflops("llava_onevision_7b", "visionzip", 0.25, visual_tokens=n))


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of 'fixed', 'adaptive', got 'iqr'"):
        sharp.make_method("prumerge_plus", 0.2, mode="iqr")
    with pytest.raises(ValueError, match=r"uniform_share must be in \[0, 1\]"):
        sharp.make_method("prumerge_plus", 0.2, uniform_share=1.5)
    with pytest.raises(ValueError, match="neighbours must be an int >= 0"):
        sharp.make_method("prumerge_plus", 0.2, neighbours=-1)
    with pytest.raises(ValueError, match="attention_norm must be one of 'frame', 'none', got 'sum'"):
        sharp.make_method("prumerge_plus", 0.2, attention_norm="sum")
    with pytest.raises(ValueError, match="vision_layer must be None .* 'feature', got 'last'"):
        sharp.make_method("prumerge_plus", 0.2, vision_layer="last")
    with pytest.raises(ValueError, match="vision layer"), sharp.prune(
            shared_backbone("tiny_llava_onevision", "eager"), "prumerge_plus", 0.2, vision_layer=7):
        pass
