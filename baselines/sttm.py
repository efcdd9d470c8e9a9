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
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import torch

from sharp import PruningMethod, Selection, budget, layer_kwarg

INVALID_CHILD_SLOTS = ("official", "masked")
TEMPORAL_EPS = 1e-8  # filter_cross_frame_node_pairs: x / (||x|| + 1e-8)
COSINE_EPS = 1e-8  # F.cosine_similarity (the stop test): x / max(||x||, 1e-8)


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
    stop statistic s(p) (T, h, w). Computed once from the features: ``wide`` the features in the
    accumulation dtype (float32; float64 input: float64), ``norm`` (T, h, w, 1) their L2 norms, and
    (set by :func:`build_levels`) ``unit`` (T, h, w, D) the temporal unit x / (||x|| + 1e-8), which the
    pooling, the stop test and the temporal cosines share."""
    features: torch.Tensor
    rows: tuple[torch.Tensor, torch.Tensor]
    cols: tuple[torch.Tensor, torch.Tensor]
    stop: Optional[torch.Tensor] = None
    wide: torch.Tensor = field(init=False, repr=False)
    norm: torch.Tensor = field(init=False, repr=False)
    unit: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.wide = self.features.to(accumulation_dtype(self.features.dtype))
        self.norm = torch.linalg.vector_norm(self.wide, dim=-1, keepdim=True)

    def cosine_units(self) -> torch.Tensor:
        """(T, h, w, D) x / max(||x||, 1e-8), ``F.cosine_similarity``'s normalisation (the stop test):
        ``unit`` itself where the two divisors are equal (in float32 every norm >= 0.25: the 1e-8 is
        below half an ulp), else computed."""
        divisor = self.norm.clamp_min(COSINE_EPS)
        if self.unit is not None and torch.equal(divisor, self.norm + TEMPORAL_EPS):
            return self.unit
        return self.wide / divisor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 input: the official float32 up-cast of the hidden states."""
    return torch.promote_types(dtype, torch.float32)


