"""HoliTom (Shao et al., NeurIPS'25; official code cokeshao/HoliTom, ``holitom/llava_arch.py`` and
``holitom/modeling_qwen2.py``). ``holitom_sharp`` (HoliTom before the LLM, ShaRP inside it) is a composition
declared in ``configs/method/holitom_sharp.yaml``.

Before the LLM (a stage at layer 0, on the LLM's input embeddings x of the video: projected and
pooled, F frames x n tokens x d; Qwen2-VL: F temporal patches):

1. Temporal segmentation. s_t(p) = cos(x_t(p), x_{t+1}(p)) for consecutive frames, (F-1, n). A
   window [a, e] is static at position p when s_t(p) > tau for every t in a..e-1; it removes
   c(a, e) = (e - a) x #static positions (its static tokens are averaged over the window). A
   dynamic program over the frames (windows of at most ``max_window`` frames) picks the
   segmentation maximising sum c(a, e) (:func:`segment_windows`); R = that maximum.
2. Retain ratio rescaled for what static merging removed: r' = min(r / ((N - R) / N), 1)
   (N = F n, r = ``retention``).
3. Per window: each frame's dynamic tokens keep the top ceil(n_dyn r') by the attention they
   receive in the vision layer that feeds the LLM (mean over heads and all queries, pooled as the
   model pools features; :attr:`VisionMaps.attention`). The window's static tokens (the averages)
   are clustered by DPC-kNN (:func:`dpc_knn_centres`, k = min(``knn_k``, clusters)) into
   round(n_static r') centres, each merged as beta x centre + (1 - beta) x mean(assigned)
   (:func:`merge_into_centres`, beta = 0.6).

Inside the LLM (a stage at layer ``llm_layer`` = 18), on the official image span (the current visual
tokens, plus LLaVA-OV's trailing image_newline with ``llm_newline``; L tokens): keep the top
round(``llm_keep`` x L) by the last token's attention in layer 17's map (``ctx.last_token_attention(17)``,
no N x N matrix), and merge every other span token into its most similar kept one (cosine of the
layer's input) SEQUENTIALLY in index order: kept <- (kept + dropped) / 2 (:func:`sequential_merge`).

Our choices (docs/methods/holitom.md has each next to its equation):
- Token order: the engine keeps tokens' slots in sequence order. A window's static tokens take the
  slots of their cells in the window's FIRST frame (a static cell has no dynamic token there), dynamic
  tokens their own cells. With compact positions (the slot order is the LLM's order) the rows are
  written into the window's slots in the official order [window's static tokens, then its dynamic
  tokens frame by frame] (``plan_sample(official_order=True)``; ``trace.content``); with original
  positions each slot carries its own token.
- Budgets (``rounding``): ``"exact"`` (default) keeps exactly budget(N, r) = round(r N) tokens
  before the LLM (at most N - R), dividing them among the groups (each window's static set, each
  frame's dynamic set) in proportion to their sizes (cumulative rounding); ``"official"``: ceil per frame and
  round per static set as the official code (a few tokens more, e.g. 960 instead of 941 at 15%).
  Inside the LLM: round(llm_keep x L) of the span per sample, the official count. OV's newline is
  ranked and merged like a span token, but the engine cannot remove a text row: a newline outside
  the top-k is merged into its target and still stays in the sequence (one token more than official).
- The DPC-kNN density tie-break rand x 1e-6 uses a generator seeded with ``seed`` per sample.
- Averages, distances and merges in float32, cast back to the model dtype.
- Positions: ``"compact"`` (default): the official LLM sees the shorter sequence numbered 0..len-1,
  so the pre-LLM stage re-numbers; the in-LLM stage keeps the kept tokens' positions, as the
  official code (``compacts_at``: layer 0 only); holitom_sharp's ShaRP stage keeps them too.
  Qwen2-VL's M-RoPE has no 1-D re-numbering: pass ``positions="original"`` there.
- Qwen2-VL (not supported by the official code): frames are temporal patches (2 frames each), the
  vision attention is the last block's, per temporal patch, averaged over the 2x2 merger groups.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from baselines.density_peaks import density_peak_scores
from sharp import BackboneFacts, PruningMethod, Selection, budget, layer_kwarg, split_budget

ROUNDINGS = ("exact", "official")
CLUSTER_MERGES = ("beta", "mean")
PAPER_TAU = 0.80  # T at 15 / 20 / 25 %
PAPER_TAU_LOW = 0.65  # T at 10 % and below
TIE_BREAK = 1e-6  # DPC density noise: density + rand x 1e-6
# tokens per frame (temporal patch) of the named backbones' layouts: the official rounding's nominal schedule
_TOKENS_PER_FRAME = {"llava_onevision_7b": 196, "qwen2_vl_7b": 180, "tiny_llava_onevision": 16, "tiny_qwen2_vl": 16}


# -- 1. temporal segmentation ------------------------------------------------------------------
def consecutive_similarity(x: torch.Tensor) -> torch.Tensor:
    """s_t(p) = cos(x_t(p), x_{t+1}(p)): (F, n, d) -> (F-1, n) float32, as the official
    ``F.normalize(x, dim=-1)`` then ``(x[:-1] * x[1:]).sum(-1)``.

    On the CPU (n > 1) frame by frame in two (n, d) buffers that stay in cache: the same float
    operations on every element and every row (the norms of the whole video; each frame divided by its
    norms, times the next frame's, summed over d), ~40 % less time than whole-video temporaries;
    elsewhere (an accelerator: one launch per operation) on the whole video."""
    x = x.float()
    frames, n, d = x.shape
    if x.device.type != "cpu" or n < 2:  # (n = 1: torch may split a one-output sum over threads)
        unit = torch.nn.functional.normalize(x, dim=-1)
        return (unit[:-1] * unit[1:]).sum(dim=-1)
    norms = x.norm(2.0, -1, keepdim=True).clamp_min(1e-12)  # (F, n, 1) F.normalize's denominator
    out = x.new_empty(frames - 1, n)
    unit, after = torch.div(x[0], norms[0]), x.new_empty(n, d)
    for t in range(frames - 1):
        torch.div(x[t + 1], norms[t + 1], out=after)
        unit *= after  # the product (frame t's unit rows are not needed again)
        torch.sum(unit, dim=-1, out=out[t])
        unit, after = after, unit
    return out


def nonstatic_steps(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """g[i, p] = #{t < i : not s_t(p) > tau}, the non-static steps before frame i: (F-1, n) -> (F, n)
    long. A window [a, e] is static at p iff g[e, p] == g[a, p] (no non-static step between its frames)."""
    g = torch.zeros(similarity.shape[0] + 1, similarity.shape[1], dtype=torch.long, device=similarity.device)
    torch.cumsum(~(similarity > tau), dim=0, out=g[1:])
    return g


_COMPARISONS = 1 << 22  # (a, e, p) triples compared at once by static_counts (memory bound for long videos)


def static_counts(g: torch.Tensor) -> list[list[float]]:
    """c[a][e] = (e - a) x #{p : g[a, p] == g[e, p]} (0 for e <= a), from :func:`nonstatic_steps`
    g (F, n): the tokens the window [a, e] removes by averaging its static positions (F x F nested list)."""
    frames, n = g.shape
    step = max(1, _COMPARISONS // max(1, frames * n))
    static = torch.cat([(g[a:a + step, None] == g).sum(dim=2) for a in range(0, frames, step)])  # (F, F)
    frame = torch.arange(frames, device=g.device)
    return ((frame[None, :] - frame[:, None]).clamp_min(0) * static).double().tolist()


def best_segmentation(counts: list[list[float]], max_window: int = 1024) -> tuple[list[tuple[int, int]], float]:
    """The segmentation of the frames into windows [a, e] maximising sum c(a, e) (the official DP),
    c = ``counts`` (:func:`static_counts`).

    best[i] = max(best[i-1] (frame i alone), max_{w=2..min(i+1, max_window)} best[i-w] + c(i-w+1, i));
    a strictly larger value replaces the current best (ties keep the earlier option: the single
    frame, then the shorter window). Returns (windows in time order, the maximum R, a float).
    """
    frames = len(counts)
    by_end = list(zip(*counts))  # by_end[i][a] = c(a, i)
    before = [0.0] * (frames + 1)  # before[a] = best[a - 1], 0 before frame 0
    start = list(range(frames))  # each frame alone, unless a window does better
    for i in range(frames):
        low = i + 1 - max_window if i + 1 > max_window else 0  # windows [a, i] of 2..max_window frames
        candidates = list(map(operator.add, before[low:i], by_end[i][low:i]))  # [a - low]: best[a - 1] + c(a, i)
        window = max(candidates, default=before[i])
        if window > before[i]:  # the shortest (the last a) of the best windows: the official loop tries it first
            start[i] = i - 1 - candidates[::-1].index(window)
            before[i + 1] = window
        else:
            before[i + 1] = before[i]
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], before[-1]


def segment_windows(similarity: torch.Tensor, tau: float, max_window: int = 1024
                    ) -> tuple[list[tuple[int, int]], float]:
    """:func:`best_segmentation` of the similarities (F-1, n) at threshold tau: (windows, R)."""
    return best_segmentation(static_counts(nonstatic_steps(similarity, tau)), max_window)


def static_mask(similarity: torch.Tensor, window: tuple[int, int], tau: float) -> torch.Tensor:
    """(n,) bool: the positions static over the whole window (all its consecutive similarities > tau)."""
    a, e = window
    if e == a:
        return torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    return (similarity[a:e] > tau).all(dim=0)


def frame_windows(windows: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Per frame, the first and the last frame of its window (windows covering the frames in order)."""
    return ([f for a, e in windows for f in [a] * (e - a + 1)],
            [f for a, e in windows for f in [e] * (e - a + 1)])


def frame_static_masks(g: torch.Tensor, first: list[int], last: list[int]) -> torch.Tensor:
    """(F, n) bool: row f is :func:`static_mask` of frame f's window [first[f], last[f]]
    (:func:`frame_windows`), from :func:`nonstatic_steps` g (F, n): [a, e] is static at p iff
    e > a and g[e, p] == g[a, p]."""
    first, last = torch.tensor([first, last], device=g.device)
    return (g[last] == g[first]) & (last > first)[:, None]


def rescaled_ratio(retention: float, total: int, reduced: float) -> float:
    """r' = min(r / ((N - R) / N), 1): the ratio applied to the tokens left after static merging."""
    left = total - reduced
    return 1.0 if left <= 0 else min(retention * total / left, 1.0)


# -- 3. budgets per group -------------------------------------------------------------------------
def group_quotas(sizes: list[int], kinds: list[str], ratio: float, total: int, rounding: str) -> list[int]:
    """Kept tokens per group (a window's static set, or one frame's dynamic set).

    ``"official"``: ceil(n_g r') for dynamic sets, round(n_g r') for static sets (Python's round).
    ``"exact"``: ``total`` tokens in proportion to the group sizes (n_g r' with one r'), by cumulative
    rounding (:func:`sharp.split_budget`): k_g = floor(total C_g / C) - floor(total C_{g-1} / C)
    with C_g = n_1 + ... + n_g and C = C_last, in integers: within one token of total n_g / C, the extra tokens spread evenly over
    the video, never more than n_g (total <= C).
    """
    if rounding == "official":
        return [min(n, math.ceil(n * ratio) if kind == "dynamic" else round(n * ratio))
                for n, kind in zip(sizes, kinds)]
    return split_budget(total, sizes)


def budget_groups(first: list[int], n_static: list[int], per_frame: int) -> list[tuple[str, int, int]]:
    """The units of the pre-LLM budget as (kind, frame, size), in time order: a window's static set
    ("static", a, m) when it has m > 0 static positions (its tokens sit in its first frame a), then
    each of its frames' dynamic set ("dynamic", f, per_frame - m). Per frame f: ``first[f]``, its
    window's first frame, and ``n_static[f]``, its window's m. The f-th dynamic group is frame f's."""
    return [group for f, (a, m) in enumerate(zip(first, n_static))
            for group in ((("static", f, m), ("dynamic", f, per_frame - m)) if f == a and m else
                          (("dynamic", f, per_frame - m),))]


def grouped_top_k(scores: torch.Tensor, sizes: list[int], ks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row r's top ``ks[r]`` among its first ``sizes[r]`` scores, as positions ascending, for every row
    with ks[r] > 0. scores: (R, n). Rows with equal (size, k) are ranked by one ``torch.topk`` call,
    which ranks each row on its own (the same positions, ties included, as one call per row).
    Returns [(rows (G,) long, positions (G, k) long ascending)], one entry per distinct (size, k)."""
    pairs = list(zip(sizes, ks))
    buckets = dict.fromkeys([pair for pair in pairs if pair[1] > 0])  # distinct (size, k), first seen first
    members = [[r for r, pair in enumerate(pairs) if pair == key] for key in buckets]
    rows = torch.tensor([r for bucket in members for r in bucket], dtype=torch.long, device=scores.device)
    rows = rows.split([len(bucket) for bucket in members])
    return [(r, torch.topk(scores[r, :m], k, dim=1).indices.sort(dim=1).values) for r, (m, k) in zip(rows, buckets)]


# -- DPC-kNN clustering -------------------------------------------------------------------------
def dpc_knn_centres(x: torch.Tensor, clusters: int, k: int, generator: Optional[torch.Generator] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (the official ``cluster_dpc_knn``).

    x: (m, d). dist = ||x_i - x_j|| / sqrt(d); rho_i = exp(-mean of the k smallest dist_i^2) (the k
    nearest include i itself) + rand x 1e-6; delta_i = min dist to a denser token (the largest
    distance for the densest); the ``clusters`` tokens with the largest rho x delta are the centres.
    Returns (centre indices (clusters,) ascending, dist (m, m) float32).
    """
    x = x.float()
    m, d = x.shape
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(d)
    noise = torch.rand(m, generator=generator, dtype=torch.float32) if generator is not None else torch.rand(m)
    score = density_peak_scores(dist, k, noise.to(dist.device) * TIE_BREAK)  # (m,) rho x delta
    centres = torch.topk(score, clusters).indices
    return centres.sort().values, dist


def merge_into_centres(x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float = 0.6,
                       mode: str = "beta") -> torch.Tensor:
    """Every non-centre token joins its nearest centre (smallest dist); each centre becomes
    ``"beta"``: beta x centre + (1 - beta) x mean(assigned) (the centre alone when none), or
    ``"mean"``: the mean of the centre and its assigned tokens (the official NO_BETA reading).
    x: (m, d); centres: (c,); dist: (m, m). Returns (c, d) float32."""
    x = x.float()
    others = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    others[centres] = False
    members = others.nonzero().squeeze(1)
    xc = x[centres]
    if members.numel() == 0:
        return xc
    assign = dist[members][:, centres].argmin(dim=1)  # (m - c,) index into centres
    sums = torch.zeros_like(xc).index_add_(0, assign, x[members])
    counts = torch.bincount(assign, minlength=len(centres)).to(x.dtype)[:, None]
    if mode == "mean":
        return (xc + sums) / (counts + 1)
    merged = beta * xc + (1 - beta) * sums / counts.clamp_min(1)
    return torch.where(counts > 0, merged, xc)


# -- inside the LLM ---------------------------------------------------------------------------------
def sequential_merge(x: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The official in-LLM merge: each dropped token (in ``drop``'s order, ascending index) is folded
    into its most similar kept token (cosine, computed once before merging): kept <- (kept + dropped) / 2.

    A kept token with assigned dropped tokens d_1..d_m (in order) ends as
    kept / 2^m + sum_i d_i / 2^(m - i + 1) (later tokens weigh more; not a mean).
    x: (n, d) rows; keep: (k,), drop: (n - k,) indices into x. Returns (k, d) float32 kept rows.
    """
    x = x.float()
    kept = x[keep]
    if drop.numel() == 0:
        return kept
    dropped = x[drop]
    cos = torch.nn.functional.normalize(dropped, dim=-1) @ torch.nn.functional.normalize(kept, dim=-1).T
    target = cos.argmax(dim=1)  # (n - k,) index into keep
    counts = torch.bincount(target, minlength=len(keep))
    order = torch.argsort(target, stable=True)  # per target, the dropped tokens in index order
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(target)
    rank[order] = torch.arange(len(target), device=x.device) - starts[target[order]]
    weight = torch.pow(2.0, (rank - counts[target]).float())  # 2^-(m - rank)
    merged = kept * torch.pow(2.0, -counts.float())[:, None]
    return merged.index_add_(0, target, dropped * weight[:, None])


@dataclass
class _Plan:
    """One video's pre-LLM result, before any row is read.

    content: (k,) the flat index f n + p of each kept token, in the official order (per window [its
    static tokens, then frame by frame its dynamic tokens], each set in cell order; with D > 0 a
    frame's dominant tokens before its contextual ones). centres: per DPC-kNN run, (start, end, rows,
    merged): tokens content[start:end] carry these (end - start, d) float32 rows instead of their own
    (merged False: the run kept every token of its set, their own rows). windows, reduced (R), ratio (r')."""

    content: torch.Tensor
    centres: list[tuple[int, int, torch.Tensor, bool]]
    windows: list[tuple[int, int]]
    reduced: float
    ratio: float

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(k, d) float32 in content order: each token's own row of x (F, n, d), or its centre row."""
        rows = x.reshape(-1, x.shape[-1])[self.content].float()
        for start, end, centre_rows, _ in self.centres:
            rows[start:end] = centre_rows
        return rows

    def merged(self) -> torch.Tensor:
        """(k,) bool in content order: the rows that are not their token's own row (a merge, a window average)."""
        merged = torch.zeros(len(self.content), dtype=torch.bool, device=self.content.device)
        for start, end, _, is_merged in self.centres:
            merged[start:end] = is_merged
        return merged


@dataclass
class HoliTom(PruningMethod):
    """HoliTom with the official defaults (README: RETAIN_RATIO, T, HOLITOM_k=18, HOLITOM_r=0.5)."""

    name = "holitom"
    official_positions = "compact"  # the official LLM sees the shorter sequence (auto: on 1-D RoPE)
    identity_at_full_retention: ClassVar[bool] = False  # static windows are averaged even at R = 1
    # before the LLM at most N - R tokens are left: below the budget when static merging removed more
    input_dependent_schedule: ClassVar[bool] = True
    tau: Optional[float] = None  # T; None: the paper's 0.80, 0.65 at retention <= 10 %
    max_window: int = 1024  # MAX_WINDOW_SIZE (frames)
    knn_k: int = 7  # K: DPC-kNN neighbours (k = min(K, clusters))
    beta: float = 0.6  # BETA: centre weight of a merged cluster
    cluster_merge: str = "beta"  # "beta": beta centre + (1-beta) mean | "mean": NO_BETA=1
    dynamic_cluster_share: float = 0.0  # D: share of a frame's dynamic budget given to DPC-kNN clusters
    llm_layer: Optional[int] = layer_kwarg(18, scaling="relative")  # HOLITOM_k: the in-LLM stage runs before this layer; None: no stage
    llm_keep: float = 0.5  # 1 - HOLITOM_r: kept share of the current visual tokens at llm_layer
    rounding: str = "exact"  # "exact": round(r N) before the LLM | "official": ceil / round per group
    seed: int = 0  # DPC-kNN tie-break generator (per sample)
    # LLaVA-OV: the in-LLM stage ranks and merges the trailing image_newline with the visual tokens, as
    # the official image span does (False: the newline is text, never ranked); no newline elsewhere
    llm_newline: bool = True

    def compacts_at(self, layer: int) -> bool:
        """Only the pre-LLM stage re-numbers (the LLM's own numbering of the shorter sequence); the
        official in-LLM stage keeps the kept tokens' positions."""
        return self.positions == "compact" and layer == 0

    def __post_init__(self):
        super().__post_init__()
        for key, valid in (("rounding", ROUNDINGS), ("cluster_merge", CLUSTER_MERGES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"holitom: {key} must be one of {', '.join(map(repr, valid))}, "
                                 f"got {getattr(self, key)!r}")
        if self.tau is not None and not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"holitom: tau must be a cosine in [-1, 1] or None (the paper's), got {self.tau}")
        if self.max_window < 1:
            raise ValueError(f"holitom: max_window must be >= 1 frame, got {self.max_window}")
        if self.knn_k < 1:
            raise ValueError(f"holitom: knn_k must be >= 1, got {self.knn_k}")
        for key in ("beta", "dynamic_cluster_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"holitom: {key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.llm_keep <= 1.0:
            raise ValueError(f"holitom: llm_keep must be in (0, 1] (kept share at llm_layer), got {self.llm_keep}")
        if self.llm_layer is not None and self.llm_layer < 1:
            raise ValueError(f"holitom: llm_layer must be >= 1 (it ranks with layer llm_layer-1's map) or None, "
                             f"got {self.llm_layer}")

    @property
    def threshold(self) -> float:
        """T in use: ``tau``, or the paper's 0.80 (0.65 at retention <= 10 %)."""
        if self.tau is not None:
            return self.tau
        return PAPER_TAU_LOW if self.retention <= 0.10 + 1e-9 else PAPER_TAU

    # -- where it acts ------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        if self.llm_layer is None:
            return [0]
        if not 1 <= self.llm_layer < num_layers:
            raise ValueError(f"holitom: llm_layer must be in 1..{num_layers - 1} (it ranks with layer "
                             f"llm_layer-1's map) or None (no in-LLM stage), got {self.llm_layer}")
        return [0, self.llm_layer]

    def score_layers(self, num_layers: int) -> list[int]:
        return [] if self.llm_layer is None else [self.llm_layer - 1]

    def vision_layers(self) -> list[Union[int, str]]:
        return ["feature"]  # the official attention: the last SigLIP layer OV keeps (its features' layer)

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """Nominal counts of a video without static windows (a video whose static merging removes
        tokens keeps fewer; the trace has the measured counts). From layer 0: ``"exact"`` budget(N, r);
        ``"official"`` F x ceil(n r) with n the tokens per frame of the named backbone's paper layout
        (budget(N, r) for an unknown layout). From ``llm_layer``: the official span count
        round(llm_keep x (kept + 1)) on LLaVA-OV (the kept tokens and the trailing image_newline, which
        is assumed merged away), round(llm_keep x kept) elsewhere."""
        stages = self.stages(num_layers)
        before = self.nominal_before_llm(n_visual, backbone)
        after = self.llm_count(before + int(self._has_newline(backbone)))
        return [after if len(stages) > 1 and layer >= stages[1] else before for layer in range(num_layers)]

    def nominal_before_llm(self, n_visual: int, backbone=None) -> int:
        """Kept tokens before the LLM of a video without static windows (see :meth:`token_schedule`)."""
        per_frame = _TOKENS_PER_FRAME.get(backbone if isinstance(backbone, str) else getattr(backbone, "name", None))
        if self.rounding == "official" and per_frame and n_visual % per_frame == 0:
            return (n_visual // per_frame) * min(per_frame, math.ceil(per_frame * self.retention))
        return budget(n_visual, self.retention)

    def _has_newline(self, backbone) -> bool:
        """Whether the in-LLM span has LLaVA-OV's trailing newline (a backbone name, facts or a loaded one)."""
        if not self.llm_newline or backbone is None:
            return False
        try:
            return BackboneFacts.of(backbone).family == "llava_onevision"
        except (KeyError, ValueError):
            return False

    def llm_count(self, n_span: int) -> int:
        """Kept tokens of the in-LLM stage's span (the current visual tokens, plus OV's newline):
        round(llm_keep x n) (the official round(image_tokens x (1 - HOLITOM_r)); at least 1)."""
        return max(1, min(n_span, round(self.llm_keep * n_span)))

    # -- the stages ---------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        with ctx.timed("holitom_outer" if ctx.layer_idx == 0 else "holitom_inner"):
            return self.select_before_llm(ctx) if ctx.layer_idx == 0 else self.select_in_llm(ctx)

    def select_before_llm(self, ctx) -> Selection:
        """Segmentation, static merging, per-frame attention top-k and DPC-kNN, per sample (:meth:`plan`).
        The hidden states are copied and written only when some kept slot's row changes (a merged row,
        or the official order moving a row): a dominant token's row is its own input row, exactly for a
        model dtype of at most 32 bits (float32 holds it)."""
        layout = ctx.layout
        frames, per_frame = layout.frames, layout.tokens_per_frame
        attention = ctx.vision("feature").attention  # (b, N_vis) float32, original order
        official = self.compacts_at(0)
        keep, content, plans, changed = [], [], [], False
        for b in range(ctx.batch_size):
            positions = ctx.visual_positions(b)
            if len(positions) != ctx.n_visual:
                raise ValueError(f"holitom: the pre-LLM stage needs every visual token of the video ({ctx.n_visual}), "
                                 f"got {len(positions)}: compose holitom first")
            x = ctx.rows(b, positions.view(frames, per_frame))  # (F, n, d), read-only
            attn = attention[b, ctx.visual_index[b, positions]].view(frames, per_frame)
            plan = self.plan(x, attn, ctx.n_visual)
            kept = plan.content.sort().values  # the slots: ascending
            # row i (content order) goes to slot kept[i] in the official order, else to its own token's slot
            slots = kept if official else plan.content
            moved = official and bool((kept != plan.content).any())
            changed = changed or moved or any([merged for *_, merged in plan.centres])
            plans.append((positions[slots], x, plan))
            keep.append(kept)
            content.append(plan.content if official else kept)
        hidden = ctx.hidden_states
        if changed or not (hidden.dtype.is_floating_point and torch.finfo(hidden.dtype).bits <= 32):
            hidden = hidden.clone()
            for b, (rows_at, x, plan) in enumerate(plans):
                hidden[b, rows_at] = plan.rows(x).to(hidden.dtype)
        t = ctx.trace
        t.tau, t.windows = self.threshold, [plan.windows for _, _, plan in plans]
        t.reduced, t.ratio = [plan.reduced for _, _, plan in plans], [plan.ratio for _, _, plan in plans]
        t.kept_before_llm = [len(k) for k in keep]
        t.content = content  # per sample: whose row (ORIGINAL index) each kept slot carries, slot order
        return Selection(keep_visual=keep, hidden_states=hidden)

    def plan_sample(self, x: torch.Tensor, attention: torch.Tensor, n_visual: int, official_order: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One video: x (F, n, d) LLM input features, attention (F, n) vision attention.

        Returns (kept flat indices f n + p, ascending = the slots the engine keeps; the rows (k, d)
        float32 written into those slots; info with the windows, R, r' and ``content``, the flat index
        of the token whose row each slot carries, and ``merged``, (k,) bool aligned with the rows: True
        where the row is not its token's own input row (a DPC-kNN merge, a window average)).
        ``official_order=False``: slot i carries its own token's row (cell order). ``official_order=True``
        (compact positions, where the slot order IS the LLM's order): the rows come in the official order
        (:class:`_Plan`): the same slots, the window's rows permuted."""
        plan = self.plan(x, attention, n_visual)
        rows, merged = plan.rows(x), plan.merged()
        info = {"windows": plan.windows, "reduced": plan.reduced, "ratio": plan.ratio}
        if official_order:
            info["content"], info["merged"] = plan.content, merged
            return plan.content.sort().values, rows, info
        order = torch.argsort(plan.content)
        info["content"], info["merged"] = plan.content[order], merged[order]
        return info["content"], rows[order], info

    def plan(self, x: torch.Tensor, attention: torch.Tensor, n_visual: int) -> _Plan:
        """The kept tokens of one video (x (F, n, d) LLM input features, attention (F, n) vision
        attention) in the official order, and the DPC-kNN centres' rows (:class:`_Plan`).

        Per group (:func:`budget_groups`): a static set keeps the DPC-kNN centres of its window average;
        a dynamic set its dominant tokens, the top round(quota (1 - D)) by attention (every frame at once:
        :func:`grouped_top_k`), then with D > 0 the DPC-kNN centres of the rest. The DPC runs draw the
        tie-break noise in group order."""
        frames, per_frame = x.shape[:2]
        tau = self.threshold
        similarity = consecutive_similarity(x)
        g = nonstatic_steps(similarity, tau)  # (F, n)
        windows, reduced = best_segmentation(static_counts(g), self.max_window)
        ratio = rescaled_ratio(self.retention, frames * per_frame, reduced)
        first, last = frame_windows(windows)
        frame_static = frame_static_masks(g, first, last)  # (F, n): the static positions of each frame's window
        groups = budget_groups(first, frame_static.sum(dim=1).tolist(), per_frame)
        kinds, _, sizes = zip(*groups)
        total = min(budget(n_visual, self.retention), sum(sizes))
        quotas = group_quotas(list(sizes), list(kinds), ratio, total, self.rounding)
        starts = [0, *itertools.accumulate(quotas)]  # group g's rows: starts[g]:starts[g + 1], official order
        content = torch.empty(starts[-1], dtype=torch.long, device=x.device)  # flat index of each row's token

        # the dominant tokens, every frame at once. Frame f's cells: its window's dynamic ones ascending,
        # then the static ones; its rows start at row dynamic_start[f]
        dynamic = [group for group, kind in enumerate(kinds) if kind == "dynamic"]  # frame f's group: dynamic[f]
        frame_cells = torch.sort(frame_static.to(torch.uint8), dim=1, stable=True).indices  # (F, n)
        ranked = attention.gather(1, frame_cells)  # (F, n): each frame's attention in that cell order
        flat_cells = frame_cells + torch.arange(0, frames * per_frame, per_frame, device=x.device)[:, None]
        share = 1 - self.dynamic_cluster_share
        dominant = [quotas[i] if share == 1 else round(quotas[i] * share) for i in dynamic]  # per frame (D = 0: all)
        dynamic_start = torch.tensor([starts[i] for i in dynamic], device=x.device)
        slot_of = dynamic_start[:, None] + torch.arange(per_frame, device=x.device)  # [f, j]: the row of its j-th
        top_of = {}  # frame -> its dominant tokens' positions among its dynamic cells (D > 0 only)
        for members, top in grouped_top_k(ranked, [sizes[i] for i in dynamic], dominant):
            content[slot_of[members, :top.shape[1]]] = flat_cells[members].gather(1, top)
            if share < 1:
                top_of.update(zip(members.tolist(), top))

        # the DPC-kNN runs, in group order: static sets, and with D > 0 the rest of each dynamic set
        centres = []  # (start, end, rows, merged) of each run
        generator = torch.Generator().manual_seed(self.seed)
        for (kind, f, size), quota, start in zip(groups, quotas, starts):
            if kind == "static":
                if quota <= 0:
                    continue
                group_cells = frame_cells[f, per_frame - size:]
                group_x = x[f:last[f] + 1, frame_static[f]].float().mean(dim=0)  # (m, d) the window average
            else:
                keep = dominant[f]
                if quota <= keep:
                    continue
                rest = torch.ones(size, dtype=torch.bool, device=x.device)
                if keep > 0:
                    rest[top_of[f]] = False
                group_cells = frame_cells[f, :size][rest]
                group_x = x[f, group_cells].float()
                start, quota = start + keep, quota - keep
            centre_cells, centre_rows = self._clusters(group_cells, group_x, quota, generator)
            end = start + len(centre_cells)
            content[start:end] = f * per_frame + centre_cells
            centres += [(start, end, centre_rows, kind == "static" or quota < len(group_cells))]
        return _Plan(content, centres, windows, reduced, ratio)

    def _clusters(self, cells: torch.Tensor, x: torch.Tensor, clusters: int, generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """DPC-kNN centres of ``x`` (m, d) and their merged rows; all tokens when clusters >= m."""
        if clusters >= len(cells):
            return cells, x.float()
        centres, dist = dpc_knn_centres(x, clusters, min(self.knn_k, clusters), generator)
        return cells[centres], merge_into_centres(x, centres, dist, self.beta, self.cluster_merge)

    def select_in_llm(self, ctx) -> Selection:
        """The official image span (the current visual tokens, plus LLaVA-OV's trailing image_newline
        with ``llm_newline``): its top round(llm_keep x span) by the last token's attention of layer
        llm_layer-1, then the sequential merge of the other span tokens into the kept ones (the
        stage's input rows). The engine cannot remove the newline (text): kept, it is a merge target
        like a kept visual token; dropped, it is merged into its target and stays in the sequence."""
        scores = ctx.last_token_attention(layer=self.llm_layer - 1)  # (b, s)
        hidden = ctx.hidden_states.clone()
        keep, newline_kept = [], []
        for b, n in enumerate(ctx.visual_counts):
            positions = ctx.visual_positions(b)
            newline = self.newline_position(ctx, b)
            span = positions if newline is None else torch.cat([positions, positions.new_tensor([newline])])
            top = torch.topk(scores[b, span].float(), self.llm_count(len(span))).indices.sort().values
            if not bool((top < n).any()):  # (span of 2, k = 1, the newline first: keep a visual token)
                top = torch.topk(scores[b, positions].float(), 1).indices
            dropped = torch.ones(len(span), dtype=torch.bool, device=top.device)
            dropped[top] = False
            rows = sequential_merge(hidden[b, span], top, dropped.nonzero().squeeze(1))
            hidden[b, span[top]] = rows.to(hidden.dtype)
            keep.append(top[top < n])
            newline_kept.append(None if newline is None else bool((top == n).any()))
        ctx.trace.kept_in_llm = [len(k) for k in keep]
        ctx.trace.newline_kept = newline_kept  # per sample: the newline among the kept (None: no newline)
        return Selection(keep_visual=keep, hidden_states=hidden)

    def newline_position(self, ctx, b: int) -> Optional[int]:
        """Sequence position of LLaVA-OV's trailing image_newline in sample b's current sequence
        (``ctx.newline_position``), or None: another family (the official code is LLaVA-OV's), or
        ``llm_newline=False``."""
        if not self.llm_newline or ctx.backbone_family != "llava_onevision":
            return None
        return ctx.newline_position(b)
