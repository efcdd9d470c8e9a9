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

import math
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
    """s_t(p) = cos(x_t(p), x_{t+1}(p)): (F, n, d) -> (F-1, n) float32."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    return (x[:-1] * x[1:]).sum(dim=-1)


def static_counts(similarity: torch.Tensor, tau: float) -> list[list[float]]:
    """c[a][e] = (e - a) x #{p : s_t(p) > tau for t = a..e-1}: tokens a window [a, e] removes by
    averaging its static positions ((F-1, n) -> F x F nested list; 0 for e <= a)."""
    frames = similarity.shape[0] + 1
    counts = [[0.0] * frames for _ in range(frames)]
    above = similarity > tau  # (F-1, n)
    for a in range(frames - 1):
        static = torch.cumprod(above[a:].int(), dim=0).sum(dim=1).tolist()  # window [a, a+1+t]
        for t, n_static in enumerate(static):
            counts[a][a + 1 + t] = float((t + 1) * n_static)
    return counts


def segment_windows(similarity: torch.Tensor, tau: float, max_window: int = 1024
                    ) -> tuple[list[tuple[int, int]], float]:
    """The segmentation of the frames into windows [a, e] maximising sum c(a, e) (the official DP).

    best[i] = max(best[i-1] (frame i alone), max_{w=2..min(i+1, max_window)} best[i-w] + c(i-w+1, i));
    a strictly larger value replaces the current best (ties keep the earlier option: the single
    frame, then the shorter window). Returns (windows in time order, the maximum R).
    """
    frames = similarity.shape[0] + 1
    counts = static_counts(similarity, tau)
    best, start = [0.0] * frames, [0] * frames
    for i in range(frames):
        value, first = (best[i - 1] if i > 0 else 0.0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            candidate = (best[j] if j >= 0 else 0.0) + counts[j + 1][i]
            if candidate > value:
                value, first = candidate, j + 1
        best[i], start[i] = value, first
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[-1]


def static_mask(similarity: torch.Tensor, window: tuple[int, int], tau: float) -> torch.Tensor:
    """(n,) bool: the positions static over the whole window (all its consecutive similarities > tau)."""
    a, e = window
    if e == a:
        return torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    return (similarity[a:e] > tau).all(dim=0)


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
class _Group:
    """One unit of the pre-LLM budget: a window's static set or one frame's dynamic set.

    frame: the frame its tokens sit in (a static set: the window's first frame); cells: (m,) grid
    cells (index within the frame); x: (m, d) features (static: averaged over the window);
    attention: (m,) vision attention (dynamic sets only)."""

    kind: str
    frame: int
    cells: torch.Tensor
    x: torch.Tensor
    attention: Optional[torch.Tensor] = None


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
        """Segmentation, static merging, per-frame attention top-k and DPC-kNN, per sample."""
        layout = ctx.layout
        frames, per_frame = layout.frames, layout.tokens_per_frame
        attention = ctx.vision("feature").attention  # (b, N_vis) float32, original order
        hidden = ctx.hidden_states.clone()
        keep, windows, reduced, ratios, content = [], [], [], [], []
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            if len(tokens) != ctx.n_visual:
                raise ValueError(f"holitom: the pre-LLM stage needs every visual token of the video ({ctx.n_visual}), "
                                 f"got {len(tokens)}: compose holitom first")
            x = ctx.rows(b, tokens.positions.view(frames, per_frame))  # (F, n, d), read-only
            attn = attention[b, tokens.index].view(frames, per_frame)
            kept_index, rows, info = self.plan_sample(x, attn, ctx.n_visual, official_order=self.compacts_at(0))
            hidden[b, tokens.positions[kept_index]] = rows.to(hidden.dtype)
            keep.append(kept_index)
            content.append(info["content"])
            windows.append(info["windows"])
            reduced.append(info["reduced"])
            ratios.append(info["ratio"])
        t = ctx.trace
        t.tau, t.windows, t.reduced, t.ratio = self.threshold, windows, reduced, ratios
        t.kept_before_llm = [len(k) for k in keep]
        t.content = content  # per sample: whose row (ORIGINAL index) each kept slot carries, slot order
        return Selection(keep_visual=keep, hidden_states=hidden)

    def plan_sample(self, x: torch.Tensor, attention: torch.Tensor, n_visual: int, official_order: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One video: x (F, n, d) LLM input features, attention (F, n) vision attention.

        Returns (kept flat indices f n + p, ascending = the slots the engine keeps; the rows (k, d)
        float32 written into those slots; info with the windows, R, r' and ``content``, the flat index
        of the token whose row each slot carries). ``official_order=False``: slot i carries its own
        token's row (cell order). ``official_order=True`` (compact positions, where the slot order IS the
        LLM's order): the rows come in the official order, per window [static tokens, then dynamic
        tokens frame by frame], each set in cell order (with D > 0 a frame's dominant tokens before its
        contextual ones): the same slots, the window's rows permuted."""
        frames, per_frame = x.shape[:2]
        tau = self.threshold
        similarity = consecutive_similarity(x)
        windows, reduced = segment_windows(similarity, tau, self.max_window)
        ratio = rescaled_ratio(self.retention, frames * per_frame, reduced)
        groups = self.groups(x, attention, similarity, windows, tau)
        left = sum(len(g.cells) for g in groups)
        total = min(budget(n_visual, self.retention), left)
        quotas = group_quotas([len(g.cells) for g in groups], [g.kind for g in groups], ratio, total, self.rounding)
        generator = torch.Generator().manual_seed(self.seed)
        index, rows = [], []
        for group, quota in zip(groups, quotas):
            cells, merged = self.reduce_group(group, quota, generator)
            index.append(group.frame * per_frame + cells)
            rows.append(merged)
        index = torch.cat(index)  # the official order (groups in window order, see reduce_group)
        rows = torch.cat(rows)
        info = {"windows": windows, "reduced": reduced, "ratio": ratio}
        if official_order:
            info["content"] = index
            return index.sort().values, rows, info
        order = torch.argsort(index)
        info["content"] = index[order]
        return index[order], rows[order], info

    @staticmethod
    def groups(x: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor, windows: list, tau: float
               ) -> list[_Group]:
        """Per window in time order: its static set (averaged over the window), then each frame's
        dynamic set."""
        out = []
        cells = torch.arange(x.shape[1], device=x.device)
        for a, e in windows:
            static = static_mask(similarity, (a, e), tau)
            if bool(static.any()):
                out.append(_Group("static", a, cells[static], x[a:e + 1, static].float().mean(dim=0)))
            for f in range(a, e + 1):
                out.append(_Group("dynamic", f, cells[~static], x[f, ~static].float(), attention[f, ~static]))
        return out

    def reduce_group(self, group: _Group, quota: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(cells kept, their rows float32) of one group keeping ``quota`` tokens, in the official order:
        static centres ascending; dynamic: the dominant tokens ascending, then the clusters ascending."""
        empty = (group.cells[:0], group.x[:0])
        if quota <= 0:
            return empty
        if group.kind == "static":
            return self._clusters(group.cells, group.x, quota, generator)
        dominant = round(quota * (1 - self.dynamic_cluster_share))
        top = torch.topk(group.attention, dominant).indices.sort().values if dominant > 0 else group.cells[:0]
        cells, rows = [group.cells[top]], [group.x[top]]
        if quota > dominant:
            rest = torch.ones(len(group.cells), dtype=torch.bool, device=group.cells.device)
            rest[top] = False
            c, r = self._clusters(group.cells[rest], group.x[rest], quota - dominant, generator)
            cells.append(c)
            rows.append(r)
        return torch.cat(cells), torch.cat(rows)

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
