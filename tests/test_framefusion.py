"""FrameFusion: merges, thresholds and the stopping rule against hand computations; the pruning
score against eager attentions; the budget on the layer average; the paper's TFLOPs."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sharp
from baselines.framefusion import (FrameFusion, _Progress, fold_runs, neighbour_similarity, patch_order,
                                   required_sparsity)
from sharp.flops import prefill_tflops

# -- hand-made hidden states ----------------------------------------------------------------------

# 3 frames x 2 patches, sequence order f0p0 f0p1 f1p0 f1p1 f2p0 f2p1; patch 0 stays (nearly) still,
# patch 1 changes every frame.
E0, E1, E2 = torch.eye(3)
X = torch.stack([
    E0, E1,                      # frame 0
    E0 * 2, E2,                  # frame 1: p0 parallel to frame 0 (cos 1), p1 orthogonal (cos 0)
    E0 + 0.5 * E1, E1,           # frame 2: p0 cos(2 E0, E0 + E1/2) = 0.894, p1 orthogonal to frame 1
])
PATCH = torch.tensor([0, 1, 0, 1, 0, 1])


def test_similarity_is_to_the_same_patch_in_the_previous_frame():
    order = patch_order(PATCH)
    assert order.tolist() == [0, 2, 4, 1, 3, 5]  # patch 0 tokens in frame order, then patch 1
    sim = neighbour_similarity(X, PATCH, order)
    expected = [-2.0, 1.0, 2 / (5 ** 0.5), -2.0, 0.0, 0.0]  # first of each patch: no predecessor
    assert sim.tolist() == pytest.approx(expected, abs=1e-6)


def test_a_run_folds_into_the_token_before_it_as_an_unweighted_mean():
    order = patch_order(PATCH)
    marked = torch.tensor([False, True, True, False, False, False])  # patch order: f1p0, f2p0 marked
    merged, keep = fold_runs(X, order, marked)
    assert keep.tolist() == [True, True, False, True, False, True]  # sequence order
    mean = (E0 + 2 * E0 + E0 + 0.5 * E1) / 3  # f0p0 absorbs the run (f1p0, f2p0): mean of n + 1 = 3
    assert torch.allclose(merged[0], mean)
    assert torch.equal(merged[1], X[1]) and torch.equal(merged[3], X[3]) and torch.equal(merged[5], X[5])


def test_two_runs_in_one_patch_fold_separately():
    # one patch, 5 frames: marks at frames 1 and 3, 4 -> runs {1} -> 0 and {3, 4} -> 2
    x = torch.arange(5, dtype=torch.float32)[:, None] * torch.ones(1, 2)
    patch = torch.zeros(5, dtype=torch.long)
    merged, keep = fold_runs(x, patch_order(patch), torch.tensor([False, True, False, True, True]))
    assert keep.tolist() == [True, False, True, False, False]
    assert merged[0].tolist() == [0.5, 0.5] and merged[2].tolist() == [3.0, 3.0]  # (0+1)/2, (2+3+4)/3


def test_required_sparsity_by_hand():
    # no merge yet: s_up = 1 - L cost / L = 1 - cost
    assert required_sparsity([], 0.3, 4) == pytest.approx(0.7)
    # one merge of 50%: spent 0.5 layer; 3 layers left at share 0.5 must bring the total to 1.2
    assert required_sparsity([0.5], 0.3, 4) == pytest.approx(1 - 0.7 / (3 * 0.5))
    # two merges of 50% and 20%: shares 0.5, 0.4, spent 0.9; 26 layers at 0.4 for 28 x 0.2 - 0.9
    assert required_sparsity([0.5, 0.2], 0.2, 28) == pytest.approx(1 - (5.6 - 0.9) / (26 * 0.4))
    assert required_sparsity([0.1], 0.99, 4) == 0.0  # the budget is not binding
    assert required_sparsity([0.1], 0.1, 4) == 1.0  # the budget is already spent


class _Tokens(SimpleNamespace):
    def __len__(self):
        return int(self.index.numel())


def _fake_ctx(n, tokens_per_frame, num_layers, layer=0):
    """The parts of a StageContext FrameFusion's merge step reads: one sample whose n visual tokens
    are rows 0..n-1 with original indices 0..n-1 (frame = index // tokens_per_frame)."""
    tokens = _Tokens(index=torch.arange(n), positions=torch.arange(n))
    return SimpleNamespace(visual_tokens=lambda b: tokens, layout=SimpleNamespace(tokens_per_frame=tokens_per_frame),
                           num_layers=num_layers, layer_idx=layer)


def _step(method, x, progress, num_layers=4):
    hidden = x[None].clone()
    keep = method._merge(_fake_ctx(x.shape[0], 2, num_layers), 0, progress, hidden, "after_attention")
    return keep, hidden[0]


def test_merge_step_threshold_and_stopping_rule():
    # threshold 0.6 marks f1p0 (cos 1) and f2p0 (0.894): 2 of 6 = 33% < s_up = 0.7 -> merge, go on
    m = FrameFusion(retention=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1)
    p = _Progress()
    keep, hidden = _step(m, X, p)
    assert keep.tolist() == [0, 1, 3, 5] and p.sparsity == [pytest.approx(2 / 6)]
    assert p.merging and p.pruning
    assert torch.allclose(hidden[0], (X[0] + X[2] + X[4]) / 3)
    # threshold 0.95 marks only f1p0: 1 of 6 = 16.7% >= ratio_lower_bound -> still merging
    p = _Progress()
    keep, _ = _step(FrameFusion(retention=0.3, similarity_lower_bound=0.95), X, p)
    assert keep.tolist() == [0, 1, 3, 4, 5] and p.merging
    # ratio_lower_bound 0.2 > 16.7%: merging ends after this step and the pruning step follows
    p = _Progress()
    _step(FrameFusion(retention=0.3, similarity_lower_bound=0.95, ratio_lower_bound=0.2), X, p)
    assert not p.merging and p.pruning


def test_merge_step_that_meets_the_budget_merges_the_top_k_and_skips_pruning():
    # retention 0.9 on 4 layers: s_up = 0.1, so int(0.1 x 6) = 0 tokens; retention 0.8: s_up = 0.2 ->
    # int(1.2) = 1 token, the most similar one (f1p0, cos 1), though 0.6 marks 2 (33% >= 20%)
    p = _Progress()
    keep, hidden = _step(FrameFusion(retention=0.8), X, p)
    assert keep.tolist() == [0, 1, 3, 4, 5]
    assert torch.allclose(hidden[0], (X[0] + X[2]) / 2)
    assert not p.merging and not p.pruning and p.sparsity == []


# -- inside the model -----------------------------------------------------------------------------

@pytest.mark.parametrize("bb_name,queries", [("tiny_llava_onevision", 1), ("tiny_qwen2_vl", 4)])
def test_pruning_step_keeps_the_top_of_an_eager_attention_map(bb_name, queries):
    """No token is similar enough (threshold 1): merging ends at the input step with 0% merged, so
    the pruning step runs after layer 0's attention on the unpruned sequence: its kept set must be
    the top-k of the eager attention of layer 0, mean over heads and the last ``queries`` rows."""
    bb = sharp.load_backbone(bb_name, attn_implementation="eager")
    inputs = bb.synthetic_inputs(frames=8, seed=3)
    with torch.no_grad():
        attn = bb.model(**inputs, output_attentions=True).attentions[0]  # (1, H, s, s)
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    score = attn[0, :, -queries:, :].float().mean(dim=(0, 1))[vis]  # (N_vis,)
    r = 0.3
    with sharp.prune(bb, "framefusion", r, similarity_lower_bound=1.0) as trace, torch.no_grad():
        bb.model(**inputs)
    steps = trace.method("framefusion").steps[0]
    assert steps[0][2:] == ("merge", vis.sum().item(), vis.sum().item())  # nothing merged
    assert steps[1][:3] == (0, "after_attention", "prune")
    n = int(vis.sum())
    k = round(n * (1 - required_sparsity([0.0], r, bb.num_layers)))
    assert trace.stage_layers == [1] and len(trace.kept[0][0]) == k
    assert set(trace.kept[0][0].tolist()) == set(torch.topk(score, k).indices.tolist())


def _slow_video(bb, frames=8, seed=5):
    """A video whose frames change little (a still scene plus noise): its tokens merge."""
    g = np.random.default_rng(seed)
    h, w = bb.synthetic_frame_size()
    still = g.integers(0, 256, size=(1, h, w, 3))
    noise = g.integers(-8, 9, size=(frames, h, w, 3))
    return bb.pixels_to_inputs(np.clip(still + noise, 0, 255).astype(np.uint8), ["What happens in the video?"])


def test_layer_averaged_visual_share_meets_the_budget_on_the_mid_size_config():
    bb = sharp.load_backbone("mid_llava_onevision")
    inputs = _slow_video(bb)
    for r in (0.5, 0.3, 0.2):
        with sharp.prune(bb, "framefusion", r) as trace, torch.no_grad():
            bb.model(**inputs)
        per_layer = trace.visual_tokens_per_layer
        share = sum(per_layer) / (len(per_layer) * trace.n_visual)
        assert share == pytest.approx(r, abs=0.04), (r, per_layer)
        assert any(s[2] == "merge" and s[4] < s[3] for s in trace.method("framefusion").steps[0])


def test_merges_stop_per_sample_in_a_batch():
    bb = sharp.load_backbone("tiny_llava_onevision")
    inputs = bb.synthetic_inputs(frames=8, seed=7, batch_size=2)
    with sharp.prune(bb, "framefusion", 0.3) as trace, torch.no_grad():
        bb.model(**inputs)
    steps = trace.method("framefusion").steps
    assert len(steps) == 2 and all(s for s in steps)
    last = bb.num_layers - 1
    for b in range(2):  # each sample's own log ends with the count it keeps; a step after the LAST layer's
        # attention acts on no later layer, so the engine records no drop for it
        acting = [s for s in steps[b] if not (s[1] == "after_attention" and s[0] == last)]
        assert acting[-1][4] == len(trace.kept[-1][b])


def test_bad_kwargs_fail_with_the_accepted_range():
    with pytest.raises(ValueError, match=r"similarity_lower_bound must be a cosine in \[-1, 1\], got 2"):
        FrameFusion(retention=0.3, similarity_lower_bound=2)
    with pytest.raises(ValueError, match=r"ratio_lower_bound must be a share in \[0, 1\]"):
        FrameFusion(retention=0.3, ratio_lower_bound=1.5)
    with pytest.raises(ValueError, match="queries must be a positive number"):
        FrameFusion(retention=0.3, queries=0)


# -- FLOPs: the paper's equivalent retentions ---------------------------------------------------

@pytest.mark.parametrize("backbone,retention,paper", [
    ("llava_onevision_7b", 0.31, 11.0), ("llava_onevision_7b", 0.26, 9.31), ("llava_onevision_7b", 0.21, 7.66),
    ("llava_onevision_7b", 0.16, 6.03), ("qwen2_vl_7b", 0.257, 4.1), ("qwen2_vl_7b", 0.164, 2.6),
])
def test_nominal_schedule_gives_the_papers_tflops(backbone, retention, paper):
    assert prefill_tflops(backbone, "framefusion", retention) == pytest.approx(paper, rel=0.03)


def test_nominal_schedule_has_the_budgets_mean_share():
    sched = FrameFusion(retention=0.26).token_schedule(6272, 28)
    assert sched[:2] == [6272, 6272] and len(set(sched[2:])) == 1
    assert sum(sched) / (28 * 6272) == pytest.approx(0.26, abs=1e-3)
