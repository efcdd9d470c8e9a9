"""VidCom2 (baselines/vidcom2.py) against an independent numpy reference of the official Steps 1-4.

The reference is written from the official ``token_compressor/vidcom2/vidcom2.py`` (xuyang-liu16/VidCom2
at 944a17d) as plain numpy with a loop over the frames: biased channel variances, the int(0.5 C)
lowest kept, L2 rows, video / frame means, the 5-width Gaussian kernel, u_t = -mean V, the tau = 0.01
softmax, s_t = min(1, r (1 + p_t - 1/T)), k_t = max(1, round-half-even(s_t M)), the k_t lowest V + F
per frame, sorted. The method runs in float64 for exact equality and in its default float32 where the
float64 reference leaves a margin no float32 error can cross.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import sharp
from baselines.vidcom2 import VidCom2, vidcom2_video
from engine_reference import layer_input
from conftest import shared_backbone, random_video_inputs
from sharp import PruningMethod, Selection

WIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)
FLOAT32_MARGIN = 1e-4  # float32 scores of magnitude ~10 carry errors ~1e-6


# -- the reference ----------------------------------------------------------------------------------


def reference_vidcom2(frames: list[np.ndarray], r: float, m: int, ratio: float = 0.5, tau: float = 0.01) -> dict:
    """Official Steps 1-4 on one video given as a list of (M_t, C) float64 arrays (frame order), M the
    original tokens per frame. Returns k (per frame), keep (indices into the concatenated tokens),
    s, p and the margins: per frame the gap between the k-th and (k+1)-th lowest V + F, and
    |frac(s_t M) - 0.5| (how far the rounding is from a tie)."""
    x = np.concatenate(frames)
    n, c = x.shape
    variance = ((x - x.mean(axis=0)) ** 2).sum(axis=0) / n  # biased
    channels = np.argsort(variance, kind="stable")[: max(1, int(c * ratio))]
    units = []
    for f in frames:
        sub = f[:, channels]
        units.append(sub / np.maximum(np.sqrt((sub ** 2).sum(axis=1, keepdims=True)), 1e-12))
    g = np.concatenate(units).mean(axis=0)

    def kernel(rows, centre):
        d = ((rows - centre) ** 2).sum(axis=1)
        return sum(np.exp(-d / (2 * a)) for a in WIDTHS)

    big_t = len(frames)
    v = [kernel(u, g) for u in units]
    fs = [kernel(u, u.mean(axis=0)) for u in units]
    uniq = np.array([-vt.mean() for vt in v])
    e = np.exp((uniq - uniq.max()) / tau)
    p = e / e.sum()
    s = np.minimum(1.0, r * (1 + p - 1 / big_t))
    k, keep, gaps, ties, offset = [], [], [], [], 0
    for t in range(big_t):
        k_t = min(len(frames[t]), max(1, int(np.round(s[t] * m))))  # np.round: half to even, as torch
        score = v[t] + fs[t]
        order = np.argsort(score, kind="stable")
        keep.extend(sorted(offset + int(i) for i in order[:k_t]))
        ordered = score[order]
        gaps.append(ordered[k_t] - ordered[k_t - 1] if k_t < len(score) else np.inf)
        ties.append(abs(s[t] * m - np.floor(s[t] * m) - 0.5))
        k.append(k_t)
        offset += len(frames[t])
    return {"k": k, "keep": keep, "s": s, "p": p, "gap": np.array(gaps), "tie": np.array(ties)}


def random_video(t: int, m: int, c: int, seed: int) -> np.ndarray:
    """(t, m, c) features with per-frame offsets (frames of different "content") and channel scales."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 2.0, c)
    return rng.normal(size=(t, m, c)) * scale + rng.normal(size=(t, 1, c)) * 0.5


def run_ours(frames: list[np.ndarray], r: float, m: int, dtype=torch.float64, **kw):
    x = torch.tensor(np.concatenate(frames), dtype=dtype)
    frame = torch.cat([torch.full((len(f),), t) for t, f in enumerate(frames)])
    return vidcom2_video(x, frame, r, m, **kw)


