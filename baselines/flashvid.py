"""FlashVID (Fan et al., ICLR'26; official code Fanziyang-v/FlashVID @ 1d37422: ``flashvid/utils.py``,
``flashvid/token_selection.py``, ``flashvid/llava_arch.py``, ``flashvid/modeling_qwen2.py``,
``flashvid/modeling_qwen2_5_vl.py``). Two stages.

Before the LLM (a stage at decoder layer 0, on the LLM's input embeddings x of the video: F frames
(Qwen: temporal patches) x N tokens x D; ``utils.py: flashvid_compression``):

1. DySeg. s_t = cos(mean_i x_{t,i}, mean_i x_{t+1,i}) (t = 0..F-2); a segment ends after every t with
   s_t < ``segment_threshold`` (0.9), and, while there are fewer than ``min_segments`` segments (8 on
   LLaVA, 4 on Qwen), after the remaining transitions of smallest s_t (:func:`dyseg`).
2. Per-frame budget (:func:`frame_budget`): B = ceil(N r e) (r = ``retention``, e = ``expansion`` 1.25),
   A = ceil(alpha B) tokens by ADTS, S = B - A by TSTM (OV, N = 196: r = .25 -> 62 / 44 / 18).
3. ADTS, per frame, on the segment's frames (:func:`adts_picks`): d_ij = (1 - cos(x_i, x_j)) w_j with
   w_j = 1e6 a_j (``"attn_div"``, v1) or 1e6 a_j (x_j . mu) (``"attn_div_v2"``; mu = the segment's mean
   feature), a_j the attention token j receives in the vision layer that feeds the LLM (mean over heads
   and queries, pooled like the features: :attr:`VisionMaps.attention`). Greedy max-min: the first pick
   maximises the second-smallest d_ij over i, each next one max_j min_{i in picked} d_ij (v1 excludes
   the picked; v2 does not, see below).
4. TSTM, per segment of n > 1 frames (:func:`temporal_parents`, :func:`merge_trees`): each token of
   frame t >= 1 not picked by ADTS points to its most similar unpicked token of frame t-1 (cosine, the
   features' dtype) when that cosine > ``temporal_threshold`` (0.8); if fewer than (A + S) n tokens would
   stay roots the threshold rises to the (nN - (A+S)n)-th largest similarity (the floor rule). Trees are
   folded back to front into their roots: root = (subtree sum) / denominator.
5. DPC-kNN, per frame of the segment (:func:`dpc_knn_merge`): ratio = S n / #roots; when < 1 the frame's
   n_f roots become ceil(n_f ratio) clusters (density peaks, k = min(clusters, 7), Euclidean / sqrt(D),
   rho = exp(-mean kNN d^2) + 1e-6 noise: :func:`baselines.density_peaks.density_peak_scores`), each the
   mean of its members at its centre's index.

Inside the LLM (``modeling_qwen2.py``, ``utils.py: fastv_prune``): before layer ``pruning_layer`` (20)
keep ceil(``llm_retention`` V) of the V current visual tokens (0.3) by the last token's attention in
layer ``pruning_layer`` - 1's map, head mean (:meth:`StageContext.last_token_attention`).

``retention`` is the scripts' ``retention_ratio`` r: with e = 1.25 and 30 % kept from layer 20 of 28
the MEAN visual-token count over the decoder layers is r N_vis ((20 x 1.25 r + 8 x 0.375 r) / 28 = r;
docs/methods/flashvid.md). Our choices (each next to its equation in the docs page):
- ``merge_denominator="official"`` (default) divides a root by 1 + its DIRECT children (the published
  code's count: a <- b <- c gives (a + b + c) / 2); ``"subtree"`` by its subtree size (the mean).
- v2 re-picks: without v1's guard a picked token can be picked again (only when the weights w_j are not
  all positive); the engine holds a token once, so a frame then keeps fewer than A ADTS tokens
  (``trace.repicks`` counts them).
- A single-frame segment: the official code clusters ALL N tokens of the frame (ADTS picks included,
  which can yield the same token twice); here the S clusters are made from the frame's unpicked tokens,
  as in a multi-frame segment (the count, ceil(N x S / N), is the official one).
- Positions (``positions="auto"``): LLaVA compact before the LLM (the official LLM numbers the shorter
  sequence 0..len-1), kept by the in-LLM stage (gaps); Qwen: the original M-RoPE ids.
- TSTM sums and DPC-kNN run in float32 (the official code folds in the model dtype); cosines that
  decide merges and cuts are taken in the features' dtype, as the official code.
- Cost: the official code loops over segments and frames; here each step runs on all the video's
  frames at once (:meth:`FlashVID.compress_segments`): ADTS on (F, N, N), one forest over the segments
  (cosines only between consecutive frames of a segment), one fold, DPC-kNN of every clustering frame
  padded into one batch (torch.cdist per frame, as official, and topk on each frame's own scores, so
  ties break as in the one-frame call), one noise draw (= the per-frame draws). The kept tokens and
  rows equal the per-segment, per-frame loop's (tests/test_flashvid.py; bit for bit on our CPU).
  v2's relevance is x_j . mu (the official averages x_j . m_c over the segment's frame means m_c: the
  same number up to rounding).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from baselines.density_peaks import density_peak_scores
from sharp import PruningMethod, Selection, layer_kwarg

SELECTIONS = ("attn_div_v2", "attn_div", "attn", "div")  # official TokenSelectionMethod values
MERGE_DENOMINATORS = ("official", "subtree")
ATTENTION_SCALE = 1e6  # the official cls_attention x 1e6
KNN = 7  # DPC-kNN neighbours: k = min(clusters, 7)
DENSITY_NOISE = 1e-6  # rand x 1e-6 added to the density (tie-break)
# tokens per frame (temporal patch) of the named backbones' layouts: the nominal schedule's F x B
_TOKENS_PER_FRAME = {"llava_onevision_7b": 196, "llava_video_7b": 196, "qwen2_vl_7b": 180, "qwen2_5_vl_7b": 180,
                     "qwen3_vl_8b": 180}


# -- budgets ------------------------------------------------------------------------------------------
def frame_budget(tokens_per_frame: int, retention: float, expansion: float, alpha: float) -> tuple[int, int, int]:
    """(B, A, S) per frame: B = ceil(N r e) (at most N), A = ceil(alpha B) ADTS, S = B - A TSTM tokens."""
    total = min(tokens_per_frame, math.ceil(tokens_per_frame * retention * expansion))
    adts = math.ceil(total * alpha)
    return total, adts, total - adts


# -- 1. DySeg -----------------------------------------------------------------------------------------
def transition_similarities(frame_means: torch.Tensor) -> torch.Tensor:
    """(F, D) frame-mean features -> (F-1,) cos of consecutive frames, in the features' dtype."""
    unit = frame_means / frame_means.norm(p=2, dim=-1, keepdim=True)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def dyseg(frame_means: torch.Tensor, threshold: float, min_segments: int, complementary: bool = True) -> list[int]:
    """Segment sizes (frames, in order). Cuts after every s_t < threshold; while fewer than
    ``min_segments`` segments, also after the k = min(min_segments - #segments, F-1) smallest remaining
    s_t (the official ``additional_segment``: the cut ones count as 1.0 there)."""
    frames = frame_means.shape[0]
    if frames < 2:
        return [frames]
    similarity = transition_similarities(frame_means)
    below = similarity < threshold
    cuts = set(below.nonzero().squeeze(1).tolist())
    if complementary and len(cuts) + 1 < min_segments:
        k = min(min_segments - len(cuts) - 1, frames - 1)
        rest = similarity.float().masked_fill(below, 1.0)
        cuts |= set(torch.argsort(rest, stable=True)[:k].tolist())
    ends = sorted(cuts) + [frames - 1]
    sizes, previous = [], -1
    for end in ends:
        if end > previous:
            sizes.append(end - previous)
        previous = end
    return sizes