def side_segments(n_child: int) -> list[tuple[slice, tuple[slice, ...]]]:
    """Along one side of a child level of n cells, as slices (views, no copies): each run of parents and
    its children in slot order (:func:`child_pairs`): even n one run, parents 0.. with children (2i,
    2i+1); odd n the parent 0 with child 0 alone, then parents 1.. with (2i-1, 2i)."""
    if n_child % 2 == 0:
        return [(slice(0, n_child // 2), (slice(0, n_child, 2), slice(1, n_child, 2)))]
    runs = [(slice(0, 1), (slice(0, 1),))]
    if n_child > 1:
        runs.append((slice(1, (n_child + 1) // 2), (slice(1, n_child, 2), slice(2, n_child, 2))))
    return runs


def block_runs(height: int, width: int):
    """The rectangles of parents whose blocks have the same shape, for a child level h x w: (parent rows,
    parent columns, the child (rows, columns) slices of each valid slot in the slot order (r0, c0), (r0,
    c1), (r1, c0), (r1, c1)); a rectangle with fewer than 4 valid slots has the official invalid ones."""
    for parent_rows, child_rows in side_segments(height):
        for parent_cols, child_cols in side_segments(width):
            yield parent_rows, parent_cols, [(r, c) for r in child_rows for c in child_cols]


def pool_level(child: Level, weighted: bool) -> Level:
    """The parent level of ``child``: p = sum_k w_k c_k / sum_k w_k over p's valid children in slot
    order, w_k = 1 (or, ``weighted``, c_k's patch count), accumulated in float32 (float64 input:
    float64) and stored in the input dtype, as the official pooling of bfloat16 states. Each rectangle
    of :func:`block_runs` is summed in place from strided views of the children."""
    x = child.wide
    t, h, w, dim = x.shape
    size_r = (child.rows[1] - child.rows[0]).to(x.dtype)  # (h,) patches per child row
    size_c = (child.cols[1] - child.cols[0]).to(x.dtype)
    (r0, r1), (c0, c1) = child_pairs(h, x.device), child_pairs(w, x.device)
    total = x.new_empty(t, len(r0), len(c0), dim)
    weight = x.new_empty(len(r0), len(c0))
    for parent_rows, parent_cols, slots in block_runs(h, w):
        out = total[:, parent_rows, parent_cols]  # (T, rows, cols, D): written in place
        weights = []
        for rows, cols in slots:
            part = x[:, rows, cols]
            if weighted:
                weights.append(size_r[rows][:, None] * size_c[cols][None, :])
                part = part * weights[-1][None, :, :, None]
            else:
                weights.append(1.0)
            if len(weights) == 1:
                out.copy_(part)
            else:
                out.add_(part)
        weight[parent_rows, parent_cols] = sum(weights)
    features = total.div_(weight[None, :, :, None]).to(child.features.dtype)
    rows_out = (child.rows[0][r0], child.rows[1][torch.where(r1 >= 0, r1, r0)])
    cols_out = (child.cols[0][c0], child.cols[1][torch.where(c1 >= 0, c1, c0)])
    return Level(features, rows_out, cols_out)


def stop_statistic(parent: Level, child: Level, invalid_child_slots: str = "official") -> torch.Tensor:
    """s(p) = min over the 4 child slots of cos(p, c_k) (T, h', w'), float32 (float64 input: float64),
    bit for bit ``F.cosine_similarity`` (x / max(||x||, 1e-8), the products summed over D), one slot of
    one :func:`block_runs` rectangle at a time; ``"official"`` adds the invalid slots' cos(p, c_{t,0,0})
    where a rectangle has fewer than 4 valid slots, ``"masked"`` leaves them out."""
    unit_parent, unit_child = parent.cosine_units(), child.cosine_units()  # (T, h', w', D), (T, h, w, D)
    stop = torch.full(unit_parent.shape[:3], math.inf, dtype=unit_parent.dtype, device=unit_parent.device)
    corner = unit_child[:, :1, :1] if invalid_child_slots == "official" else None  # (T, 1, 1, D) child (t, 0, 0)
    scratch = unit_parent.new_empty(unit_parent.numel())  # every rectangle's products, in turn
    for parent_rows, parent_cols, slots in block_runs(*unit_child.shape[1:3]):
        unit = unit_parent[:, parent_rows, parent_cols]
        low = stop[:, parent_rows, parent_cols]
        products = scratch[:unit.numel()].view(unit.shape)
        reads = [unit_child[:, rows, cols] for rows, cols in slots]
        if corner is not None and len(slots) < 4:
            reads.append(corner)
        for read in reads:
            torch.mul(unit, read, out=products)
            torch.minimum(low, products.sum(dim=-1), out=low)
    return stop


def build_levels(x: torch.Tensor, root_level: int, invalid_child_slots: str,
                 weighted: bool) -> tuple[list[Level], torch.Tensor]:
    """The pyramid of a video x (T, H, W, D), root level first, leaves last (one level when the grid
    is too small for ``root_level``: every cell a token), with each parent's s(p), and the temporal
    units of every node (:func:`temporal_units`)."""
    t, h, w, _ = x.shape
    sizes = pyramid_sizes(h, w)
    depth = len(sizes) - min(root_level, len(sizes) - 1)
    ar = torch.arange
    leaf = Level(x, (ar(h, device=x.device), ar(h, device=x.device) + 1),
                 (ar(w, device=x.device), ar(w, device=x.device) + 1))
    levels = [leaf]
    for _ in range(depth - 1):
        levels.insert(0, pool_level(levels[0], weighted))
    units = temporal_units(levels)
    for parent, child in zip(levels, levels[1:]):
        parent.stop = stop_statistic(parent, child, invalid_child_slots)
    return levels, units


def temporal_units(levels: list[Level]) -> torch.Tensor:
    """(T, F, D) every node's x / (||x|| + 1e-8) (``filter_cross_frame_node_pairs``; float32, float64
    input: float64), levels root to leaf along F, each level divided straight into its columns (its
    ``unit`` a view of them)."""
    t, dim = levels[0].wide.shape[0], levels[0].wide.shape[-1]
    sizes = [lv.norm[0].numel() for lv in levels]
    units = levels[0].wide.new_empty(t, sum(sizes), dim)
    offset = 0
    for lv, size in zip(levels, sizes):
        lv.unit = units[:, offset:offset + size].view(lv.wide.shape)
        torch.div(lv.wide, lv.norm + TEMPORAL_EPS, out=lv.unit)
        offset += size
    return units


# -- the candidate nodes of one video --------------------------------------------------------------


def component_labels(n: int, edges: np.ndarray) -> np.ndarray:
    """(n,) the smallest node index of each node's connected component over ``edges`` (E, 2): min-label
    propagation with pointer jumping (the official ``get_merge_dst_idx_safe`` idea; labels only decrease,
    so the fixed point has one label per component, its smallest member). Each round: every node takes
    the least label of itself and its neighbours (both directions of each edge), then its label's label.
    In numpy on the CPU: a round is a few operations on small arrays, where numpy's per-call cost is a
    third of torch's."""
    label = np.arange(n)
    if len(edges) == 0:
        return label
    source, target = np.concatenate([edges[:, 0], edges[:, 1]]), np.concatenate([edges[:, 1], edges[:, 0]])
    while True:
        new = label.copy()
        np.minimum.at(new, target, label[source])
        new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


class TokenCounter:
    """STTM's kept count at any (tau_s, tau_t) from a :class:`Quadtree`'s statistics, without touching a
    feature: the tokens at tau_s (reach < tau_s <= stop), the edges among them (a containment pair whose
    two ends are tokens, max reach < tau_s <= min stop, and whose cosine >= tau_t) and the number of
    components (:func:`component_labels`). Only the pairs that can ever be an edge (max reach < min stop)
    are kept; numpy on the CPU, the thresholds compared in the statistics' dtype, as torch compares a
    Python float."""

    def __init__(self, reach: torch.Tensor, stop: torch.Tensor, pairs: torch.Tensor, pair_cos: torch.Tensor):
        ends_reach, ends_stop = reach[pairs].amax(dim=1), stop[pairs].amin(dim=1)  # (E,)
        live = ends_reach < ends_stop
        self.reach, self.stop = reach.cpu().numpy(), stop.cpu().numpy()
        self.pairs, self.pair_cos = pairs[live].cpu().numpy(), pair_cos[live].cpu().numpy()
        self.pair_reach, self.pair_stop = ends_reach[live].cpu().numpy(), ends_stop[live].cpu().numpy()
        self.scalar = self.reach.dtype.type  # float32 (float64 input: float64)

    def __call__(self, tau_s: float, tau_t: Optional[float]) -> int:
        tau_s = self.scalar(tau_s)
        token = (self.reach < tau_s) & (self.stop >= tau_s)
        if tau_t is None or len(self.pairs) == 0:
            return int(token.sum())
        edge = (self.pair_reach < tau_s) & (self.pair_stop >= tau_s) & (self.pair_cos >= self.scalar(tau_t))
        label = component_labels(len(token), self.pairs[edge])
        return int((token & (label == np.arange(len(token)))).sum())


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
      or-self pair of grid positions) and ``pair_cos`` (E,) their temporal cosine;
    - ``counter`` (:class:`TokenCounter`) the kept count at any (tau_s, tau_t) from these alone.
    """

    def __init__(self, x: torch.Tensor, root_level: int = 1, invalid_child_slots: str = "official",
                 weighted: bool = False):
        self.frames, self.height, self.width, dim = x.shape
        self.weighted = weighted
        levels, units = build_levels(x, root_level, invalid_child_slots, weighted)
        device, t = x.device, self.frames
        acc = accumulation_dtype(x.dtype)
        sizes = [lv.features.shape[1:3] for lv in levels]
        counts = [h * w for h, w in sizes]
        self.offsets = [sum(counts[:i]) for i in range(len(counts))]  # first position of each level
        self.per_frame = sum(counts)
        self.level_features = [lv.features.reshape(t, -1, dim) for lv in levels]  # (T, h w, D) each
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
                parents.append((self.offsets[i - 1] + ph[:, None] * sizes[i - 1][1] + pw[None, :]).reshape(-1))
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
        self.pairs, self.pair_cos = self.temporal_candidates(units)
        self.counter = TokenCounter(self.reach, self.stop, self.pairs, self.pair_cos)

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

    def temporal_candidates(self, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Containment pairs of consecutive frames (both directions) and their cosine, float32, from the
        units (T, F, D) of :func:`temporal_units`: every (frame t, frame t + 1) cosine by one batched
        matmul, read at the pairs."""
        device = unit.device
        if self.frames < 2:
            return torch.zeros(0, 2, dtype=torch.long, device=device), torch.zeros(0, dtype=unit.dtype, device=device)
        anc = self.ancestor_pairs()
        proper = anc[anc[:, 0] != anc[:, 1]]
        local = torch.cat([anc, proper.flip(1)])  # (Q', 2): (position in frame t, position in frame t+1)
        cos = torch.bmm(unit[:-1], unit[1:].transpose(1, 2))  # (T-1, F, F)
        cos = cos[:, local[:, 0], local[:, 1]].reshape(-1)
        base = torch.arange(self.frames - 1, device=device)[:, None] * self.per_frame
        first = (base + local[None, :, 0]).reshape(-1)
        second = (base + self.per_frame + local[None, :, 1]).reshape(-1)
        return torch.stack([first, second], dim=1), cos

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, D) the features (input dtype) of node ids (n,): one gather from the leaf level for all
        (a non-leaf reads a stand-in row), then the few non-leaf rows overwritten from their levels."""
        frame, position = ids // self.per_frame, ids % self.per_frame
        *upper, leaves = self.level_features
        size = leaves.shape[1]
        out = leaves.reshape(-1, leaves.shape[-1]).index_select(
            0, frame * size + (position - self.offsets[-1]).clamp(min=0))
        for offset, table in zip(self.offsets, upper):
            size = table.shape[1]
            here = ((position >= offset) & (position < offset + size)).nonzero().squeeze(1)
            flat = frame[here] * size + position[here] - offset
            out.index_copy_(0, here, table.reshape(-1, table.shape[-1]).index_select(0, flat))
        return out

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
        return torch.from_numpy(component_labels(n, edges.cpu().numpy())).to(nodes.device)

    def count(self, tau_s: float, tau_t: Optional[float]) -> int:
        """Number of tokens STTM keeps at (tau_s, tau_t) (:class:`TokenCounter`)."""
        return self.counter(tau_s, tau_t)

    def merge(self, tau_s: float, tau_t: Optional[float]) -> Merged:
        """The tokens at (tau_s, tau_t): each component's mean (unweighted over its nodes, or over its
        patches when ``weighted``) at its first node's slot, summed in the nodes' order (first node, then
        the others by ``index_add_``) in float32 (float64 input: float64)."""
        nodes = self.nodes(tau_s)
        label = self.components(nodes, tau_t)
        n = len(nodes)
        first = label == torch.arange(n, device=label.device)
        acc = accumulation_dtype(self.level_features[0].dtype)
        slot = torch.cumsum(first, dim=0) - 1  # (n,) each first node's place among the kept
        rest = (~first).nonzero().squeeze(1)
        to = slot[label[rest]]  # (n - m,) the kept place each other node adds to
        kept = nodes[first]
        gathered = self.rows(torch.cat([kept, nodes[rest]])).to(acc)  # (n, D): the kept, then the others
        total, others = gathered[:len(kept)], gathered[len(kept):]
        members = torch.ones(len(kept), dtype=torch.long, device=label.device).index_add_(
            0, to, torch.ones_like(to))
        if self.weighted:
            w = self.patches[nodes % self.per_frame].to(acc)
            total *= w[first, None]
            others = others * w[rest, None]
            weight = w[first].index_add_(0, to, w[rest])
        else:
            weight = members.to(acc)
        total.index_add_(0, to, others)
        frame = kept // self.per_frame
        box = self.boxes[kept % self.per_frame]
        rows = total.div_(weight[:, None]).to(self.level_features[0].dtype)
        return Merged(self.key[kept], rows, torch.cat([frame[:, None], box], dim=1), n, members)


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
    stopping early at a count of exactly k; lam_max when even that keeps more than k (the video's floor).
    Each step is one :meth:`Quadtree.count` (masks and a label propagation; no cosine is recomputed)."""
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


def sample_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden[rows] (n, D) of one sample's hidden states (s, D): a view when ``rows`` is one ascending run
    (a video's tokens in one block, frame by frame in raster order: the usual layout), else a gather."""
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool((rows.diff() == 1).all()):
        return hidden[int(rows[0]):int(rows[0]) + len(rows)]
    return hidden[rows]


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
                x = sample_rows(ctx.hidden_states[b], rows).reshape(grid.frames, grid.height, grid.width, -1)
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
