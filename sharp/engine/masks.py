"""Structured attention restrictions: SegM's block-diagonal mask without a dense ``(b, 1, s, s)`` mask.

A method's ``attention_mask`` hook may return a :class:`SegmentRestriction` instead of a dense bool
tensor: per position, the segment id of a visual token (-1 = text). Visual query rows see the
visual keys of their own segment (and, with ``visual_sees_text``, every text key); text rows are not
restricted; causality and padding are the engine's. How the restricted layer computes it is
``MODE`` (env ``SHARP_SEGM_ATTENTION``, or :func:`set_mode`):

* ``"segments"`` (``"auto"`` on every device): the layer runs the attention function registered
  here as ``"sharp_segments"``: plain causal sdpa over [text before the video, first segment], then
  one causal sdpa call per further segment over [text before the video, segment] (the text rows
  recomputed and dropped), and one for the text after the video (lower-right causal over every key,
  ``torch.nn.attention.bias.causal_lower_right``). No ``s x s`` tensor; sdpa keeps its fast kernels. Used when the visual tokens of every sample form
  one contiguous run with non-decreasing segment ids and there is no padding; otherwise ``dense``.
* ``"flex"``: FlexAttention with a block mask built from the segment ids (GPU: compiled; CPU: the
  eager reference, for tests only).
* ``"dense"``: the restriction as a dense bool mask ANDed with causal + padding (the old path).

All three give the same attention (tests/test_masks.py).

The prefill's per-layer masks are assembled here too (:class:`sharp.engine.prefill.PrefillRunner`
calls these and keeps only the per-layer attention-config switch): :func:`shortened_causal_mask`
(causal + padding for a pruned sequence, transformers' own builder) and :func:`restricted_mask`
(that AND a method's restriction; picks the segments / flex / dense path).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from sharp.engine import compat

MODES = ("auto", "segments", "flex", "dense")
ATTN_NAME = "sharp_segments"
MODE = os.environ.get("SHARP_SEGM_ATTENTION", "auto")


def set_mode(mode: str) -> None:
    """How a layer with a :class:`SegmentRestriction` computes its attention (see the module doc)."""
    global MODE
    if mode not in MODES:
        raise ValueError(f"segm attention mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    MODE = mode


def resolved_mode(device: torch.device) -> str:
    if MODE not in MODES:
        raise ValueError(f"SHARP_SEGM_ATTENTION must be one of {', '.join(map(repr, MODES))}, got {MODE!r}")
    return "segments" if MODE == "auto" else MODE


@dataclass(frozen=True)
class SegmentRestriction:
    """Eq. 4's restriction in structured form: ``segment_of_position`` (b, s) long, -1 for text."""

    segment_of_position: torch.Tensor
    visual_sees_text: bool = True

    @property
    def shape(self) -> tuple:
        b, s = self.segment_of_position.shape
        return (b, 1, s, s)

    def dense(self) -> torch.Tensor:
        """(b, 1, s, s) bool, True = may attend (causality not applied): :func:`sharp.methods.segm.segment_mask`."""
        seg = self.segment_of_position
        q, k = seg[:, :, None], seg[:, None, :]
        allowed = (q < 0) | (q == k)
        if self.visual_sees_text:
            allowed = allowed | (k < 0)
        return allowed[:, None]

    def to(self, device) -> "SegmentRestriction":
        return SegmentRestriction(self.segment_of_position.to(device), self.visual_sees_text)


def as_dense(mask):
    return mask.dense() if isinstance(mask, SegmentRestriction) else mask


def combine(a, b):
    """AND of two restrictions (None = no restriction); structured ones become dense when combined."""
    if a is None:
        return b
    if b is None:
        return a
    return as_dense(a) & as_dense(b)


@dataclass
class SegmentPlan:
    """What the ``sharp_segments`` attention function needs, per sample: (prefix end P, visual end E,
    segment bounds [(start, end), ...]) with text rows [0, P), visual rows [P, E), text rows [E, s)."""

    samples: list
    visual_sees_text: bool
    mode: str = "segments"
    segment_of_position: Optional[torch.Tensor] = None
    block_mask: object = None

    def __getitem__(self, item):  # transformers' sdpa slices 4-D masks; never reached with this plan
        raise TypeError("SegmentPlan is consumed by the sharp_segments attention function only")


