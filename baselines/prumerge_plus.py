"""PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models"; official code 42Shawn/LLaVA-PruMerge ``llava/model/multimodal_encoder/clip_encoder.py`` at
097c041: ``token_prune_merge_advanced_plus``, ``outlier_dectection``, ``complement_idx``; the
fixed-retention copy in vbdi/divprune ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` at
799e2d9, ``NOT_ADAPTIVE=<r>`` with ``TYPE=PLUS``).

Before the LLM (a stage at decoder layer 0, on the projected input embeddings y), per frame t (a
temporal patch on Qwen) with its n current visual tokens:

1. Importance (the CLS row's proxy). The official reads the CLS token's attention over the patches
   in the last CLIP layer. SigLIP and the Qwen towers have no CLS token: we read the attention each
   token receives in one vision layer, mean over heads and ALL queries of its frame,

       a_j = mean_h mean_i softmax_j(q_i^h k_j^h^T / sqrt(d_h))            (i, j in the same frame)

   (``ctx.vision(layer).attention``, mapped onto the LLM tokens as the model maps its features),
   divided by its sum over the frame (``attention_norm="frame"``: a distribution over the frame's
   tokens, as a softmax row is).
2. Kept tokens K. ``mode="fixed"`` (default; the fixed-retention runs video papers report): the
   frame's budget k_t (``split_budget`` of round(R N_vis) over the frames) is s = k_t - 1 kept
   tokens plus the extra token (step 4). Of the s, u = floor(s x ``uniform_share``) are spatially
   uniform samples and m = s - u the outliers (DivPrune's NOT_ADAPTIVE + PLUS: int(N r) top tokens
   plus the as many samples of ``arange(int(step/2), 575, step)``, step = int(1/r)):

       U = { o + w j : j = 0..u-1 },   w = n // u,  o = w // 2
       O = the m largest a_j over the tokens not in U          (a sample that is an outlier: next outlier)

   ``mode="adaptive"`` (the official forward): the IQR count of the frame,
       c = #{ j : a_j > Q3 + 1.5 (Q3 - Q1) }   (linear percentiles),  ratio = c / n,
       m = int(n ratio),  O = top-m by a,
       U = { 0, w, 2w, ... } below n - 1 and not in O,  w = int(int(1 / ratio) / 3).
3. Merge (every kept i in K = O + U): its q = 32 nearest tokens by the cosine of the head-mean keys
   k-bar (``ctx.vision(layer).keys``) among ALL other tokens of the frame (kept or not),

       y'_i = y_i + sum_{j in NN_q(i)} a_j y_j        (unnormalised, the official's; ``normalize=True``:
                                                       the sum divided by sum_j a_j, its commented-out
                                                       ``/ torch.sum(weights)``)
4. Extra token: e_t = sum_{j not in K} a_j y_j (``normalize=True``: divided by sum_{j not in K} a_j).
   The official appends it after the kept tokens. A selection keeps existing tokens: the extra token
   is written on the row of the LAST dropped token of the frame (the carrier; the nearest the official's
   "appended last" a dropped position gets), which is kept.

Frames whose budget covers all their tokens are left unchanged (no merge), so R = 1 is the identity
in both modes (adaptive mode: ``retention`` is otherwise only the nominal share of the FLOPs schedule,
the paper's ~25%). Kept tokens stay in sequence order at their own places, their merged rows replace
their embeddings (``Selection.hidden_states``). Every choice against the official code is in
docs/methods/prumerge_plus.md. Results: ``trace.method("prumerge_plus")``: budget, vision_layer,
mode, and per sample (ORIGINAL indices) outliers, uniform, carriers, frame_kept, kept_share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from sharp import PruningMethod, Selection

MODES = ("fixed", "adaptive")
ATTENTION_NORMS = ("frame", "none")
NEIGHBOURS = 32  # the official ``topk(cos_sim_matrix, k=int(32))``
# the vision layer each family reads: the tower's last layer, as the official's CLIP layer 23 of 24
# (LLaVA: "feature" = the last SigLIP layer the checkpoint keeps; Qwen: the last block, full attention
# over each temporal patch on every Qwen tower)
PORT_VISION_LAYER = {"llava_onevision": "feature", "llava_video": "feature", "qwen2_vl": -1,
                     "qwen2_5_vl": -1, "qwen3_vl": -1}


# -- step 1: the importance ---------------------------------------------------------------------


def frame_weights(attention: torch.Tensor, frame_total: torch.Tensor, norm: str) -> torch.Tensor:
    """a_j of step 1: attention (F, n) float32 of each frame's tokens, frame_total (F,) the map's sum
    over each frame's ORIGINAL tokens; ``norm="frame"`` divides by it, ``"none"`` keeps the map."""
    if norm == "none":
        return attention
    return attention / frame_total.clamp_min(torch.finfo(attention.dtype).tiny)[:, None]