# -- segments -----------------------------------------------------------------------------------------
# Every step below runs on all the frames of a video at once (batched over frames, not a Python loop
# over segments or frames); ``sizes`` (DySeg's segment sizes, frames in order) says where each segment
# ends, None: the frames are one segment.
def segment_index(sizes: list[int], device=None) -> torch.Tensor:
    """(F,) long: the segment of each frame."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def later_frames(sizes: list[int]) -> list[int]:
    """The frames that have a previous frame in their segment (all but each segment's first)."""
    firsts = {0, *itertools.accumulate(sizes[:-1])}
    return [t for t in range(sum(sizes)) if t not in firsts]


def segment_means(frame_means: torch.Tensor, sizes: Optional[list[int]] = None) -> torch.Tensor:
    """mu of each frame: (F, D) frame means -> (F, D) the mean of its segment's frame means."""
    if sizes is None:
        return frame_means.mean(dim=0, keepdim=True).expand_as(frame_means)
    segment = segment_index(sizes, frame_means.device)
    sums = frame_means.new_zeros(len(sizes), frame_means.shape[-1]).index_add_(0, segment, frame_means)
    counts = torch.tensor(sizes, dtype=frame_means.dtype, device=frame_means.device)
    return (sums / counts[:, None])[segment]


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dimension, in x's dtype."""
    return x / x.norm(p=2, dim=-1, keepdim=True)


# -- 2. ADTS ------------------------------------------------------------------------------------------
def cosine_distances(x: torch.Tensor, unit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(F, N, D) float32 -> (F, N, N) 1 - cos(x_i, x_j) (``unit``: x's unit vectors, if at hand)."""
    unit = unit_vectors(x) if unit is None else unit
    return 1.0 - torch.bmm(unit, unit.transpose(1, 2))


def weighted_distances(x: torch.Tensor, attention: Optional[torch.Tensor], kind: str,
                       sizes: Optional[list[int]] = None, unit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d_ij (F, N, N) float32 of each frame: (1 - cos) w_j; w_j = 1e6 a_j (v1), 1e6 a_j (x_j . mu) (v2;
    mu = the frame's segment mean, the mean of its frames' mean features: :func:`segment_means`), 1 (div).
    The official v2 takes mean_c (x_j . m_c) over the segment's frame means m_c (token_selection.py
    L104): the same number, here one dot product per token. ``unit``: x's float32 unit vectors."""
    x = x.float()
    dist = cosine_distances(x, unit)
    if kind == "div":
        return dist
    dist = dist * (attention.float() * ATTENTION_SCALE)[:, None, :]
    if kind == "attn_div_v2":
        mu = segment_means(x.mean(dim=1), sizes)
        relevance = torch.bmm(x, mu[:, :, None]).squeeze(-1)  # x_j . mu, (F, N)
        dist = dist * relevance[:, None, :]
    return dist


def max_min_greedy(dist: torch.Tensor, k: int, exclude_picked: bool) -> torch.Tensor:
    """Greedy max-min picks of each frame, in pick order: (F, N, N) d_ij -> (F, k) long.

    first = argmax_j (second-smallest d_ij over i); then argmax_j min_{i picked} d_ij, the picked set to
    -1 first when ``exclude_picked`` (v1, div). argmax takes the first maximum. All frames step
    together: k steps of (F, N) operations."""
    frames, n, _ = dist.shape
    picks = torch.zeros(frames, k, dtype=torch.long, device=dist.device)
    if k == 0:
        return picks
    second = torch.topk(dist, min(2, n), dim=1, largest=False).values[:, -1, :]  # (F, N)
    picks[:, 0] = second.argmax(dim=-1)
    rows = torch.arange(frames, device=dist.device)
    closest = dist[rows, picks[:, 0]]  # (F, N): min over the picked rows i of d_ij
    for i in range(1, k):
        candidate = closest.scatter(1, picks[:, :i], -1.0) if exclude_picked else closest
        picks[:, i] = candidate.argmax(dim=-1)
        closest = torch.minimum(closest, dist[rows, picks[:, i]])
    return picks


def adts_picks(x: torch.Tensor, attention: Optional[torch.Tensor], k: int, kind: str,
               sizes: Optional[list[int]] = None, unit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ADTS on every frame: x (F, N, D), attention (F, N), segment sizes (v2's mu) -> (F, k) picked
    token indices, ascending per frame (v2 may repeat one). ``"attn"``: the k largest a_j."""
    if kind == "attn":
        return torch.topk(attention, k, dim=-1).indices.sort(dim=-1).values
    dist = weighted_distances(x, attention, kind, sizes, unit)
    return max_min_greedy(dist, k, exclude_picked=kind != "attn_div_v2").sort(dim=-1).values


# -- 3. TSTM ------------------------------------------------------------------------------------------
def forest_parents(x: torch.Tensor, picked: torch.Tensor, sizes: list[int], threshold: float,
                   floors: list[int], unit: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[float]]:
    """The merge forests of consecutive segments: x (F, N, D) in the features' dtype (``unit``: its unit
    vectors, if at hand), picked (F, N) bool (ADTS), ``floors`` the (A+S) n of each segment.

    m_t(j) = max_m cos(x_{t,j}, x_{t-1,m}) over unpicked m (-1 for picked j and for a segment's first
    frame, whose cosines are not computed); token (t, j) merges into (t-1, argmax) when m_t(j) >
    threshold, or, when fewer than the segment's floor tokens would stay roots, > the (nN - floor)-th
    largest m_t(j) of the segment (at least -1 + 1e-6). Returns (parent (F, N) long: index in frame t-1,
    -1 for a root; the threshold each segment used)."""
    frames, tokens, _ = x.shape
    best = x.new_full((frames, tokens), -1.0)
    arg = torch.full((frames, tokens), -1, dtype=torch.long, device=x.device)
    later = later_frames(sizes)
    if later:
        unit = unit_vectors(x) if unit is None else unit
        if len(later) == frames - 1:
            now, before = slice(1, None), slice(None, -1)
            current, previous = unit[now], unit[before]
        else:
            now = torch.tensor(later, device=x.device)
            before = now - 1
            current, previous = unit.index_select(0, now), unit.index_select(0, before)
        sim = torch.einsum("tnd,tmd->tnm", current, previous)  # frame t's j vs frame t-1's m
        sim = sim.masked_fill(picked[now][:, :, None], -1.0).masked_fill(picked[before][:, None, :], -1.0)
        best[now], arg[now] = sim.max(dim=-1)
    merged = best > threshold
    roots = (~merged).sum(dim=1).tolist()
    used, start = [], 0
    for n, floor in zip(sizes, floors):
        used.append(threshold)
        if sum(roots[start:start + n]) < floor:  # the floor rule, on this segment's m_t(j)
            seg = slice(start, start + n)
            soft = torch.topk(best[seg].flatten(), n * tokens - floor).values[-1]
            used[-1] = max(float(soft), -1.0 + 1e-6)
            merged[seg] = best[seg] > (soft if float(soft) >= used[-1] else used[-1])
        start += n
    return torch.where(merged, arg, torch.full_like(arg, -1)), used


def temporal_parents(x: torch.Tensor, picked: torch.Tensor, threshold: float, floor: int
                     ) -> tuple[torch.Tensor, float]:
    """:func:`forest_parents` of one segment x (n, N, D): (parent (n, N), the threshold used)."""
    parent, used = forest_parents(x, picked, [x.shape[0]], threshold, [floor])
    return parent, used[0]


def merge_trees(x: torch.Tensor, parent: torch.Tensor, denominator: str = "official") -> torch.Tensor:
    """Fold each tree into its root, back to front: x (F, N, D), parent (F, N) (one segment or several:
    a segment's first frame has no parent) -> (F, N, D) float32 rows, meaningful at the roots: sum of
    the root's subtree / (1 + #direct children) (``"official"``) or / subtree size (``"subtree"``).
    Only frames that have children are folded (one index_add each, the official order); where nothing
    merged the rows are x as float32 (x itself when it is float32: do not write into them)."""
    rows = x.float()
    child = parent >= 0
    folding = (child[1:].any(dim=1).nonzero().squeeze(1) + 1).tolist()  # frames t with children in t-1
    if not folding:
        return rows
    rows = rows.clone()
    sizes = torch.ones(parent.shape, dtype=torch.float32, device=x.device)
    for t in reversed(folding):
        into = parent[t][child[t]]
        rows[t - 1].index_add_(0, into, rows[t][child[t]])
        sizes[t - 1].index_add_(0, into, sizes[t][child[t]])
    if denominator == "official":
        frames, tokens = parent.shape
        into = (torch.arange(frames, device=x.device)[:, None] - 1) * tokens + parent  # flat (t-1, parent)
        sizes = 1.0 + torch.bincount(into[child], minlength=frames * tokens).to(torch.float32).view(frames, tokens)
    parents = torch.tensor(folding, device=x.device) - 1  # the frames whose roots grew (others: / 1)
    rows[parents] = rows[parents] / sizes[parents][..., None]
    return rows


# -- 4. DPC-kNN ---------------------------------------------------------------------------------------
def set_distances(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """torch.cdist of each set of x (G, M, D) (its first counts[g] rows) on its own -> (G, M, M), the
    padding 0: the official one call per frame. (Beyond 25 rows torch.cdist takes the matrix-product
    formula, whose diagonal keeps a rounding residue that the k = 1 density reads; a batched call on
    the CPU is also slower than the per-set calls.)"""
    groups, m, _ = x.shape
    dist = x.new_zeros(groups, m, m)
    for g, count in enumerate(counts):
        dist[g, :count, :count] = torch.cdist(x[g, :count], x[g, :count])
    return dist


def _same(keys: list) -> dict:
    """{key: the positions holding it}, keys in order of first appearance."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def dpc_knn_sets(x: torch.Tensor, counts: list[int], clusters: list[int], noise: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-kNN of G token sets at once. x (G, M, D): set g is its first ``counts[g]`` rows (the rest is
    padding), to become ``clusters[g]`` (< counts[g]) clusters (k = min(clusters, 7)); noise (G, M) its
    density tie-break. Distances Euclidean / sqrt(D) (:func:`set_distances`); each set's score is the
    shared :func:`~baselines.density_peaks.density_peak_scores` (padding: as far as the set's farthest
    pair, never denser, never a centre), its centres the top ``clusters[g]`` scores (topk on the set's
    own scores: the order of ties is that of the one-set call); every token joins its nearest centre (a
    centre itself), a cluster is the mean of its members.

    Returns (centres (G, C) long: the centres' rows in score order, C = max clusters; valid (G, C)
    bool: slot c < clusters[g]; rows (G, C, D) float32: each cluster's mean)."""
    x = x.float()
    groups, m, dim = x.shape
    device = x.device
    member = torch.arange(m, device=device) < torch.tensor(counts, device=device)[:, None]  # (G, M)
    pair = member[:, :, None] & member[:, None, :]
    dist = set_distances(x, counts) / math.sqrt(dim)
    farthest = dist.flatten(1).max(dim=1).values  # (G,): the padding's 0 is never above
    dist = torch.where(pair, dist, farthest[:, None, None])
    noise = noise.masked_fill(~member, float("-inf"))
    score = torch.empty(groups, m, device=device)
    for k, sets in _same([min(c, KNN) for c in clusters]).items():
        rows = torch.tensor(sets, device=device) if len(sets) < groups else slice(None)
        score[rows] = density_peak_scores(dist[rows], k, noise[rows])
    width = max(clusters)
    centres = torch.zeros(groups, width, dtype=torch.long, device=device)  # (G, C): score order
    for (count, c), sets in _same(list(zip(counts, clusters))).items():
        rows = torch.tensor(sets, device=device) if len(sets) < groups else slice(None)
        centres[rows, :c] = torch.topk(score[rows, :count], c, dim=1).indices
    valid = torch.arange(width, device=device) < torch.tensor(clusters, device=device)[:, None]
    to_centre = dist.gather(2, centres[:, None, :].expand(groups, m, width))  # (G, M, C)
    assign = to_centre.masked_fill(~valid[:, None, :], float("inf")).argmin(dim=2)  # (G, M): slot
    sets, slots = valid.nonzero(as_tuple=True)
    assign[sets, centres[sets, slots]] = slots
    bins = groups * width  # one bin per (set, slot); the padding goes to one more, dropped
    cluster = (torch.arange(groups, device=device)[:, None] * width + assign).masked_fill(~member, bins).flatten()
    sums = x.new_zeros(bins + 1, dim).index_add_(0, cluster, x.flatten(0, 1))[:bins]
    sizes = torch.bincount(cluster, minlength=bins + 1)[:bins].clamp(min=1).to(x.dtype)
    return centres, valid, (sums / sizes[:, None]).view(groups, width, dim)


def dpc_knn_merge(x: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dpc_knn_sets` of one set x (m, D), noise (m,) -> (centres (c,) ascending, rows (c, D)
    float32)."""
    centres, _, rows = dpc_knn_sets(x[None], [x.shape[0]], [clusters], noise[None])
    order = torch.argsort(centres[0])
    return centres[0][order], rows[0][order]


def cluster_counts(roots: list[int], sizes: list[int], tstm: int, tokens_per_frame: int) -> list[int]:
    """Clusters of each frame's TSTM roots (``segment_compression`` L139-157): ratio = S n / #roots of
    the segment, ceil(n_f ratio) per frame (a single-frame segment: the official ratio S / N, at most
    its n_f roots); 0 where the frame's roots all stay (ratio >= 1, or no fewer clusters than roots)."""
    out, start = [], 0
    for n in sizes:
        frame_roots = roots[start:start + n]
        if n > 1:
            ratio = (tstm * n) / max(1, sum(frame_roots))
            wanted = [math.ceil(r * ratio) for r in frame_roots]
        else:  # the official ratio S / N over the whole frame; the pool here: its unpicked tokens
            ratio = tstm / tokens_per_frame
            wanted = [min(math.ceil(tokens_per_frame * ratio), frame_roots[0])]
        out += [c if ratio < 1.0 and 0 < c < r else 0 for c, r in zip(wanted, frame_roots)]
        start += n
    return out


@dataclass
class VideoResult:
    """FlashVID before the LLM on one video (frame-major local indices t N + j, ascending).

    keep: (k,) kept; rows: (k, D) float32 their rows; picked: the ADTS tokens; segments: frames per
    segment; thresholds: the TSTM threshold each multi-frame segment used; repicks: v2 re-picks."""

    keep: torch.Tensor
    rows: torch.Tensor
    picked: torch.Tensor
    segments: list[int]
    thresholds: list[float]
    repicks: int


@dataclass
class FlashVID(PruningMethod):
    """FlashVID with the official scripts' defaults (scripts/llava_ov.sh; Qwen values in the yaml)."""

    name = "flashvid"
    official_positions = "compact"  # the official LLM sees the compressed sequence (auto: on 1-D RoPE)
    identity_at_full_retention: ClassVar[bool] = False  # r = 1 keeps every token before the LLM, 30 % from layer 20
    input_dependent_schedule: ClassVar[bool] = True  # the segments, TSTM roots and cluster ceilings
    expansion: float = 1.25  # e: pre-LLM budget B = ceil(N r e) per frame
    alpha: float = 0.7  # ADTS share of B: A = ceil(alpha B)
    token_selection: str = "attn_div_v2"  # "attn_div_v2" (LLaVA script) | "attn_div" (Qwen) | "attn" | "div"
    temporal_threshold: float = 0.8  # TSTM cosine threshold
    do_segment: bool = True  # DySeg; False: the whole video is one segment
    segment_threshold: float = 0.9  # DySeg: cut where consecutive frame means have cos below this
    min_segments: int = 8  # DySeg minimum (LLaVA 8, Qwen 4)
    complementary_segment: bool = True  # DySeg: add cuts up to min_segments
    merge_denominator: str = "official"  # "official": 1 + direct children | "subtree": the mean
    # the in-LLM stage runs before this layer (the official 20 of 28); None: no in-LLM stage
    pruning_layer: Optional[int] = layer_kwarg(20, scaling="relative")  # noqa: UP045
    llm_retention: float = 0.3  # kept share of the current visual tokens at pruning_layer (ceil)
    seed: int = 0  # DPC-kNN density tie-break generator (per sample; the official draw is unseeded)

    def __post_init__(self):
        super().__post_init__()
        for key, valid in (("token_selection", SELECTIONS), ("merge_denominator", MERGE_DENOMINATORS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"flashvid: {key} must be one of {', '.join(map(repr, valid))}, "
                                 f"got {getattr(self, key)!r}")
        if not self.expansion > 0:
            raise ValueError(f"flashvid: expansion must be > 0 (official 1.25), got {self.expansion!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"flashvid: alpha must be in [0, 1] (official 0.7), got {self.alpha!r}")
        for key in ("temporal_threshold", "segment_threshold"):
            if not -1.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"flashvid: {key} must be a cosine in [-1, 1], got {getattr(self, key)!r}")
        if self.min_segments < 1:
            raise ValueError(f"flashvid: min_segments must be >= 1 (official 8 LLaVA, 4 Qwen), "
                             f"got {self.min_segments!r}")
        if not 0.0 < self.llm_retention <= 1.0:
            raise ValueError(f"flashvid: llm_retention must be in (0, 1] (official 0.3), got {self.llm_retention!r}")
        if self.pruning_layer is not None and self.pruning_layer < 1:
            raise ValueError(f"flashvid: pruning_layer must be >= 1 (it ranks with layer pruning_layer-1's map) "
                             f"or None, got {self.pruning_layer!r}")

    def compacts_at(self, layer: int) -> bool:
        """Only the pre-LLM stage re-numbers (the official LLM numbers the compressed sequence); the
        in-LLM stage keeps the kept tokens' ids (``fastv_prune`` gathers position_ids)."""
        return self.positions == "compact" and layer == 0

    # -- where ----------------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        if self.pruning_layer is None:
            return [0]
        if not 1 <= self.pruning_layer < num_layers:
            raise ValueError(f"flashvid: pruning_layer must be in 1..{num_layers - 1} (it ranks with layer "
                             f"pruning_layer-1's map) or None (no in-LLM stage), got {self.pruning_layer}")
        return [0, self.pruning_layer]

    def score_layers(self, num_layers: int) -> list[int]:
        return [] if self.pruning_layer is None else [self.pruning_layer - 1]

    def vision_layers(self) -> list[str]:
        return ["feature"]  # the official a_j: the last SigLIP layer LLaVA keeps; Qwen: the last ViT block

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL counts (the trace has the measured ones): F x B before the LLM (F x ceil(N r e) with N
        the tokens per frame of the named backbone's layout; min(N_vis, ceil(N_vis r e)) for an unknown
        one), then ceil(llm_retention x that) from ``pruning_layer``."""
        stages = self.stages(num_layers)
        before = self.nominal_before_llm(n_visual, backbone)
        after = self.llm_count(before)
        return [after if len(stages) > 1 and layer >= stages[1] else before for layer in range(num_layers)]

    def nominal_before_llm(self, n_visual: int, backbone=None) -> int:
        per_frame = _TOKENS_PER_FRAME.get(backbone if isinstance(backbone, str) else getattr(backbone, "name", None))
        if per_frame and n_visual % per_frame == 0:
            return (n_visual // per_frame) * frame_budget(per_frame, self.retention, self.expansion, self.alpha)[0]
        return min(n_visual, math.ceil(n_visual * self.retention * self.expansion))

    def llm_count(self, n_current: int) -> int:
        """Kept at ``pruning_layer``: ceil(llm_retention x V) (official ``fastv_prune``), at least 1."""
        return max(1, min(n_current, math.ceil(n_current * self.llm_retention)))

    # -- the stages -----------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        with ctx.timed("flashvid_outer" if ctx.layer_idx == 0 else "flashvid_inner"):
            return self.select_before_llm(ctx) if ctx.layer_idx == 0 else self.select_in_llm(ctx)

    def select_before_llm(self, ctx) -> Selection:
        frames, per_frame = ctx.layout.frames, ctx.layout.tokens_per_frame
        budget_f = frame_budget(per_frame, self.retention, self.expansion, self.alpha)
        t = ctx.trace
        t.frame_budget = budget_f
        if budget_f[0] >= per_frame:  # every frame keeps all its tokens (TSTM's floor allows no merge)
            t.kept_before_llm = list(ctx.visual_counts)
            return Selection.unchanged()
        attention = ctx.vision("feature").attention if self.token_selection != "div" else None
        hidden = ctx.hidden_states.clone()
        results, indices = [], []
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            if len(tokens) != frames * per_frame:
                raise ValueError(f"flashvid: the pre-LLM stage needs every visual token of the video "
                                 f"({frames} x {per_frame}), sample {b} has {len(tokens)}: compose flashvid first")
            x = ctx.hidden_states[b].index_select(0, tokens.positions).reshape(frames, per_frame, -1)
            a = None if attention is None else attention[b, tokens.index].to(x.device).reshape(frames, per_frame)
            res = self.compress_video(x, a, budget_f, torch.Generator().manual_seed(self.seed))
            hidden[b, tokens.positions[res.keep]] = res.rows.to(hidden.dtype)
            results.append(res)
            indices.append(tokens.index)
        t.segments = [r.segments for r in results]
        t.tstm_thresholds = [r.thresholds for r in results]
        t.repicks = [r.repicks for r in results]
        t.adts = [index[r.picked].cpu() for index, r in zip(indices, results)]
        t.kept_before_llm = [len(r.keep) for r in results]
        return Selection(keep_visual=[r.keep for r in results], hidden_states=hidden)

    def compress_video(self, x: torch.Tensor, attention: Optional[torch.Tensor], budget_f: tuple[int, int, int],
                       generator: torch.Generator) -> VideoResult:
        """``flashvid_compression`` on one video: x (F, N, D) input embeddings, attention (F, N) a_j."""
        sizes = (dyseg(x.mean(dim=1), self.segment_threshold, self.min_segments, self.complementary_segment)
                 if self.do_segment else [x.shape[0]])
        return self.compress_segments(x, attention, sizes, budget_f, generator)

    def compress_segment(self, x: torch.Tensor, attention: Optional[torch.Tensor], budget_f: tuple[int, int, int],
                         generator: torch.Generator):
        """``segment_compression`` of one segment x (n, N, D). Returns (kept local indices, rows float32,
        ADTS indices, TSTM threshold used or None, v2 re-picks)."""
        res = self.compress_segments(x, attention, [x.shape[0]], budget_f, generator)
        return res.keep, res.rows, res.picked, (res.thresholds or [None])[0], res.repicks

    def compress_segments(self, x: torch.Tensor, attention: Optional[torch.Tensor], sizes: list[int],
                          budget_f: tuple[int, int, int], generator: torch.Generator) -> VideoResult:
        """``segment_compression`` of every segment (``sizes`` frames each) of x (F, N, D), all at once:
        ADTS of every frame, the TSTM forests and folds of every segment, then DPC-kNN of every frame that
        clusters (in frame order: the tie-break draws are the official loop's)."""
        frames, per_frame, _ = x.shape
        _, adts, tstm = budget_f
        shared = adts > 0 and self.token_selection != "attn" and x.dtype == torch.float32
        unit = unit_vectors(x) if shared else None  # ADTS's (float32) = TSTM's (features' dtype) unit vectors
        picked = torch.zeros(frames, per_frame, dtype=torch.bool, device=x.device)
        repicks = 0
        if adts > 0:
            picks = adts_picks(x, attention, adts, self.token_selection, sizes, unit)
            picked.scatter_(1, picks, True)
            repicks = frames * adts - int(picked.sum())
        kept, rows, thresholds, centres = picked, x.float(), [], None
        if tstm > 0:
            floors = [(adts + tstm) * n for n in sizes]
            parent, used = forest_parents(x, picked, sizes, self.temporal_threshold, floors, unit)
            thresholds = [u for u, n in zip(used, sizes) if n > 1]
            rows = merge_trees(x, parent, self.merge_denominator)
            roots = (parent < 0) & ~picked
            kept = picked | roots
            clusters = cluster_counts(roots.sum(dim=1).tolist(), sizes, tstm, per_frame)
            if any(clusters):
                clustered, centres, means = self.cluster_roots(rows, roots, clusters, generator)
                kept[clustered] = picked[clustered]
                kept.view(-1)[centres] = True
        keep = kept.flatten().nonzero().squeeze(1)
        out = rows.flatten(0, 1).index_select(0, keep)
        if centres is not None:
            out[torch.searchsorted(keep, centres)] = means
        return VideoResult(keep, out, picked.flatten().nonzero().squeeze(1), sizes, thresholds, repicks)

    @staticmethod
    def cluster_roots(rows: torch.Tensor, roots: torch.Tensor, clusters: list[int], generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DPC-kNN of the roots (F, N) of every frame f with clusters[f] > 0, their rows (F, N, D) padded
        into one (G, M, D) batch. The tie-break noise is torch.rand(n_f) x 1e-6 per frame in frame
        order (drawn at once: the same numbers). Returns (the clustered frames (G,), their centres'
        indices t N + j (c,), the centres' rows (c, D): their cluster means)."""
        frames = [f for f, c in enumerate(clusters) if c > 0]
        frame_t = torch.tensor(frames, device=rows.device)
        pool = roots[frame_t]  # (G, N)
        counts = pool.sum(dim=1).tolist()
        sets, tokens = pool.nonzero(as_tuple=True)  # frame order, ascending tokens
        per_set = pool.sum(dim=1)
        slots = torch.arange(len(sets), device=rows.device) - (per_set.cumsum(0) - per_set)[sets]
        flat = torch.zeros(len(frames), max(counts), dtype=torch.long, device=rows.device)  # (G, M): t N + j
        flat[sets, slots] = frame_t[sets] * roots.shape[1] + tokens  # the padding: row 0 (ignored)
        members = rows.flatten(0, 1).index_select(0, flat.flatten()).view(*flat.shape, rows.shape[-1])
        noise = rows.new_zeros(flat.shape)
        noise[sets, slots] = torch.rand(len(sets), generator=generator).to(rows.device) * DENSITY_NOISE
        centres, valid, means = dpc_knn_sets(members, counts, [clusters[f] for f in frames], noise)
        return frame_t, flat.gather(1, centres)[valid], means[valid]

    def select_in_llm(self, ctx) -> Selection:
        """``fastv_prune``: the top ceil(llm_retention V) current visual tokens by the last token's
        attention in layer pruning_layer - 1's map (head mean), per sample."""
        scores = ctx.last_token_attention(layer=self.pruning_layer - 1)  # (b, s)
        keep = []
        for b, n in enumerate(ctx.visual_counts):
            visual = scores[b, ctx.visual_positions(b)].float()
            keep.append(torch.topk(visual, self.llm_count(n)).indices.sort().values)
        ctx.trace.kept_in_llm = [len(k) for k in keep]
        return Selection(keep_visual=keep)