def plan(restriction: SegmentRestriction, attention_mask_2d: Optional[torch.Tensor]) -> Optional[SegmentPlan]:
    """A :class:`SegmentPlan`, or None when the structure does not fit (padding, gapped visual rows)."""
    seg = restriction.segment_of_position
    if attention_mask_2d is not None and not bool(attention_mask_2d.bool().all()):
        return None
    samples = []
    for row in seg:
        vis = (row >= 0).nonzero().squeeze(1)
        if vis.numel() == 0:
            samples.append((row.numel(), row.numel(), []))
            continue
        p, e = int(vis[0]), int(vis[-1]) + 1
        if e - p != vis.numel():
            return None  # text inside the visual run
        ids = row[p:e]
        if bool((ids[1:] < ids[:-1]).any()):
            return None
        change = (ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1
        starts = [p] + (change + p).tolist()
        ends = starts[1:] + [e]
        samples.append((p, e, list(zip(starts, ends))))
    return SegmentPlan(samples, restriction.visual_sees_text, segment_of_position=seg)


def _sdpa(q, k, v, scaling, causal: str):
    """q (H, n, d), k / v (H, m, d): ``causal`` = "none" | "top" (n == m) | "lower_right"."""
    if causal == "lower_right" and q.shape[-2] != k.shape[-2]:
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q[None], k[None], v[None],
                                              attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]),
                                              scale=scaling)[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal != "none", scale=scaling)[0]


def segments_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: Optional[float] = None, **kwargs):
    """Attention function ``sharp_segments`` (transformers' AttentionInterface signature).

    query (b, H, s, d), key / value (b, KV, s, d); ``attention_mask`` is a :class:`SegmentPlan`.
    Returns ((b, s, H, d), None) like transformers' sdpa function."""
    if not isinstance(attention_mask, SegmentPlan):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    plan_ = attention_mask
    CALLS[plan_.mode] = CALLS.get(plan_.mode, 0) + 1
    b, h, s, d = query.shape
    groups = h // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if plan_.mode == "flex":
        return _flex(plan_, query, key, value, scaling), None
    out = query.new_empty(b, h, s, value.shape[-1])
    for i, (p, e, segments) in enumerate(plan_.samples):
        q, k, v = query[i], key[i], value[i]
        sees = plan_.visual_sees_text
        first = segments[0][1] if sees and segments else p  # text before the video (+ the 1st segment)
        if first > 0:  # causal over [0, first): exactly what those rows may see
            out[i, :, :first] = _sdpa(q[:, :first], k[:, :first], v[:, :first], scaling, "top")
        for a, z in segments:
            if sees and a == p:
                continue  # done with the text before the video
            if sees and p > 0:
                # queries = the text before the video + the segment (its rows recomputed, p of them, and
                # dropped): plain causal over [text, segment] is the segment rows' restriction
                qq = torch.cat([q[:, :p], q[:, a:z]], dim=1)
                kk = torch.cat([k[:, :p], k[:, a:z]], dim=1)
                vv = torch.cat([v[:, :p], v[:, a:z]], dim=1)
                out[i, :, a:z] = _sdpa(qq, kk, vv, scaling, "top")[:, p:]
            else:
                out[i, :, a:z] = _sdpa(q[:, a:z], k[:, a:z], v[:, a:z], scaling, "top")
        if e < s:
            out[i, :, e:] = _sdpa(q[:, e:], k, v, scaling, "lower_right")
    return out.transpose(1, 2).contiguous(), None


_FLEX = {}
CALLS: dict = {}  # mode -> layers computed by segments_attention (tests check the path is taken)


def _flex(plan_: SegmentPlan, query, key, value, scaling):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg = plan_.segment_of_position.to(query.device)
    sees_text = plan_.visual_sees_text
    b, h, s, _ = query.shape

    def mask_mod(bi, hi, qi, ki):
        sq, sk = seg[bi, qi], seg[bi, ki]
        ok = (sq < 0) | (sq == sk)
        if sees_text:
            ok = ok | (sk < 0)
        return ok & (ki <= qi)

    if plan_.block_mask is None:
        plan_.block_mask = create_block_mask(mask_mod, b, None, s, s, device=query.device)
    if query.device.type == "cuda":
        fn = _FLEX.setdefault("compiled", torch.compile(flex_attention, dynamic=True))
    else:
        fn = flex_attention
    return fn(query, key, value, block_mask=plan_.block_mask, scale=scaling).transpose(1, 2).contiguous()


_REGISTERED = False