# -- step 2: the kept tokens --------------------------------------------------------------------


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """(F, n) rank of each entry in its row by descending score (0 = largest; ties to the lower index)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1)


def uniform_fixed(n: int, u: torch.Tensor) -> torch.Tensor:
    """(F, n) bool: u_t samples at stride w = n // u_t from o = w // 2 in each frame (none when u_t = 0)."""
    w = torch.div(n, u.clamp_min(1), rounding_mode="floor")[:, None]
    o = torch.div(w, 2, rounding_mode="floor")
    p = torch.arange(n, device=u.device)[None]
    on_grid = (p >= o) & ((p - o) % w == 0)
    return on_grid & (torch.div(p - o, w, rounding_mode="floor") < u[:, None])


def fixed_kept(a: torch.Tensor, k: torch.Tensor, uniform_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed mode: (outliers, uniform) (F, n) bool of frames with budgets k (F,), 1 <= k_t < n:
    u = floor((k - 1) share) uniform samples, the m = k - 1 - u largest a_j outside them."""
    slots = k - 1
    u = torch.floor(slots.double() * uniform_share).long()
    uniform = uniform_fixed(a.shape[1], u)
    rank = rank_desc(a.masked_fill(uniform, float("-inf")))
    outliers = (rank < (slots - u)[:, None]) & ~uniform
    return outliers, uniform


def iqr_counts(a: torch.Tensor) -> torch.Tensor:
    """(F,) the official ``outlier_dectection`` count: #{a_j > Q3 + 1.5 IQR}, linear percentiles."""
    q = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype, device=a.device), dim=1)
    upper = q[1] + 1.5 * (q[1] - q[0])
    return (a > upper[:, None]).sum(dim=1)


