"""DyCoke (baselines/dycoke.py) against independent computations of the official code (KD-TAO/DyCoke
@ dd74634: ``llava_arch.py: dycole_ttm`` and ``modeling_qwen2.py: PrunableDynamicCache``).

- TTM: a numpy loop over the official frame pairs and windows (per-index cosine, the k lowest), the
  official count on 32 x 196 at K = 0.7 (3,098 tokens), and the kept set of a real prefill.
- The decode-time KV selection: every decode step's chosen visual keys equal the rule applied to the
  attention of a masked NO-CACHE eager forward (layer L-1's probabilities at the step's query row), and
  every step's logits equal that forward's (tests/engine_reference.py replays the chosen keys).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sharp
from baselines.dycoke import DyCoke, tokens_per_pruned_frame, ttm_keep
from conftest import random_video_inputs, shared_backbone
from engine_reference import Recorder, generate_with_logits, layer_input, replay_reference_logits
from test_methods import compact_layers


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) cosine of a[i] and b[i] (float64)."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def reference_ttm(x: np.ndarray, k: int) -> list[np.ndarray]:
    """The official dycole_ttm on (F, n, d), F even: per frame the kept token indices (official order)."""
    frames, n, _ = x.shape
    keep = [np.arange(n) for _ in range(frames)]
    for j in range(0, frames - 1, 2):  # pairs: frame j+1 vs frame j
        keep[j + 1] = np.argsort(cosine_rows(x[j], x[j + 1]), kind="stable")[:k]
    for i in range(0, frames - 4, 4):  # windows: frame i+2 vs frame i (raw)
        keep[i + 2] = np.argsort(cosine_rows(x[i], x[i + 2]), kind="stable")[:k]
    return keep


def test_official_count_on_32_frames_of_196_tokens():
    x = torch.randn(32, 196, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = tokens_per_pruned_frame(32 * 196, 32, 196, 0.5, prune_ratio=0.7)
    assert k == 58  # int(0.30000000000000004 * 196)
    keep = ttm_keep(x, k)
    assert sum(len(f) for f in keep) == 3098 == 9 * 196 + 23 * 58
    whole = [t for t, f in enumerate(keep) if len(f) == 196]
    assert whole == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    reference = reference_ttm(x.numpy(), k)
    for t in range(32):
        assert keep[t].tolist() == reference[t].tolist(), t  # the same tokens in the same (similarity) order


def test_retention_picks_the_largest_k_that_fits():
    # 32 x 196: 9 whole frames (1764 tokens) + 23 pruned frames
    assert tokens_per_pruned_frame(6272, 32, 196, 0.494, None) == (round(0.494 * 6272) - 1764) // 23 == 58  # = K 0.7
    assert tokens_per_pruned_frame(6272, 32, 196, 1.0, None) == 196  # nothing pruned
    assert tokens_per_pruned_frame(6272, 32, 196, 0.25, None) == 0  # below the whole frames' 28.1 %
    # 8 frames: whole frames {0, 4, 6}; 5 frames: windows (0, 2); an odd count drops the last frame (official) or keeps it whole
    assert tokens_per_pruned_frame(128, 8, 16, 0.5, None) == (64 - 48) // 5 == 3
    assert [len(f) for f in ttm_keep(torch.randn(5, 4, 3), 2)] == [4, 2, 2, 2, 0]
    assert [len(f) for f in ttm_keep(torch.randn(5, 4, 3), 2, odd_last_frame="keep")] == [4, 2, 2, 2, 4]


@pytest.mark.parametrize("bb_name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
def test_prefill_keeps_the_official_ttm_set(bb_name):
    bb = shared_backbone(bb_name)
    inputs = random_video_inputs(bb, seeds=(3, 4), frames=8)
    embeddings, _ = layer_input(bb, inputs)  # (b, s, d) input of layer 0, unpruned
    layout = bb.layout(inputs)
    frames, n = layout.frames, layout.tokens_per_frame
    with sharp.prune(bb, "dycoke", 0.5) as trace:
        with torch.no_grad():
            bb.model(**inputs)
    k = trace.method("dycoke").tokens_per_pruned_frame
    assert k == tokens_per_pruned_frame(frames * n, frames, n, 0.5, None)
    visual = bb.visual_mask(inputs["input_ids"], layout)
    for b in range(2):
        x = embeddings[b][visual[b]].double().numpy().reshape(frames, n, -1)
        reference = reference_ttm(x, k)
        expected = sorted(int(t * n + i) for t, f in enumerate(reference) for i in f)
        assert trace.kept[0][b].tolist() == expected
    assert trace.visual_tokens_per_layer == [len(expected)] * bb.num_layers


def reference_selection(a: np.ndarray, previous, scored_span: str = "official", p: float = 0.8,
                        threshold: float = 0.9):
    """The official dycoke_pruning on one step's visual attention a (n,): (kept indices or None, a')."""
    n = len(a)
    scored = n - 1 if scored_span == "official" else n
    a = a[:scored]
    similarity = 0.0 if previous is None else float(a @ previous / (np.linalg.norm(a) * np.linalg.norm(previous)))
    if similarity >= threshold:
        return None, a
    top = np.argsort(-a, kind="stable")[: int(scored * (1 - p))]
    return sorted(set(top.tolist()) | set(range(scored, n))), a


@pytest.mark.parametrize("bb_name", ["tiny_llava_onevision", "tiny_qwen2_vl"])
@pytest.mark.parametrize("kwargs", [{}, {"scored_span": "all", "similarity_threshold": 0.999}])
def test_every_decode_step_selects_by_the_no_cache_attention(bb_name, kwargs):
    bb = shared_backbone(bb_name, "eager")
    inputs = random_video_inputs(bb, seeds=(5,), frames=8)
    method = sharp.resolve_method("dycoke", bb, 0.5, **kwargs).method
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=5)
    L = method.layer
    captured = {}
    hook = bb.layers[L - 1].self_attn.register_forward_hook(
        lambda module, args, output: captured.__setitem__("w", output[1].detach()))
    try:
        ref = replay_reference_logits(bb, inputs, seq, trace, recorder,
                                      compact_layers=compact_layers(method, trace, bb.num_layers))
    finally:
        hook.remove()
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)

    weights = captured["w"][0].mean(0).double().numpy()  # (s, s) layer L-1, head mean, no cache
    visual = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0].nonzero().squeeze(1).numpy()
    kept = trace.kept[0][0].numpy()  # the cache's visual entries (original ids, cache order)
    previous, chosen = None, 0
    assert len(trace.decode_steps) == seq.shape[1] - p - 1
    for step, selections in enumerate(trace.decode_steps):
        (layer, key, selected), = selections
        assert (layer, key) == (L, "dycoke")
        a = weights[p + step, visual[kept]]
        expected, previous = reference_selection(a, previous, kwargs.get("scored_span", "official"),
                                                 threshold=kwargs.get("similarity_threshold", 0.9))
        if expected is None:
            assert selected is None, step
        else:
            chosen += 1
            assert selected[0].tolist() == sorted(kept[expected].tolist()), step
    assert chosen >= 1  # the first step always selects (no previous attention)


def test_similar_steps_see_the_full_cache_or_the_previous_selection():
    bb = shared_backbone("tiny_llava_onevision")
    inputs = random_video_inputs(bb, seeds=(5,), frames=8)
    runs = {}
    for mode in ("full", "previous"):
        with sharp.prune(bb, "dycoke", 0.5, similar_steps=mode, similarity_threshold=1e-6) as trace:
            bb.model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        runs[mode] = [sel[0][2] for sel in trace.decode_steps]
    first = runs["full"][0][0]
    n = len(trace.kept[0][0])
    assert len(first) == int((n - 1) * (1 - 0.8)) + 1  # positive attentions: cos > 1e-6, only the first step (no previous) re-selects
    assert all(s is None for s in runs["full"][1:])  # official: a similar step sees the whole cache
    assert all(torch.equal(s[0], first) for s in runs["previous"][1:])


def test_bad_values_are_one_clear_error():
    with pytest.raises(ValueError, match="similar_steps must be one of 'full', 'previous'"):
        DyCoke(similar_steps="never")
    with pytest.raises(ValueError, match="prune_ratio must be in"):
        DyCoke(prune_ratio=1.5)
    with pytest.raises(ValueError, match="layer must be in 1..3"):
        DyCoke(layer=0).decode_stages(4)