def register() -> None:
    """Register ``sharp_segments`` with transformers' AttentionInterface (once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, segments_attention)
    _REGISTERED = True


# -- a decoder layer's mask in the prefill ------------------------------------------------------
def shortened_causal_mask(config, hidden: torch.Tensor, attention_mask_2d: torch.Tensor):
    """transformers' own causal + padding mask (``create_causal_mask``) for a shortened sequence, in the
    format of ``config._attn_implementation`` (sdpa: (b, 1, s', s') bool or None for plain causal;
    eager: (b, 1, s', s') additive float; FlashAttention-2: (b, s') or None). ``hidden`` (b, s', d): the
    kept rows; ``attention_mask_2d`` (b, s'): their padding mask (1 = real token)."""
    return compat.causal_mask(config, hidden, attention_mask_2d)


def restricted_mask(restriction, attention_mask_2d: torch.Tensor, hidden: torch.Tensor,
                    impl: str) -> tuple[Any, Optional[str]]:
    """Causal + padding AND a method's restriction, for one decoder layer whose attention
    implementation is ``impl``.

    ``restriction``: a dense bool mask broadcastable to (b, 1, s, s) (True = may attend) or a
    :class:`SegmentRestriction` ((b, s) segment ids); ``attention_mask_2d`` (b, s); ``hidden`` (b, s, d)
    the layer's input. Returns ``(mask, run_on)``: ``run_on`` is the attention implementation the layer
    must run on for this mask (None: its own). A SegmentRestriction that fits
    (:func:`structured_mask`) gives a :class:`SegmentPlan` and ``run_on`` ``"sharp_segments"``
    (registered); otherwise the restriction is made dense (:func:`dense_mask`)."""
    if isinstance(restriction, SegmentRestriction):  # SegM: no dense s x s mask if it fits
        structured = structured_mask(restriction, attention_mask_2d, hidden, impl)
        if structured is not None:
            return structured, ATTN_NAME
        restriction = restriction.dense()
    return dense_mask(restriction, attention_mask_2d, hidden, impl)


def structured_mask(restriction: SegmentRestriction, attention_mask_2d: torch.Tensor, hidden: torch.Tensor,
                    impl: str) -> Optional[SegmentPlan]:
    """A :class:`SegmentPlan` for the layer (``restriction`` (b, s) segment ids, ``attention_mask_2d``
    (b, s), ``hidden`` (b, s, d)), with ``sharp_segments`` registered so the layer can run on it; None
    when the dense mask is needed (mode ``"dense"``, padding, eager, a layout :func:`plan` rejects)."""
    mode = resolved_mode(hidden.device)
    if mode == "dense" or impl not in ("sdpa", "flash_attention_2", "flex_attention"):
        return None
    last = _LAST_PLAN.get("entry")
    if last is not None and last[0] is restriction and last[1] is attention_mask_2d and last[2] == (hidden.device, mode):
        return last[3]  # the layers of one sequence share its restriction: plan once (issue 34)
    segment_plan = plan(restriction.to(hidden.device), attention_mask_2d)
    if segment_plan is None:
        return None
    segment_plan.mode = mode
    register()
    _LAST_PLAN["entry"] = (restriction, attention_mask_2d, (hidden.device, mode), segment_plan)
    return segment_plan


# the last structured plan, with the objects it was built from (kept alive, compared by identity): a
# restriction object is built once per sequence (StageContext.segment_restriction), so the masked layers
# of one prefill reuse it
_LAST_PLAN: dict = {}


def dense_mask(restriction: torch.Tensor, attention_mask_2d: torch.Tensor, hidden: torch.Tensor,
               impl: str) -> tuple[torch.Tensor, Optional[str]]:
    """Causal + padding AND ``restriction`` (bool, broadcastable to (b, 1, s, s)) as a (b, 1, s, s) mask:
    bool for sdpa, additive float (``hidden.dtype``, min where masked) for eager and the rest.
    ``attention_mask_2d`` (b, s); ``hidden`` (b, s, d). A fully masked row (left padding) sees itself
    (sdpa would give NaN). FlashAttention-2 takes no 4-D mask: the bool mask with ``run_on`` ``"sdpa"``
    (that one layer runs on sdpa); otherwise ``run_on`` is None."""
    s = hidden.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool, device=hidden.device).tril()[None, None]  # (1, 1, s, s)
    allowed = allowed & attention_mask_2d.bool()[:, None, None, :]
    allowed = allowed & restriction.to(hidden.device)
    # a fully masked row (left padding) would give NaN in sdpa: let it see itself
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=hidden.device)[None, None]
    if impl == "flash_attention_2":  # FA2 takes no 4-D mask: run this one layer on sdpa
        return allowed, "sdpa"
    if impl == "sdpa":
        return allowed, None
    return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
        ~allowed, torch.finfo(hidden.dtype).min), None
