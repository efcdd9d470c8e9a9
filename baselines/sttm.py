"""STTM (Hyun et al., "Multi-Granular Spatio-Temporal Token Merging for Training-Free Acceleration of
Video LLMs", ICCV 2025, arXiv 2507.07990; official code HYUNJS/STTM @ 00736c7). Inside the LLM, at the
input of decoder layer ``layer`` (the official ``sa_start_layer_idx``), on the hidden states x_{t,y,x}
(t = 1..T frames, a H x W grid each; Qwen: temporal patches of merged tokens), prefill only:

1. Pyramid (quadtree_spatial_merger.py ``avgpool_to_even_side_feature``): every level halves the grid,
   ceil(h/2) x ceil(w/2), a parent being the mean of its children

       p = (1 / |C(p)|) sum_{c in C(p)} c,

   where C(p) is a 2x2 block; on an odd side row 0 (column 0) is a singleton and the pairs start at 1.
   Halving stops when a side reaches 2; the roots are the level ``root_level`` of that list, coarse to
   fine (official ``sa_tree_root_level 1``: 14 -> 7 -> 4, 16 roots per 14 x 14 frame).
2. Quadtree, coarse to fine (quadtree_builder.py ``quadtree_build_iteration_video``): a node p stops
   (becomes a token) iff

       s(p) = min_{k = 1..4} cos(p, c_k) >= tau_s          (float32, the full hidden width),

   else its valid children are searched; leaves always stop. The official stop test reads all 4 child
   slots, and an invalid slot (the missing child of a row-0 / column-0 parent on an odd side) reads the
   child (t, 0, 0) (``invalid_child_slots="official"``); ``"masked"`` takes the min over the valid ones.
   Tokens are ordered by t H W + y_tl W + x_tl (each node's top-left cell).
3. Temporal merging (quadtree_temporal_merger.py ``cross_frame_node_merging_fast``): an edge joins a node
   of frame t and a node of frame t+1 when one's box contains the other's and

       cos(a, b) >= tau_t          (a / (||a|| + 1e-8), float32);

   each connected component (union-find over many frames) becomes one token at its earliest node's slot
   (the smallest top-left order), the unweighted mean of its nodes (``sa_tree_weighted_avg=False``;
   ``weighted_average=True``: patch-weighted, i.e. the exact mean over the component's patches, and the
   pyramid of exact region means). An explicit tau_t <= 0 turns temporal merging off (official
   ``temporal_thresh > 0`` test).

Kept = the representatives' slots, carrying the merged rows (``Selection.hidden_states``). Positions:
LLaVA re-numbers the shorter sequence (``position_ids[:, :merged_num_tokens]``: ``official_positions =
"compact"``), Qwen2-VL keeps each representative's M-RoPE ids (``positions="auto"`` picks these).

``retention``: the official code has no budget; its thresholds were tuned per dataset so that the MEAN
share is 50 % or 30 %. Here, unless both ``tau_s`` and ``tau_t`` are given, each video's thresholds are
found by bisection on one path through the official operating point,

    tau_s(lam) = 1 - lam (1 - anchor_tau_s),   tau_t(lam) = 1 - lam (1 - anchor_tau_t),   lam >= 0,

(lam = 1: the official pair .85 / .60), the least merging lam whose token count is <= round(r N). A
given ``tau_s`` / ``tau_t`` stays fixed (the other follows the path); both given: the official
fixed-threshold run, ``retention`` is then only the nominal schedule. The kept count depends on the
video (``input_dependent_schedule``; the trace has the measured counts). docs/methods/sttm.md has the
mapping to every family and each reading's official file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from sharp import PruningMethod, Selection, budget, layer_kwarg

INVALID_CHILD_SLOTS = ("official", "masked")
TEMPORAL_EPS = 1e-8  # filter_cross_frame_node_pairs: x / (||x|| + 1e-8)


# -- the pyramid -----------------------------------------------------------------------------------


def pyramid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Grid sizes of the pyramid, coarse to fine: halve (ceil) while both sides are > 2 (official
    ``while h != 2 and w != 2``; the same for sides >= 2, a side of 1 stops here instead of looping)."""
    sizes = [(height, width)]
    while min(sizes[0]) > 2:
        h, w = sizes[0]
        sizes.insert(0, (math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def child_pairs(n_child: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one side of a child level of n cells: the (first, second) child of each parent index; second
    is -1 where the parent has one child (odd n: parent 0 takes child 0 alone, parent i >= 1 takes
    2i-1 and 2i; even n: 2i and 2i+1)."""
    i = torch.arange(math.ceil(n_child / 2), device=device)
    if n_child % 2 == 0:
        return 2 * i, 2 * i + 1
    return (2 * i - 1).clamp(min=0), torch.where(i == 0, -1, 2 * i)


def parent_index(n_child: int, device=None) -> torch.Tensor:
    """(n,) the parent index of each child index along one side (inverse of :func:`child_pairs`)."""
    c = torch.arange(n_child, device=device)
    return c // 2 if n_child % 2 == 0 else (c + 1) // 2


@dataclass
class Level:
    """One pyramid level of a video: features (T, h, w, D) in the input dtype, the row and column
    intervals of its nodes in patches ([y0, y1), [x0, x1)), and, for a level with children, the
    stop statistic s(p) (T, h, w)."""
    features: torch.Tensor
    rows: tuple[torch.Tensor, torch.Tensor]
    cols: tuple[torch.Tensor, torch.Tensor]
    stop: Optional[torch.Tensor] = None


def pool_level(child: Level, weighted: bool) -> Level:
    """The parent level of ``child``: each parent the mean of its valid children (``weighted``: of its
    patches, i.e. children weighted by their patch counts), accumulated in float32 (float64 input:
    float64) and stored in the input dtype, as the official pooling of bfloat16 states."""
    x = child.features
    acc = torch.promote_types(x.dtype, torch.float32)
    (r0, r1), (c0, c1) = child_pairs(x.shape[1], x.device), child_pairs(x.shape[2], x.device)
    rv, cv = r1 >= 0, c1 >= 0
    r1f, c1f = torch.where(rv, r1, r0), torch.where(cv, c1, c0)
    height = (child.rows[1] - child.rows[0]).to(acc)  # (h,) patches per child row
    width = (child.cols[1] - child.cols[0]).to(acc)
    total = torch.zeros(x.shape[0], len(r0), len(c0), x.shape[3], dtype=acc, device=x.device)
    weight = torch.zeros(len(r0), len(c0), dtype=acc, device=x.device)
    for rows, rmask in ((r0, None), (r1f, rv)):
        for cols, cmask in ((c0, None), (c1f, cv)):
            w = (height[rows][:, None] * width[cols][None, :]) if weighted else torch.ones(
                len(rows), len(cols), dtype=acc, device=x.device)
            if rmask is not None:
                w = w * rmask[:, None]
            if cmask is not None:
                w = w * cmask[None, :]
            total += x[:, rows][:, :, cols].to(acc) * w[None, :, :, None]
            weight += w
    features = (total / weight[None, :, :, None]).to(x.dtype)
    rows_out = (child.rows[0][r0], child.rows[1][r1f])
    cols_out = (child.cols[0][c0], child.cols[1][c1f])
    return Level(features, rows_out, cols_out)


def child_slots(n_child_rows: int, n_child_cols: int, device=None):
    """The 4 child slots of every parent (h', w'): row and column indices (h', w', 4) into the child
    level (slot order (r0, c0), (r0, c1), (r1, c0), (r1, c1)) and their validity (h', w', 4). Invalid
    slots point to the child (0, 0), as the official ``child_yx_coords`` left at zero."""
    (r0, r1), (c0, c1) = child_pairs(n_child_rows, device), child_pairs(n_child_cols, device)
    rows = torch.stack([r0, r0, r1, r1], dim=-1)[:, None, :].expand(-1, len(c0), -1)
    cols = torch.stack([c0, c1, c0, c1], dim=-1)[None, :, :].expand(len(r0), -1, -1)
    valid = (rows >= 0) & (cols >= 0)
    return rows.where(valid, 0), cols.where(valid, 0), valid


def stop_statistic(parent: Level, child: Level, invalid_child_slots: str = "official") -> torch.Tensor:
    """s(p) = min over the 4 child slots of cos(p, c_k) (T, h', w'), float32 (float64 input: float64);
    ``"official"`` reads the invalid slots (child (t, 0, 0)), ``"masked"`` leaves them out."""
    x = child.features
    acc = torch.promote_types(x.dtype, torch.float32)
    rows, cols, valid = child_slots(x.shape[1], x.shape[2], x.device)
    children = x[:, rows, cols].to(acc)  # (T, h', w', 4, D)
    cos = F.cosine_similarity(parent.features.to(acc).unsqueeze(-2), children, dim=-1)  # (T, h', w', 4)
    if invalid_child_slots == "masked":
        cos = cos.masked_fill(~valid, math.inf)
    return cos.min(dim=-1).values


def build_levels(x: torch.Tensor, root_level: int, invalid_child_slots: str, weighted: bool) -> list[Level]:
    """The pyramid of a video x (T, H, W, D), root level first, leaves last (one level when the grid
    is too small for ``root_level``: every cell a token)."""
    t, h, w, _ = x.shape
    sizes = pyramid_sizes(h, w)
    depth = len(sizes) - min(root_level, len(sizes) - 1)
    ar = torch.arange
    leaf = Level(x, (ar(h, device=x.device), ar(h, device=x.device) + 1),
                 (ar(w, device=x.device), ar(w, device=x.device) + 1))
    levels = [leaf]
    for _ in range(depth - 1):
        parent = pool_level(levels[0], weighted)
        parent.stop = stop_statistic(parent, levels[0], invalid_child_slots)
        levels.insert(0, parent)
    return levels


# -- the candidate nodes of one video --------------------------------------------------------------


def component_labels(n: int, edges: torch.Tensor) -> torch.Tensor:
    """(n,) the smallest node index of each node's connected component over ``edges`` (E, 2): min-label
    propagation with pointer jumping (the official ``get_merge_dst_idx_safe`` idea; labels only decrease,
    so the fixed point has one label per component, its smallest member)."""
    label = torch.arange(n, device=edges.device)
    if edges.numel() == 0:
        return label
    a, b = edges[:, 0], edges[:, 1]
    while True:
        low = torch.minimum(label[a], label[b])
        new = label.clone()
        new.scatter_reduce_(0, a, low, reduce="amin")
        new.scatter_reduce_(0, b, low, reduce="amin")
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new


@dataclass
class Merged:
    """STTM's tokens of one video: ``cells`` (n,) the flat grid cell t H W + y W + x of each token's
    slot (ascending), ``features`` (n, D) its row, ``boxes`` (n, 5) the slot node's (t, y0, x0, y1, x1),
    ``spatial_nodes`` the quadtree's token count before temporal merging, ``members`` (n,) nodes merged."""
    cells: torch.Tensor
    features: torch.Tensor
    boxes: torch.Tensor
    spatial_nodes: int
    members: torch.Tensor


class Quadtree:
    """Every candidate node of a video x (T, H, W, D): all pyramid levels, flat as id = t F + p (F nodes
    per frame, levels root to leaf, raster order inside a level), with what any (tau_s, tau_t) needs:

    - ``stop`` (T F,) s(p) (+inf at the leaves) and ``reach`` (T F,) the max s over p's strict ancestors
      (-inf at the roots): p is a token at tau_s iff reach < tau_s <= stop (its ancestors split, it stops);
    - ``pairs`` (E, 2) every (frame t, frame t+1) node pair whose boxes contain one another (an ancestor-
      or-self pair of grid positions) and ``pair_cos`` (E,) their temporal cosine.
    """

    def __init__(self, x: torch.Tensor, root_level: int = 1, invalid_child_slots: str = "official",
                 weighted: bool = False):
        self.frames, self.height, self.width, dim = x.shape
        self.weighted = weighted
        levels = build_levels(x, root_level, invalid_child_slots, weighted)
        device, t = x.device, self.frames
        acc = torch.promote_types(x.dtype, torch.float32)
        sizes = [lv.features.shape[1:3] for lv in levels]
        counts = [h * w for h, w in sizes]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        self.per_frame = sum(counts)
        self.features = torch.cat([lv.features.reshape(t, -1, dim) for lv in levels], dim=1)  # (T, F, D)
        boxes, parents, stops, reaches = [], [], [], []
        reach = torch.full((t,) + tuple(sizes[0]), -math.inf, dtype=acc, device=device)
        for i, lv in enumerate(levels):
            h, w = sizes[i]
            y0, y1 = lv.rows
            x0, x1 = lv.cols
            boxes.append(torch.stack([y0[:, None].expand(h, w), x0[None, :].expand(h, w),
                                      y1[:, None].expand(h, w), x1[None, :].expand(h, w)], dim=-1).reshape(-1, 4))
            stop = lv.stop if lv.stop is not None else torch.full((t, h, w), math.inf, dtype=acc, device=device)
            stops.append(stop.reshape(t, -1))
            reaches.append(reach.reshape(t, -1))
            if i == 0:
                parents.append(torch.full((h * w,), -1, device=device))
            else:
                ph, pw = parent_index(h, device), parent_index(w, device)
                parents.append((offsets[i - 1] + ph[:, None] * sizes[i - 1][1] + pw[None, :]).reshape(-1))
            if i + 1 < len(levels):
                nh, nw = sizes[i + 1]
                grid = torch.maximum(reach, stop)
                reach = grid[:, parent_index(nh, device)][:, :, parent_index(nw, device)]
        self.boxes = torch.cat(boxes)  # (F, 4) y0, x0, y1, x1
        self.patches = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])  # (F,)
        self.stop = torch.cat(stops, dim=1).reshape(-1)
        self.reach = torch.cat(reaches, dim=1).reshape(-1)
        self.parent = torch.cat(parents)  # (F,) -1 at the roots
        self.key = (torch.arange(t, device=device)[:, None] * (self.height * self.width)
                    + (self.boxes[:, 0] * self.width + self.boxes[:, 1])[None, :]).reshape(-1)  # (T F,)
        self.pairs, self.pair_cos = self.temporal_candidates(acc)

    def ancestor_pairs(self) -> torch.Tensor:
        """(Q, 2) (u, v) grid positions of one frame with u an ancestor of v or v itself."""
        v = torch.arange(self.per_frame, device=self.parent.device)
        out, u = [torch.stack([v, v], dim=1)], v
        while True:
            has = self.parent[u] >= 0
            if not bool(has.any()):
                return torch.cat(out)
            u, v = self.parent[u[has]], v[has]
            out.append(torch.stack([u, v], dim=1))

    def temporal_candidates(self, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Containment pairs of consecutive frames (both directions) and their cosine, float32."""
        device = self.features.device
        if self.frames < 2:
            return torch.zeros(0, 2, dtype=torch.long, device=device), torch.zeros(0, dtype=acc, device=device)
        anc = self.ancestor_pairs()
        proper = anc[anc[:, 0] != anc[:, 1]]
        local = torch.cat([anc, proper.flip(1)])  # (Q', 2): (position in frame t, position in frame t+1)
        x = self.features.to(acc)
        unit = x / (x.norm(dim=-1, keepdim=True) + TEMPORAL_EPS)
        cos = torch.bmm(unit[:-1], unit[1:].transpose(1, 2))  # (T-1, F, F)
        cos = cos[:, local[:, 0], local[:, 1]].reshape(-1)
        base = torch.arange(self.frames - 1, device=device)[:, None] * self.per_frame
        first = (base + local[None, :, 0]).reshape(-1)
        second = (base + self.per_frame + local[None, :, 1]).reshape(-1)
        return torch.stack([first, second], dim=1), cos

    # -- one threshold pair --------------------------------------------------------------------------
    def nodes(self, tau_s: float) -> torch.Tensor:
        """(n,) ids of the quadtree's tokens at tau_s, ascending in top-left order (the official sort)."""
        ids = ((self.reach < tau_s) & (self.stop >= tau_s)).nonzero().squeeze(1)
        return ids[torch.argsort(self.key[ids])]

    def components(self, nodes: torch.Tensor, tau_t: Optional[float]) -> torch.Tensor:
        """(n,) for each token (``nodes`` order) the position of its component's first token (None: no
        temporal merging)."""
        n = len(nodes)
        if tau_t is None or n == 0 or len(self.pairs) == 0:
            return torch.arange(n, device=nodes.device)
        where = torch.full((self.frames * self.per_frame,), -1, device=nodes.device)
        where[nodes] = torch.arange(n, device=nodes.device)
        ends = where[self.pairs]
        edges = ends[(ends >= 0).all(dim=1) & (self.pair_cos >= tau_t)]
        return component_labels(n, edges)

    def count(self, tau_s: float, tau_t: Optional[float]) -> int:
        """Number of tokens STTM keeps at (tau_s, tau_t)."""
        label = self.components(self.nodes(tau_s), tau_t)
        return int((label == torch.arange(len(label), device=label.device)).sum())

    def merge(self, tau_s: float, tau_t: Optional[float]) -> Merged:
        """The tokens at (tau_s, tau_t): each component's mean (unweighted over its nodes, or over its
        patches when ``weighted``) at its first node's slot."""
        nodes = self.nodes(tau_s)
        label = self.components(nodes, tau_t)
        n = len(nodes)
        first = label == torch.arange(n, device=label.device)
        x = self.features.reshape(-1, self.features.shape[-1])[nodes]
        acc = torch.promote_types(x.dtype, torch.float32)
        positions = nodes % self.per_frame
        w = self.patches[positions].to(acc) if self.weighted else torch.ones(n, dtype=acc, device=x.device)
        total = torch.zeros(n, x.shape[1], dtype=acc, device=x.device).index_add_(0, label, x.to(acc) * w[:, None])
        weight = torch.zeros(n, dtype=acc, device=x.device).index_add_(0, label, w)
        members = torch.zeros(n, dtype=torch.long, device=x.device).index_add_(0, label, torch.ones_like(label))
        kept = nodes[first]
        frame = kept // self.per_frame
        box = self.boxes[kept % self.per_frame]
        rows = (total[first] / weight[first, None]).to(x.dtype)
        return Merged(self.key[kept], rows, torch.cat([frame[:, None], box], dim=1), n, members[first])


# -- retention -> thresholds -----------------------------------------------------------------------


@dataclass
class Thresholds:
    """A threshold pair on the path tau(lam) = 1 - lam (1 - anchor) (a fixed value stays; tau_t None: no
    temporal merging), with its lam and the token count it gives."""
    tau_s: float
    tau_t: Optional[float]
    lam: Optional[float]
    count: int


def path_thresholds(lam: float, fixed_s: Optional[float], fixed_t: Optional[float], anchor_s: float,
                    anchor_t: float, temporal: bool) -> tuple[float, Optional[float]]:
    """(tau_s, tau_t) at lam: the fixed values, the free ones 1 - lam (1 - anchor)."""
    tau_s = fixed_s if fixed_s is not None else 1.0 - lam * (1.0 - anchor_s)
    if not temporal:
        return tau_s, None
    return tau_s, fixed_t if fixed_t is not None else 1.0 - lam * (1.0 - anchor_t)


def calibrate(tree: Quadtree, k: int, fixed_s: Optional[float], fixed_t: Optional[float], anchor_s: float,
              anchor_t: float, temporal: bool, steps: int) -> Thresholds:
    """The least merging lam on the path whose count is <= k: bisection over [0, lam_max] (lam_max puts
    every free threshold at -1: every parent stops, every containment pair merges), ``steps`` halvings,
    stopping early at a count of exactly k; lam_max when even that keeps more than k (the video's floor)."""
    free = [a for a, f in ((anchor_s, fixed_s), (anchor_t, fixed_t if temporal else 0.0)) if f is None]
    lam_max = max(2.0 / (1.0 - a) for a in free)

    def at(lam: float) -> Thresholds:
        s, t = path_thresholds(lam, fixed_s, fixed_t, anchor_s, anchor_t, temporal)
        return Thresholds(s, t, lam, tree.count(s, t))

    best = at(0.0)
    if best.count <= k:
        return best
    best = at(lam_max)
    if best.count > k:
        return best
    lo = 0.0
    for _ in range(steps):
        mid = at((lo + best.lam) / 2)
        if mid.count == k:
            return mid
        if mid.count < k:
            best = mid
        else:
            lo = mid.lam
    return best


# -- the method ------------------------------------------------------------------------------------


@dataclass
class VideoGrid:
    """A sample's current visual tokens as a full (T, H, W) grid: ``order`` (T H W,) the token (index into
    the current visual tokens) of each flat cell."""
    order: torch.Tensor
    frames: int
    height: int
    width: int


def video_grid(tokens) -> VideoGrid:
    """The (frame, row, col) grid of ``ctx.visual_tokens(b)``; every cell must be present."""
    frames = torch.unique(tokens.frame)
    t, h, w = len(frames), int(tokens.row.max()) + 1, int(tokens.col.max()) + 1
    frame_rank = torch.searchsorted(frames, tokens.frame)
    cell = (frame_rank * h + tokens.row) * w + tokens.col
    if len(cell) != t * h * w or len(torch.unique(cell)) != len(cell):
        raise ValueError(f"sttm: merges a whole video grid, but the sample has {len(cell)} visual tokens for "
                         f"{t} frames of {h} x {w} (an earlier stage removed some: put sttm first)")
    return VideoGrid(torch.argsort(cell), t, h, w)


@dataclass
class STTM(PruningMethod):
    """STTM with the official defaults (scripts/eval/run_vidqa.sh: ``--sa_start_layer_idx 2
    --sa_tree_root_level 1``, thresholds from ``retention`` unless given)."""

    name = "sttm"
    official_positions = "compact"  # LLaVA: position_ids[:, :merged_num_tokens] (auto; M-RoPE: original)
    input_dependent_schedule: ClassVar[bool] = True
    layer: int = layer_kwarg(2, scaling="relative")  # sa_start_layer_idx (7B: 2); >= 1 on shallow models
    tau_s: Optional[float] = None  # sa_tree_thresh; None: from retention (the path below)
    tau_t: Optional[float] = None  # sa_tree_temporal_thresh; <= 0: no temporal merging; None: from retention
    root_level: int = 1  # sa_tree_root_level: the roots' level in the pyramid, coarse to fine
    invalid_child_slots: str = "official"  # "official": the stop test reads child (t, 0, 0) | "masked"
    weighted_average: bool = False  # sa_tree_weighted_avg: patch-weighted means (False: mean of the parts)
    anchor_tau_s: float = 0.85  # the official operating point the retention path runs through
    anchor_tau_t: float = 0.60
    search_steps: int = 20  # bisection halvings of lam per video

    def __post_init__(self):
        super().__post_init__()
        if self.invalid_child_slots not in INVALID_CHILD_SLOTS:
            raise ValueError(f"sttm: invalid_child_slots must be one of {', '.join(map(repr, INVALID_CHILD_SLOTS))}, "
                             f"got {self.invalid_child_slots!r}")
        if self.root_level < 0:
            raise ValueError(f"sttm: root_level must be >= 0 (0: the coarsest level), got {self.root_level}")
        for key in ("anchor_tau_s", "anchor_tau_t"):
            if not -1.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"sttm: {key} must be a cosine in [-1, 1), got {getattr(self, key)}")
        for key in ("tau_s", "tau_t"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"sttm: {key} must be a finite number or None (from retention), got {value}")
        if self.search_steps < 1:
            raise ValueError(f"sttm: search_steps must be >= 1, got {self.search_steps}")

    @property
    def temporal(self) -> bool:
        """Whether temporal merging runs (an explicit tau_t <= 0 turns it off, as the official code)."""
        return self.tau_t is None or self.tau_t > 0

    @property
    def calibrated(self) -> bool:
        """Whether the thresholds come from ``retention`` (a threshold is left to the path)."""
        return self.tau_s is None or (self.temporal and self.tau_t is None)

    def stages(self, num_layers: int) -> list[int]:
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"sttm: layer must be in 0..{num_layers - 1}, got {self.layer}")
        return [self.layer]

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL: all tokens before ``layer``, round(r N) from it (the count the thresholds are fitted
        to; fixed thresholds keep a video-dependent count, which the trace measures)."""
        kept = budget(n_visual, self.retention)
        return [n_visual if layer < self.layer else kept for layer in range(num_layers)]

    def select(self, ctx) -> Selection:
        if self.calibrated and self.retention >= 1.0:
            return Selection.unchanged()  # the path's lam = 0 end: no merging
        with ctx.timed("sttm"):
            hidden = ctx.hidden_states.clone()
            keep, found, merged = [], [], []
            for b, k in enumerate(ctx.budget(self.retention)):
                tokens = ctx.visual_tokens(b)
                grid = video_grid(tokens)
                rows = tokens.positions[grid.order]
                x = ctx.hidden_states[b, rows].reshape(grid.frames, grid.height, grid.width, -1)
                tree = Quadtree(x, self.root_level, self.invalid_child_slots, self.weighted_average)
                thresholds = self.thresholds(tree, int(k))
                result = tree.merge(thresholds.tau_s, thresholds.tau_t)
                hidden[b, rows[result.cells]] = result.features
                keep.append(grid.order[result.cells])
                found.append(thresholds)
                merged.append(result)
            self.record(ctx, found, merged)
        return Selection(keep, hidden_states=hidden)

    def thresholds(self, tree: Quadtree, k: int) -> Thresholds:
        """The video's (tau_s, tau_t): the given ones, or the path's least merging pair within k tokens."""
        if not self.calibrated:
            tau_t = self.tau_t if self.temporal else None
            return Thresholds(self.tau_s, tau_t, None, tree.count(self.tau_s, tau_t))
        return calibrate(tree, k, self.tau_s, self.tau_t, self.anchor_tau_s, self.anchor_tau_t, self.temporal,
                         self.search_steps)

    @staticmethod
    def record(ctx, found: list[Thresholds], merged: list[Merged]) -> None:
        """``trace.method("sttm")``, per sample: the thresholds used (tau_s, tau_t, lam), the quadtree's
        token count before temporal merging, the kept count and share of the original visual tokens,
        and the (t, y0, x0, y1, x1) box of each kept token's slot."""
        t = ctx.trace
        t.tau_s = [f.tau_s for f in found]
        t.tau_t = [f.tau_t for f in found]
        t.lam = [f.lam for f in found]
        t.spatial_tokens = [m.spatial_nodes for m in merged]
        t.kept = [len(m.cells) for m in merged]
        t.share = [len(m.cells) / ctx.n_visual for m in merged]
        t.boxes = [m.boxes.cpu() for m in merged]
