"""SegM (ShaRP Sec. 4.1): frame segments (Eq. 3) and the block-diagonal visual mask (Eq. 4)."""
import math

import pytest
import torch

from sharp.methods.segm import frame_means, frame_segments, segment_mask, segments_from_boundaries, token_segment_ids


def _frames(*means_per_frame, tokens_per_frame=2):
    """Visual tokens whose frame means are exactly the given 2-D vectors (tokens = mean +- e)."""
    rows = []
    for mx, my in means_per_frame:
        rows += [[mx + 1.0, my - 2.0], [mx - 1.0, my + 2.0]][:tokens_per_frame]
    return torch.tensor(rows)


def test_frame_means_hand():
    h = _frames((1, 0), (0, 3))
    assert torch.equal(frame_means(h, 2, 2), torch.tensor([[1.0, 0.0], [0.0, 3.0]]))


def test_frame_segments_hand():
    # cos(f0,f1) = 1, cos(f1,f2) = 0 -> boundary, cos(f2,f3) = 1/sqrt(1.01) ~ 0.995 -> same,
    # cos(f3,f4) = cos(angle (0.1,1) vs (1,-1)) < 0 -> boundary
    h = _frames((1, 0), (2, 0), (0, 1), (0.1, 1), (1, -1))
    assert frame_segments(h, 5, 2, tau_seg=0.9) == [(0, 1), (2, 3), (4, 4)]
    # tokens inside a frame do not matter, only the frame means: each token alone is far from
    # the others, but the means are identical -> one segment
    assert frame_segments(h[:4], 2, 2, tau_seg=0.99) == [(0, 1)]


def test_frame_segments_threshold_is_strict():
    # orthogonal frame means: cos = 0 exactly; Eq. 3 inserts a boundary only when sim < tau
    h = _frames((1, 0), (0, 1))
    assert frame_segments(h, 2, 2, tau_seg=0.0) == [(0, 1)]
    assert frame_segments(h, 2, 2, tau_seg=1e-6) == [(0, 0), (1, 1)]


def test_frame_segments_extremes():
    torch.manual_seed(0)
    h = torch.randn(6 * 3, 4)
    assert frame_segments(h, 6, 3, tau_seg=-1.01) == [(0, 5)]  # cos >= -1 > tau: never a boundary
    assert frame_segments(h, 6, 3, tau_seg=1.01) == [(i, i) for i in range(6)]  # always a boundary
    assert frame_segments(h[:3], 1, 3, tau_seg=0.9) == [(0, 0)]  # one frame
    with pytest.raises(ValueError):
        frame_segments(h, 5, 3, tau_seg=0.9)


def test_frame_segments_angle():
    # frame means rotating by 20 degrees per frame: cos 20 deg = 0.94 >= 0.9 -> one segment;
    # a 30 degree step (cos = 0.866 < 0.9) starts a new segment
    angles = [0, 20, 40, 70, 90]
    h = _frames(*[(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in angles])
    assert frame_segments(h, 5, 2, tau_seg=0.9) == [(0, 2), (3, 4)]


def test_segments_from_boundaries_and_token_ids():
    starts = torch.tensor([True, False, True, True, False])
    assert segments_from_boundaries(starts, 5) == [(0, 1), (2, 2), (3, 4)]
    ids = token_segment_ids([(0, 1), (2, 2), (3, 4)], tokens_per_frame=2)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_segment_mask_hand():
    # sequence: T T V V V V T T ; visual tokens 2,3 in segment 0, 4,5 in segment 1
    pos = [torch.tensor([2, 3, 4, 5])]
    ids = [torch.tensor([0, 0, 1, 1])]
    m = segment_mask(8, pos, ids)
    assert m.shape == (1, 1, 8, 8) and m.dtype == torch.bool
    X = 0
    expected = torch.tensor(
        [
            # keys: T  T  V0 V0 V1 V1 T  T
            [1, 1, 1, 1, 1, 1, 1, 1],  # text row: unrestricted
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, X, X, 1, 1],  # visual seg 0: sees text, own segment
            [1, 1, 1, 1, X, X, 1, 1],
            [1, 1, X, X, 1, 1, 1, 1],  # visual seg 1: not segment 0
            [1, 1, X, X, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],  # text after the video sees every frame
            [1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m[0, 0], expected)
    # ANDed with causal: the first token of segment 1 sees the text prefix and itself only
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert (m[0, 0] & causal)[4].nonzero().flatten().tolist() == [0, 1, 4]
    assert (m[0, 0] & causal)[7].all()  # the last text token sees every token before it

    strict = segment_mask(8, pos, ids, visual_sees_text=False)[0, 0]
    assert strict[2].nonzero().flatten().tolist() == [2, 3]
    assert strict[5].nonzero().flatten().tolist() == [4, 5]
    assert strict[0].all() and strict[7].all()


def test_segment_mask_batch_differs_per_sample():
    pos = [torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])]
    ids = [torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0])]
    m = segment_mask(6, pos, ids)
    assert m.shape == (2, 1, 6, 6)
    assert m[0, 0, 2].tolist() == [True, False, True, True, True, True]
    assert m[0, 0, 1].tolist() == [True, True, False, False, True, True]
    assert m[1].all()  # one segment: no restriction
    with pytest.raises(ValueError):
        segment_mask(6, pos, ids[:1])