def adaptive_kept(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive mode: (outliers, uniform) (F, n) bool. ratio = c / n, m = int(n ratio) top tokens;
    samples at stride int(int(1 / ratio) / 3) from 0 below n - 1 that are not outliers. No outlier
    (the official divides by zero): the stride of ratio = 1 / n."""
    n = a.shape[1]
    ratio = iqr_counts(a).double() / n
    m = torch.floor(n * ratio).long()
    outliers = rank_desc(a) < m[:, None]
    step = torch.floor(1.0 / torch.where(ratio > 0, ratio, torch.full_like(ratio, 1.0 / n))).long()
    stride = torch.div(step, 3, rounding_mode="floor").clamp_min(1)[:, None]
    p = torch.arange(n, device=a.device)[None]
    uniform = (p % stride == 0) & (p < n - 1) & ~outliers
    return outliers, uniform


# -- steps 3 and 4: merge, extra token ----------------------------------------------------------


@dataclass
class FrameMerge:
    """Steps 3-4 on F frames of n tokens. rows: (F, s, D) float32 merged rows of ``slots`` (F, s) kept
    positions (``valid`` (F, s) bool: a real kept token, frames keep different counts); extra: (F, D)
    float32 e_t; carrier: (F,) the position of the extra token's row, -1 when nothing was dropped."""

    slots: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    extra: torch.Tensor
    carrier: torch.Tensor


def merge_frames(y: torch.Tensor, keys: torch.Tensor, a: torch.Tensor, kept: torch.Tensor,
                 neighbours: int = NEIGHBOURS, normalize: bool = False) -> FrameMerge:
    """y (F, n, D), keys (F, n, h), a (F, n), kept (F, n) bool -> :class:`FrameMerge`. Every kept
    token absorbs its min(q, n - 1) nearest other tokens by key cosine, weighted by a: a weight matrix
    W (F, s + 1, n) holds a_j at each kept row's neighbours plus 1 at the row's own token and, in its
    last row, a_j at the dropped tokens; one batched product W y gives y' and e_t."""
    f, n = kept.shape
    x = y.float()
    count = kept.sum(dim=1)
    s = int(count.max()) if f else 0
    slots = (~kept).to(torch.int8).argsort(dim=1, stable=True)[:, :s]  # kept positions first, in order
    valid = torch.arange(s, device=kept.device)[None] < count[:, None]
    unit = F.normalize(keys.float(), dim=-1)
    sim = unit.gather(1, slots[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)  # (F, s, n)
    sim.scatter_(2, slots[..., None], float("-inf"))  # not itself
    q = min(neighbours, n - 1)
    near = sim.topk(q, dim=2, sorted=False).indices  # (F, s, q)
    weights = sim.new_zeros(f, s + 1, n)
    weights[:, :s].scatter_(2, near, a.gather(1, near.flatten(1)).view(f, s, q))
    weights[:, s] = a * ~kept  # the extra token's row
    if normalize:
        weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    weights[:, :s].scatter_(2, slots[..., None], 1.0)  # + y_i itself (never its own neighbour)
    merged = weights @ x  # (F, s + 1, D)
    positions = torch.arange(n, device=kept.device).expand(f, n)
    carrier = torch.where(kept, torch.full_like(positions, -1), positions).max(dim=1).values
    return FrameMerge(slots, valid, merged[:, :s], merged[:, s], carrier)


# -- the method ---------------------------------------------------------------------------------


@dataclass
class PruMergePlus(PruningMethod):
    """PruMerge+ before the LLM, per frame; ``retention`` = the kept share of the ORIGINAL visual
    tokens (the paper's PruMerge+: about 25%). See docs/methods/prumerge_plus.md."""

    name = "prumerge_plus"
    # the official feeds the pruned features to LLaVA-1.5 as an ordinary sequence numbered 0..len-1
    # (auto: on 1-D RoPE; M-RoPE keeps the kept tokens' own positions)
    official_positions = "compact"
    # "fixed": k = round(R N_vis) split over the frames (DivPrune's NOT_ADAPTIVE + PLUS) |
    # "adaptive": the IQR count per frame (the official forward; input dependent)
    mode: str = "fixed"
    # fixed mode: share of the k_t - 1 non-extra slots taken by the uniform samples (DivPrune's copy:
    # as many samples as outliers); 0 = PruMerge's fixed mode (outliers only)
    uniform_share: float = 0.5
    neighbours: int = NEIGHBOURS  # q of step 3 (official 32)
    # False: y_i + sum a_j y_j, the official's; True: the sums divided by their weights
    normalize: bool = False
    # a_j divided by its sum over the frame ("frame") or the mapped map as is ("none")
    attention_norm: str = "frame"
    # vision layer of the scores and keys: None = the family's (docs: the tower's last layer), an int
    # (negative from the end) or "feature" (typing.Union: the base's type check reads it)
    vision_layer: Optional[Union[int, str]] = None  # noqa: UP007, UP045

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"prumerge_plus: mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        if not (math.isfinite(self.uniform_share) and 0.0 <= self.uniform_share <= 1.0):
            raise ValueError(f"prumerge_plus: uniform_share must be in [0, 1] (the uniform samples' share of "
                             f"each frame's budget; DivPrune's PLUS copy 0.5), got {self.uniform_share!r}")
        if self.neighbours < 0:
            raise ValueError(f"prumerge_plus: neighbours must be an int >= 0 (official 32), got {self.neighbours!r}")
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"prumerge_plus: attention_norm must be one of {', '.join(map(repr, ATTENTION_NORMS))}, "
                             f"got {self.attention_norm!r}")
        if isinstance(self.vision_layer, str) and self.vision_layer != "feature":
            raise ValueError(f"prumerge_plus: vision_layer must be None (the family's layer), an int or 'feature', "
                             f"got {self.vision_layer!r}")

    @property
    def input_dependent_schedule(self) -> bool:  # type: ignore[override]
        """Adaptive counts depend on the video (the schedule is then nominal: ``retention``)."""
        return self.mode == "adaptive"

    # -- where ---------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0]  # before the LLM: on the input embeddings

    def vision_layers(self) -> list[Union[int, str]]:
        if self.vision_layer is None:
            raise ValueError("prumerge_plus: vision_layer=None is the family's layer: resolve the method for a "
                             "backbone (sharp.resolve_method; sharp.prune does)")
        return [self.vision_layer]

    def backbone_settings(self, backbone) -> dict:
        """``vision_layer=None``: the family's layer (:data:`PORT_VISION_LAYER`)."""
        out = super().backbone_settings(backbone)
        if self.vision_layer is None:
            if backbone.family not in PORT_VISION_LAYER:
                raise ValueError(f"prumerge_plus: no default vision layer for backbone family {backbone.family!r} "
                                 f"(known: {', '.join(sorted(PORT_VISION_LAYER))}); set vision_layer explicitly")
            out["vision_layer"] = backbone.fit_vision_layer(PORT_VISION_LAYER[backbone.family])
        return out

    # -- what ------------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        budgets = ctx.budget(self.retention)
        if budgets == ctx.visual_counts:
            return Selection.unchanged()  # R = 1 (both modes)
        layer = self.vision_layers()[0]
        with ctx.timed("prumerge_vision_maps"):  # the engine's vision-layer attention and keys
            maps = ctx.vision(layer)
        hidden = ctx.hidden_states.clone()  # (b, s, D): merged rows and extra tokens are written into it
        keep, record = [], []
        with ctx.timed("prumerge_select_merge"):
            for b, k in enumerate(budgets):
                kept, rec = self.prune_sample(ctx, maps, b, k, hidden)
                keep.append(kept)
                record.append(rec)
        t = ctx.trace
        t.budget, t.vision_layer, t.mode = budgets, layer, self.mode
        for key in ("outliers", "uniform", "carriers", "frame_kept"):
            setattr(t, key, [r[key] for r in record])
        t.kept_share = [len(k) / ctx.n_visual for k in keep]
        return Selection(keep, hidden_states=hidden)

    def frame_budgets(self, ctx, counts: torch.Tensor, k: int) -> torch.Tensor:
        """(F,) the frames' budgets (fixed mode; adaptive: -1, decided per frame)."""
        if self.mode == "adaptive":
            return torch.full_like(counts, -1)
        return torch.tensor(ctx.split_budget(k, counts.tolist()), device=counts.device)

    def prune_sample(self, ctx, maps, b: int, k: int, hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """PruMerge+ on sample b's current visual tokens (budget k), frames of equal size together;
        writes the merged rows and extra tokens into ``hidden[b]``. Returns the kept indices (into
        the sample's current tokens) and the sample's trace record (ORIGINAL indices)."""
        tokens = ctx.visual_tokens(b)
        dev, index, positions = tokens.index.device, tokens.index, tokens.positions
        att = maps.attention[b].to(dev).float()  # (N_vis,) over the ORIGINAL tokens
        frame_of = torch.arange(att.shape[0], device=dev) // ctx.layout.tokens_per_frame
        total = att.new_zeros(int(frame_of[-1]) + 1).index_add_(0, frame_of, att)  # (frames,) the map's sums
        keys = maps.keys[b].to(dev).index_select(0, index)  # (n_b, h)
        rows_in = rows_of(ctx.hidden_states[b], positions)  # (n_b, D)
        frames, counts = torch.unique(tokens.frame, return_counts=True)
        order = tokens.frame.argsort(stable=True)  # frame-major, sequence order inside a frame
        starts = torch.cumsum(counts, 0) - counts
        k_f = self.frame_budgets(ctx, counts, k)
        kept, outliers, uniform, carriers = [], [], [], []
        frame_kept = torch.zeros_like(counts)
        for n in torch.unique(counts).tolist():
            sel = (counts == n).nonzero().squeeze(1)
            if self.mode == "fixed":
                whole, active = sel[k_f[sel] >= n], sel[(k_f[sel] > 0) & (k_f[sel] < n)]
                for f in whole.tolist():  # a frame with its whole budget: unchanged
                    kept.append(order[starts[f]:starts[f] + n])
                    frame_kept[f] = n
            else:
                active = sel
            if not len(active):
                continue
            grid = order[starts[active][:, None] + torch.arange(n, device=dev)]  # (F, n) token rows
            a = frame_weights(att[index[grid]], total[frames[active]], self.attention_norm)
            if self.mode == "fixed":
                out_mask, uni_mask = fixed_kept(a, k_f[active], self.uniform_share)
            else:
                out_mask, uni_mask = adaptive_kept(a)
            keep_mask = out_mask | uni_mask
            res = merge_frames(rows_of(rows_in, grid), keys[grid], a, keep_mask, self.neighbours, self.normalize)
            slot_tokens = grid.gather(1, res.slots)[res.valid]
            merged = res.rows if bool(res.valid.all()) else res.rows[res.valid]
            hidden[b].index_copy_(0, positions[slot_tokens], merged.reshape(-1, merged.shape[-1]).to(hidden.dtype))
            has = res.carrier >= 0
            carrier_tokens = grid[has, res.carrier[has]]
            hidden[b].index_copy_(0, positions[carrier_tokens], res.extra[has].to(hidden.dtype))
            kept += [slot_tokens, carrier_tokens]
            outliers.append(grid[out_mask])
            uniform.append(grid[uni_mask])
            carriers.append(carrier_tokens)
            frame_kept[active] = keep_mask.sum(dim=1) + has.long()
        kept_all = torch.cat(kept) if kept else index[:0]
        record = {key: index[torch.cat(v)].sort().values.cpu() if v else index[:0].cpu()
                  for key, v in (("outliers", outliers), ("uniform", uniform), ("carriers", carriers))}
        record["frame_kept"] = frame_kept.cpu()
        return kept_all, record


def rows_of(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for x (m, D) and an index tensor of any shape -> (*index.shape, D); a view when the
    index is a contiguous run (the usual case: a frame-major, unpruned video), else a copy."""
    flat = index.reshape(-1)
    if flat.numel() and int(flat[-1] - flat[0]) == flat.numel() - 1 and bool((flat.diff() == 1).all()):
        return x[int(flat[0]):int(flat[-1]) + 1].view(*index.shape, x.shape[-1])
    return x.index_select(0, flat).view(*index.shape, x.shape[-1])
