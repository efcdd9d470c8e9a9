"""ShaRP SegM (Sec. 4.1): content-aware temporal segments and the segment-aware visual mask.

Pure tensor functions, no model or engine needed (see docs/sharp.md for the interpretations).

* :func:`frame_segments` implements Eq. 3: mean-pool the visual tokens of every frame (for
  Qwen2-VL: every temporal patch of 2 frames), and insert a boundary before frame ``i`` whenever
  ``cos(mean_{i-1}, mean_i) < tau_seg``.
* :func:`segment_mask` builds the block-diagonal restriction of Eq. 4 for a ``(b, s)`` sequence:
  a bool tensor ``(b, 1, s, s)``, True = may attend, that the engine ANDs with its causal + padding
  mask. Visual query rows may not see visual keys of another segment; text query rows are not
  restricted (Eq. 4 restricts "one visual token"); with ``visual_sees_text`` visual rows also see the
  text tokens before them (system prompt, attention sink); without it (ShaRP's default, Eq. 4's
  literal row) they see their segment only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Segment = tuple[int, int]  # (first_frame, last_frame), both inclusive

__all__ = [
    "Segment",
    "frame_means",
    "frame_segments",
    "segments_from_boundaries",
    "token_segment_ids",
    "token_segments",
    "segment_mask",
]


def frame_means(visual_hidden: torch.Tensor, frames: int, tokens_per_frame: int) -> torch.Tensor:
    """Frame-wise average pooling of visual tokens: ``(frames * tokens_per_frame, d) -> (frames, d)``.

    Accumulates in float32 (bf16 sums over 196 tokens lose too much precision for a 0.9 threshold).
    """
    n_vis, d = visual_hidden.shape
    if frames < 1 or tokens_per_frame < 1 or n_vis != frames * tokens_per_frame:
        raise ValueError(
            f"visual_hidden has {n_vis} tokens, expected frames x tokens_per_frame = "
            f"{frames} x {tokens_per_frame}"
        )
    return visual_hidden.float().reshape(frames, tokens_per_frame, d).mean(dim=1)


def segments_from_boundaries(starts: torch.Tensor, frames: int) -> list[Segment]:
    """Turn a bool vector ``starts`` (frames,), True where a segment starts, into (first, last) pairs."""
    first = torch.nonzero(starts, as_tuple=False).flatten().tolist()
    if not first or first[0] != 0:
        first = [0] + first
    last = [f - 1 for f in first[1:]] + [frames - 1]
    return list(zip(first, last))


def frame_segments(
    visual_hidden: torch.Tensor, frames: int, tokens_per_frame: int, tau_seg: float = 0.9
) -> list[Segment]:
    """Eq. 3: contiguous, non-overlapping frame segments of one sample.

    Args:
        visual_hidden: ``(n_vis, d)`` visual tokens of one sample in sequence order
            (frame-major: token ``j`` belongs to frame ``j // tokens_per_frame``).
        frames: number of frames (Qwen2-VL: temporal patches).
        tokens_per_frame: visual tokens per frame.
        tau_seg: boundary threshold. A boundary is inserted before frame ``i`` (i >= 1) iff
            ``cos(mean_{i-1}, mean_i) < tau_seg`` (strict, as in Eq. 3: equality = same segment).

    Returns: list of ``(first_frame, last_frame)`` pairs (inclusive), covering ``0 .. frames-1``.
    """
    means = frame_means(visual_hidden, frames, tokens_per_frame)
    starts = torch.zeros(frames, dtype=torch.bool, device=means.device)
    starts[0] = True
    if frames > 1:
        sim = F.cosine_similarity(means[:-1], means[1:], dim=-1, eps=1e-8)
        starts[1:] = sim < tau_seg
    return segments_from_boundaries(starts, frames)


def token_segments(
    visual_hidden: torch.Tensor, frame: torch.Tensor, tau_seg: float = 0.9
) -> tuple[list[Segment], torch.Tensor]:
    """Eq. 3 over the visual tokens a sample still has: ``(segments, segment id of each token)``.

    Args:
        visual_hidden: ``(n, d)`` current visual tokens in sequence order.
        frame: ``(n,)`` non-decreasing frame of each token. Frames without tokens (an earlier stage
            removed them all) take no part: boundaries are tested between consecutive frames that
            still have tokens, and a segment's (first, last) frames are frames that have tokens.

    With every frame complete this is exactly :func:`frame_segments` (same float32 means).
    """
    frames, counts = torch.unique_consecutive(frame, return_counts=True)
    n, d = visual_hidden.shape
    m = frames.numel()
    if bool((counts == counts[0]).all()):  # equal counts: the reshape-mean of frame_means
        means = visual_hidden.float().reshape(m, n // m, d).mean(dim=1)
    else:
        inverse = torch.repeat_interleave(torch.arange(m, device=frame.device), counts)
        means = torch.zeros(m, d, device=visual_hidden.device).index_add_(0, inverse, visual_hidden.float())
        means = means / counts.to(means.device, torch.float32)[:, None]
    starts = torch.zeros(m, dtype=torch.bool, device=means.device)
    starts[0] = True
    if m > 1:
        starts[1:] = F.cosine_similarity(means[:-1], means[1:], dim=-1, eps=1e-8) < tau_seg
    first = starts.nonzero().squeeze(1)  # indices into `frames`
    last = torch.cat([first[1:] - 1, first.new_tensor([m - 1])])
    segments = list(zip(frames[first].tolist(), frames[last].tolist()))
    seg_of_frame = starts.long().cumsum(0) - 1  # (m,)
    return segments, torch.repeat_interleave(seg_of_frame, counts.to(seg_of_frame.device))


def token_segment_ids(
    segments: Sequence[Segment], tokens_per_frame: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Segment index of every visual token (n_vis,) long, from (first, last) frame pairs."""
    lengths = torch.tensor([(last - first + 1) * tokens_per_frame for first, last in segments], device=device)
    return torch.repeat_interleave(torch.arange(len(segments), device=device), lengths)


def segment_mask(
    seq_len: int,
    visual_positions: Sequence[torch.Tensor],
    segment_ids: Sequence[torch.Tensor],
    visual_sees_text: bool = True,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Block-diagonal restriction among visual tokens (Eq. 4), to be ANDed with causal + padding.

    Args:
        seq_len: sequence length ``s`` (prefill: queries = keys = the whole sequence).
        visual_positions: per sample, the sequence positions of its visual tokens (n_vis_b,).
        segment_ids: per sample, the segment index of each of those visual tokens (n_vis_b,).
        visual_sees_text: if True (default), a visual query may attend to every text key (in a
            causal model: the text before the video, i.e. system prompt + chat header, incl. the
            attention-sink first token); if False, visual queries see only the visual keys of their
            own segment (the literal reading of Eq. 4, which lists only visual keys).

    Returns: bool ``(b, 1, s, s)``, True = may attend. Text query rows are all True; a visual
    query row is False exactly on visual keys of other segments (and on text keys when
    ``visual_sees_text`` is False). Causality is *not* applied here (the engine ANDs its own).
    """
    if len(visual_positions) != len(segment_ids):
        raise ValueError("visual_positions and segment_ids must have one entry per sample")
    b = len(visual_positions)
    if device is None:
        device = visual_positions[0].device if b else torch.device("cpu")
    # per position: -1 for text, else the segment index of that visual token
    seg = torch.full((b, seq_len), -1, dtype=torch.long, device=device)
    for i, (pos, ids) in enumerate(zip(visual_positions, segment_ids)):
        if pos.numel() != ids.numel():
            raise ValueError(f"sample {i}: {pos.numel()} visual positions but {ids.numel()} segment ids")
        seg[i, pos.to(device)] = ids.to(device=device, dtype=torch.long)
    q = seg[:, :, None]  # (b, s, 1)
    k = seg[:, None, :]  # (b, 1, s)
    allowed = (q < 0) | (q == k)
    if visual_sees_text:
        allowed = allowed | (k < 0)
    return allowed[:, None]