def frames_of(video: np.ndarray) -> list[np.ndarray]:
    return [video[t] for t in range(video.shape[0])]


# -- Steps 1-4 on random input ----------------------------------------------------------------------


@pytest.mark.parametrize("t,m,c,r,seed", [(32, 196, 384, 0.25, 0), (8, 16, 64, 0.1, 1), (5, 49, 130, 0.5, 2),
                                          (1, 30, 16, 0.25, 3), (6, 20, 40, 1.0, 4)])
def test_counts_and_kept_sets_equal_the_reference(t, m, c, r, seed):
    """k_t and every frame's kept set equal the numpy reference (float64 both); the kept indices are
    ascending, frame-major."""
    frames = frames_of(random_video(t, m, c, seed))
    ref = reference_vidcom2(frames, r, m)
    got = run_ours(frames, r, m)
    assert got.budget.tolist() == ref["k"]
    assert got.keep.tolist() == ref["keep"]
    np.testing.assert_allclose(got.share.numpy(), ref["s"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.weight.numpy(), ref["p"], rtol=1e-9, atol=1e-12)
    assert got.channels == max(1, int(c * 0.5))


def one_cut_video(t: int, m: int, c: int, seed: int, cut: int) -> np.ndarray:
    """(t, m, c): every frame one shared scene (a common vector + noise) except frame ``cut``, another
    scene: the one unique frame of the notes' example."""
    rng = np.random.default_rng(seed)
    video = rng.normal(size=c) + rng.normal(size=(t, m, c)) * 0.8 + rng.normal(size=(t, 1, c)) * 0.3
    video[cut] = rng.normal(size=c) + rng.normal(size=(m, c)) * 0.8
    return video


def test_notes_example_32x196_total_is_input_dependent():
    """The notes' setting: 32 frames x 196 tokens, r = 0.25, one frame unlike the rest. The kept total
    is the reference's sum_t k_t, not round(r T M) = 1568: the frames with p_t ~ 0 get
    round(r (1 - 1/T) M) (47.47 -> 47) and the unique one round(r (1 + p_t - 1/T) M)."""
    t, m, r, cut = 32, 196, 0.25, 5
    frames = frames_of(one_cut_video(t, m, 384, 0, cut))
    ref = reference_vidcom2(frames, r, m)
    got = run_ours(frames, r, m)
    assert got.budget.tolist() == ref["k"] and got.keep.tolist() == ref["keep"]
    total = sum(ref["k"])
    assert len(got.keep) == total and int(np.argmax(ref["p"])) == cut
    flat = int(np.round(r * (1 - 1 / t) * m))
    assert all(k == flat for f, k in enumerate(ref["k"]) if f != cut)
    assert ref["k"][cut] == int(np.round(min(1.0, r * (1 + ref["p"][cut] - 1 / t)) * m)) > flat
    assert total == (t - 1) * flat + ref["k"][cut] != round(r * t * m)
    # the default float32 path: the same counts and sets wherever float32 cannot cross a margin
    _assert_equal_where_float32_is_safe(run_ours(frames, r, m, dtype=torch.float32), ref, frames)


def test_bfloat16_compute_changes_the_budgets_as_the_official_dtype_would():
    """compute_dtype="model" computes in the embeddings' dtype (the official Qwen2.5-VL bf16): on the
    notes' example r (1 - 1/T) M = 47.47 is held as 47.5 in bf16 and rounds (half to even) to 48, so
    every flat frame keeps one token more than in float32 / float64."""
    t, m, r, cut = 32, 196, 0.25, 5
    frames = frames_of(one_cut_video(t, m, 384, 0, cut))
    ref = reference_vidcom2(frames, r, m)
    got = run_ours(frames, r, m, dtype=torch.bfloat16)
    flat_bf16 = int(torch.round(torch.tensor(r * (1 - 1 / t), dtype=torch.bfloat16) * m))
    assert flat_bf16 != ref["k"][0]
    assert all(int(k) == flat_bf16 for f, k in enumerate(got.budget) if f != cut)


def test_float32_equals_the_reference_on_random_input():
    frames = frames_of(random_video(32, 196, 384, 0))
    ref = reference_vidcom2(frames, 0.25, 196)
    _assert_equal_where_float32_is_safe(run_ours(frames, 0.25, 196, dtype=torch.float32), ref, frames)


def _assert_equal_where_float32_is_safe(got, ref, frames) -> None:
    """Per frame: k_t equal when s_t M is not within the margin of a .5 tie; the kept set equal when
    additionally the k-th / (k+1)-th scores are more than the margin apart. At least half the frames
    must be checkable (so the check cannot pass vacuously)."""
    bounds = np.cumsum([0] + [len(f) for f in frames])
    got_keep = got.keep.numpy()
    checked = 0
    for t in range(len(frames)):
        if ref["tie"][t] <= FLOAT32_MARGIN:
            continue
        assert int(got.budget[t]) == ref["k"][t], t
        if ref["gap"][t] <= FLOAT32_MARGIN:
            continue
        mine = got_keep[(got_keep >= bounds[t]) & (got_keep < bounds[t + 1])].tolist()
        theirs = [i for i in ref["keep"] if bounds[t] <= i < bounds[t + 1]]
        assert mine == theirs, t
        checked += 1
    assert checked >= len(frames) // 2


def test_unequal_frames_equal_the_reference():
    """Frames with different current counts (after another method): per-frame M_t for f_t, u_t and the
    cap, the ORIGINAL M for k_t = min(M_t, max(1, round(s_t M)))."""
    m = 24
    video = random_video(6, m, 48, 5)
    rng = np.random.default_rng(6)
    frames = [video[t][np.sort(rng.choice(m, size=n, replace=False))] for t, n in enumerate([24, 3, 17, 1, 9, 24])]
    for r in (0.25, 0.6, 1.0):
        ref = reference_vidcom2(frames, r, m)
        got = run_ours(frames, r, m)
        assert got.budget.tolist() == ref["k"] and got.keep.tolist() == ref["keep"]
        assert all(k <= len(f) for k, f in zip(ref["k"], frames))


def test_frame_ids_with_gaps_and_kwargs():
    """Frame ids need not be 0..T-1 (an emptied frame is absent); channel_ratio and temperature are the
    reference's ratio and tau."""
    frames = frames_of(random_video(4, 12, 32, 7))
    x = torch.tensor(np.concatenate(frames))
    gapped = torch.cat([torch.full((12,), t) for t in (0, 2, 3, 7)])
    got = vidcom2_video(x, gapped, 0.3, 12, channel_ratio=0.25, temperature=0.5)
    ref = reference_vidcom2(frames, 0.3, 12, ratio=0.25, tau=0.5)
    assert got.budget.tolist() == ref["k"] and got.keep.tolist() == ref["keep"] and got.channels == 8


# -- through sharp.prune ------------------------------------------------------------------------------


def video_inputs(bb, seeds=(1, 2), frames=8):
    return random_video_inputs(bb, seeds, frames)


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_qwen2_5_vl"])
def test_prune_keeps_the_reference_set_of_the_layer0_embeddings(name):
    """Through sharp.prune (batch 2, two videos, default float32): the trace's kept indices and per-frame budgets equal
    the reference on each sample's layer-0 visual embeddings, the kept rows enter layer 0 unchanged
    (no merging; the batch is left-padded when the samples' counts differ), and the measured schedule is
    the kept count in every layer."""
    bb = shared_backbone(name)
    inputs = video_inputs(bb)
    layout = bb.layout(inputs)
    per, n = layout.tokens_per_frame, layout.n_visual
    emb, _ = layer_input(bb, inputs)
    r = 0.3  # 0.25 x (1 - 1/8) x 16 = 3.5 is an exact rounding tie on the tiny OV frames
    method = sharp.resolve_method("vidcom2", bb, r).method  # the default float32
    got, trace = layer_input(bb, inputs, method)
    t = trace.method("vidcom2")
    vis = bb.visual_mask(inputs["input_ids"], layout)
    for b in range(2):
        rows = emb[b, vis[b]].double().numpy()  # (N, C) in frame-major order
        frames = [rows[f * per:(f + 1) * per] for f in range(n // per)]
        ref = reference_vidcom2(frames, r, per)
        # float32 against the float64 reference: the tiny inputs leave wide margins (asserted, not assumed)
        assert ref["gap"].min() > FLOAT32_MARGIN and ref["tie"].min() > FLOAT32_MARGIN
        assert trace.kept[0][b].tolist() == ref["keep"]
        assert t.frame_budget[b] == ref["k"] and t.kept_count[b] == sum(ref["k"])
        # the unpruned sequence without the dropped visual rows, left-padded to the batch's longest
        dropped = vis[b].nonzero().squeeze(1)[sorted(set(range(n)) - set(ref["keep"]))]
        kept_rows = emb[b][torch.ones(emb.shape[1], dtype=torch.bool).index_fill_(0, dropped, False)]
        torch.testing.assert_close(got[b, got.shape[1] - len(kept_rows):], kept_rows)
    assert trace.stage_layers == [0]
    assert trace.visual_tokens_per_layer == [t.kept_count[0]] * bb.num_layers
    assert method.positions == ("compact" if name == "tiny_llava_onevision" else "original")


@dataclass
class _DropSome(PruningMethod):
    """Test-only: before layer 0, drop a different number of tokens from each frame (frame f keeps its
    last per - 2 f tokens, at least 1)."""

    name = "_vidcom2_drop_some"

    def stages(self, num_layers):
        return [0]

    def select(self, ctx):
        keep = []
        for b in range(ctx.batch_size):
            tok = ctx.visual_tokens(b)
            within = tok.index % ctx.layout.tokens_per_frame
            keep.append((within >= (2 * tok.frame).clamp(max=ctx.layout.tokens_per_frame - 1)).nonzero().squeeze(1))
        return Selection(keep)


def test_composed_after_a_method_sees_unequal_frames():
    """Composed after a method that leaves unequal frames: VidCom2 acts on the survivors with the
    reference's unequal-frame reading (k_t capped by M_t, M the original per-frame count)."""
    bb = shared_backbone("tiny_llava_onevision")
    inputs = video_inputs(bb, seeds=(3,))
    layout = bb.layout(inputs)
    per = layout.tokens_per_frame
    emb, _ = layer_input(bb, inputs)
    method = sharp.compose(_DropSome(), VidCom2(retention=0.5, compute_dtype="float64"))
    _, trace = layer_input(bb, inputs, method)
    rows = emb[0, bb.visual_mask(inputs["input_ids"], layout)[0]].double().numpy()
    survivors = [list(range(f * per + min(2 * f, per - 1), (f + 1) * per)) for f in range(layout.frames)]
    ref = reference_vidcom2([rows[s] for s in survivors], 0.5, per)
    flat = [i for s in survivors for i in s]
    assert trace.kept[1][0].tolist() == [flat[i] for i in ref["keep"]]
    assert trace.method("vidcom2").frame_budget[0] == ref["k"]
    assert any(k == len(s) for k, s in zip(ref["k"], survivors))  # some frame is capped by M_t


def test_full_retention_still_drops_as_the_official_formula():
    """r = 1: s_t = min(1, 1 + p_t - 1/T) keeps fewer than M tokens in the frames with p_t < 1/T."""
    frames = frames_of(random_video(8, 16, 64, 8))
    ref = reference_vidcom2(frames, 1.0, 16)
    got = run_ours(frames, 1.0, 16)
    assert got.budget.tolist() == ref["k"] and sum(ref["k"]) < 8 * 16
    assert VidCom2.identity_at_full_retention is False


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="channel_ratio must be in"):
        VidCom2(retention=0.25, channel_ratio=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        VidCom2(retention=0.25, temperature=0.0)
    with pytest.raises(ValueError, match="compute_dtype must be one of 'float32', 'float64', 'model'"):
        VidCom2(retention=0.25, compute_dtype="bf16")


def test_nominal_schedule():
    """The nominal FLOPs schedule is round(r N) from layer 0 on (the measured one is the trace's)."""
    method = VidCom2(retention=0.25)
    assert VidCom2.input_dependent_schedule
    assert method.token_schedule(6272, 28) == [1568] * 28
