"""PruneVid (Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
ACL 2025; official code Visual-AI/PruneVid @ b12600c, PLLaVA-7B only). Two stages:

Stage 1, before the LLM (a stage at decoder layer 0, on the input embeddings x_{t,p} of the video,
t = 1..T frames, p = 1..N tokens per frame; Qwen: T temporal patches), ``merge_frames_dynamic``
(models/pllava/modeling_pllava.py L764-827):

1. Temporal segmentation: DPC-kNN (``cluster_dpc_knn`` L111-169) on the frame means m_t = mean_p x_{t,p},

       d_ij    = ||m_i - m_j|| / sqrt(C),
       rho_i   = exp(-mean of the k = 7 smallest d_ij^2, i itself included) + 1e-6 u_i,
       delta_i = min { d_ij : rho_j > rho_i }   (max_ij d_ij for the densest),

   centres = top-int(T x 0.25) of rho delta (:func:`baselines.density_peaks.density_peak_scores`, the
   same score), every frame labelled with its nearest centre. ``refine_clusters`` (L213-305, here
   :func:`refine_clusters`) turns the labels into runs; the segments are the runs (``segment_lengths``).
2. Static tokens of a segment of W frames: position p is static when the mean pairwise cosine
   (1 / W(W-1)) sum_{w != t} cos(x_{w,p}, x_{t,p}) > tau (0.8); W = 1 is 0/0: every token dynamic.
3. The static tokens are averaged over the segment's frames; the static set and each frame's dynamic
   set, when it has n > 14 tokens, are DPC-kNN-clustered (k = 7) into int(0.5 n) clusters, each the
   mean of its members (``spatial_merge_tokens``, ``compute_cluster_vectors``), in descending
   rho delta order of their centres. Output per segment: [static, dynamic frame 1, ..., frame W].

Stage 2, inside the LLM after layer M = 10 (llama.py L1457; elastic_cache.py ``prompt_prefill`` L170-202,
``process_attention`` L120-155), here ``after_attention`` at ``layer``: the layer's eager attention
WITHOUT RoPE and WITHOUT a causal mask (llama.py L446-449), the rows of the text after the video as
queries, reduced by the max over heads then over queries (``ctx.last_token_attention(rope=False,
causal=False, reduce="max")``); per segment the static set keeps its top int(alpha c_s) and every frame
its top int(alpha c_d) (alpha = 0.4), in order; the others leave from layer M + 1 on.

Counts (noise 0, video with n > 14 everywhere): stage 1 keeps sum_seg [c(|S|) + W c(N - |S|)],
c(n) = n if n <= 14 else int(0.5 n); stage 2 sum_seg [int(alpha c_s) + W int(alpha c_d)].

Our choices (docs/methods/prunevid.md has each next to the code it reads):
- ``retention`` r: PruneVid has no retention knob. alpha = ``alpha`` if set, else r / ``cluster_ratio``
  (at most 1): on a video without static tokens the kept share is cluster_ratio x alpha = r up to the
  floors. The default r = 0.2 gives the official alpha = 0.4.
- The density tie-break (official ``torch.rand * 1e-6``, unseeded) is ``density_noise`` x U[0, 1) from a
  generator seeded with ``seed`` per sample; ``density_noise=0`` removes it (the tests' reading).
- Slots: the engine keeps tokens' sequence slots. A cluster (or unclustered token) takes its centre's
  cell, static ones in the segment's FIRST frame (a static cell has no dynamic token in any frame of the
  segment), dynamic ones in their frame. ``positions="compact"`` (1-D RoPE default: PLLaVA renumbers the
  merged sequence) writes each segment's rows in the official order into the segment's slots;
  ``"original"`` (M-RoPE) gives every row its own slot. Stage 2 keeps positions (official gaps).
- Fewer than 4 frames (Qwen's temporal patches): max(1, int(T x 0.25)) centres, k = min(7, T) neighbours
  (the official code fails there).
- The prefix cache: the official ``prompt_prefill`` also gathers the KV cache of layers 0..M to the
  kept tokens, so no decode step sees a token stage 2 dropped, in any layer. ``prefix_kv="official"``
  (default) does that with a decode stage before layer 0 that hides those entries from every decode
  step (the cache keeps them; layer 0's length still gives generate its positions); ``"kept"``: layers
  0..M keep the stage-1 tokens while decoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from baselines.density_peaks import density_peak_scores
from sharp import PruningMethod, Selection, layer_kwarg

PREFIX_KV = ("official", "kept")  # the cache of layers 0..M while decoding (see the module docstring)

# -- 1. temporal segmentation -----------------------------------------------------------------------


def dpc_knn(x: torch.Tensor, clusters: int, k: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of G independent groups (official ``cluster_dpc_knn``).

    x: (G, m, C); noise: (G, m) added to rho. dist = cdist / sqrt(C), score = rho x delta
    (:func:`density_peak_scores`); the ``clusters`` best scores are the centres, in DESCENDING score order
    (cluster j = the j-th best); every token joins its nearest centre (the first on ties), a centre its
    own cluster. Returns (centres (G, clusters) token indices, assignment (G, m) in 0..clusters-1)."""
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])  # (G, m, m)
    score = density_peak_scores(dist, min(k, x.shape[1]), noise.to(dist))
    centres = torch.topk(score, clusters, dim=-1).indices  # (G, c) descending score
    to_centre = torch.gather(dist, 1, centres[:, :, None].expand(-1, -1, dist.shape[2]))  # (G, c, m)
    assignment = to_centre.argmin(dim=1)  # (G, m)
    own = torch.arange(clusters, device=x.device).expand_as(centres)
    assignment.scatter_(1, centres, own)
    return centres, assignment


def cluster_means(x: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """(G, m, C) tokens, (G, m) assignment -> (G, clusters, C) float32 member means
    (``compute_cluster_vectors``; every cluster holds at least its centre)."""
    g, m, c = x.shape
    flat = (assignment + clusters * torch.arange(g, device=x.device)[:, None]).reshape(-1)
    sums = torch.zeros(g * clusters, c, dtype=torch.float32, device=x.device).index_add_(0, flat, x.float().reshape(-1, c))
    counts = torch.bincount(flat, minlength=g * clusters).clamp_min(1).to(sums.dtype)
    return (sums / counts[:, None]).view(g, clusters, c)


def refine_clusters(labels: list[int]) -> list[int]:
    """Official ``refine_clusters`` on one video's frame labels (T,).

    Each cluster keeps its longest run(s) (all runs of the maximal length); a cluster whose runs are all
    single frames is dissolved; every other run becomes -1. Then, left to right, each run of -1 takes
    the label of the neighbouring run that is longer (counted on the labels as refined so far), the
    left one on ties, label 0 when it has no neighbour."""
    out = list(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    for start, end in label_runs(labels):
        runs.setdefault(labels[start], []).append((start, end))
    for spans in runs.values():
        longest = max(e - s + 1 for s, e in spans)
        for s, e in spans:
            if longest == 1 or e - s + 1 < longest:
                out[s:e + 1] = [-1] * (e - s + 1)
    n, i = len(out), 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        start = i
        while i < n and out[i] == -1:
            i += 1
        end = i - 1
        left, left_len = _neighbour_run(out, start - 1, -1)
        right, right_len = _neighbour_run(out, end + 1, 1)
        if left_len > right_len or (left_len == right_len and left is not None):
            new = left
        else:
            new = right
        out[start:end + 1] = [0 if new is None else new] * (end - start + 1)
    return out


def _neighbour_run(labels: list[int], at: int, step: int) -> tuple[Optional[int], int]:
    """(label at ``at``, length of its run going in direction ``step``), or (None, 0) outside."""
    if not 0 <= at < len(labels):
        return None, 0
    label, j = labels[at], at
    while 0 <= j < len(labels) and labels[j] == label:
        j += step
    return label, abs(j - at)


def label_runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of equal labels, as (first, last) index pairs in order."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((start, i - 1))
            start = i
    return runs


def segment_frames(frame_means: torch.Tensor, segment_ratio: float, k: int, noise: torch.Tensor) -> list[int]:
    """Frames per segment, in order: DPC-kNN labels of the frame means (T, C) with max(1, int(T ratio))
    centres, refined into runs. noise: (T,)."""
    frames = frame_means.shape[0]
    clusters = min(frames, max(1, int(frames * segment_ratio)))
    _, labels = dpc_knn(frame_means[None], clusters, k, noise[None])
    return [e - s + 1 for s, e in label_runs(refine_clusters(labels[0].tolist()))]


# -- 2. static / dynamic ------------------------------------------------------------------------------


def static_positions(x: torch.Tensor, tau: float) -> torch.Tensor:
    """(W, N, C) a segment's tokens -> (N,) bool: the mean pairwise cosine over w != t exceeds tau,
    (sum_{w,t} cos - W) / (W (W - 1)) as the official code; W = 1 (0 / 0): no static token."""
    frames = x.shape[0]
    if frames < 2:
        return torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    unit = F.normalize(x.float(), dim=-1)
    pair_sum = (unit.sum(dim=0) ** 2).sum(dim=-1)  # (N,) sum over all (w, t) of cos
    return (pair_sum - frames) / (frames * (frames - 1)) > tau


@dataclass
class Stage1Result:
    """Stage 1 on one video. Flat indices are t N + p of the ORIGINAL video.

    slots: (k,) ascending, the tokens the engine keeps; rows: (k, C) float32, the row each slot carries;
    content: (k,) the cell (flat index) of the cluster centre whose row each slot carries; group: (k,) the
    stage-2 group of each slot's row (a segment's static set, or one frame's dynamic set);
    group_sizes: tokens per group; segments: frames per segment; static_cells: per segment its static
    grid cells (|S|,)."""

    slots: torch.Tensor
    rows: torch.Tensor
    content: torch.Tensor
    group: torch.Tensor
    group_sizes: list[int]
    segments: list[int]
    static_cells: list[torch.Tensor]


# -- the method -----------------------------------------------------------------------------------------


@dataclass
class PruneVid(PruningMethod):
    """PruneVid with the official defaults (scripts/eval.sh: selected_layer 10, alpha 0.4, tau 0.8,
    temporal_segment_ratio 0.25, cluster_ratio 0.5). See docs/methods/prunevid.md."""

    name = "prunevid"
    official_positions = "compact"  # PLLaVA numbers the merged sequence 0..len-1 (stage 2 keeps them)
    identity_at_full_retention: ClassVar[bool] = False  # averaging and clustering act at any alpha
    input_dependent_schedule: ClassVar[bool] = True  # segments and static tokens set the counts
    retention: float = 0.2  # alpha = retention / cluster_ratio = 0.4 (official)
    # M (selected_layer): stage 2 scores with this layer's attention map and drops after it
    layer: int = layer_kwarg(10, scaling="relative")
    alpha: Optional[float] = None  # kept share of each stage-2 group; None: retention / cluster_ratio, at most 1
    tau: float = 0.8  # static threshold on the mean pairwise cosine
    segment_ratio: float = 0.25  # temporal_segment_ratio: int(T x ratio) DPC centres over the frames
    cluster_ratio: float = 0.5  # int(n x ratio) clusters of a static / dynamic set
    cluster_above: int = 14  # a set is clustered only if it has more tokens (hard-coded 14, L796 / L807)
    knn_k: int = 7  # DPC-kNN neighbours (k = 7 in both calls)
    seed: int = 0  # the density noise's generator, per sample
    density_noise: float = 1e-6  # the official rand x 1e-6 tie-break (0: none)
    prefix_kv: str = "official"  # decoding: layers 0..M hide stage 2's dropped tokens (official) | "kept"

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"prunevid: alpha must be in (0, 1] or None (retention / cluster_ratio), got {self.alpha!r}")
        for key in ("segment_ratio", "cluster_ratio"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ValueError(f"prunevid: {key} must be in (0, 1], got {getattr(self, key)!r}")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"prunevid: tau must be a cosine in [-1, 1] (official 0.8), got {self.tau!r}")
        if self.cluster_above < 0:
            raise ValueError(f"prunevid: cluster_above must be an int >= 0 (official 14), got {self.cluster_above!r}")
        if self.knn_k < 1:
            raise ValueError(f"prunevid: knn_k must be an int >= 1 (official 7), got {self.knn_k!r}")
        if self.prefix_kv not in PREFIX_KV:
            raise ValueError(f"prunevid: prefix_kv must be one of {', '.join(map(repr, PREFIX_KV))}, "
                             f"got {self.prefix_kv!r}")
        if self.density_noise < 0:
            raise ValueError(f"prunevid: density_noise must be >= 0 (official 1e-6), got {self.density_noise!r}")

    @property
    def kept_share(self) -> float:
        """alpha in use: ``alpha``, or retention / cluster_ratio (at most 1)."""
        return self.alpha if self.alpha is not None else min(1.0, self.retention / self.cluster_ratio)

    def compacts_at(self, layer: int) -> bool:
        """Only stage 1 re-numbers (PLLaVA's LLM numbers the merged sequence); stage 2 keeps positions."""
        return self.positions == "compact" and layer == 0

    # -- where --------------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"prunevid: layer must be in 1..{num_layers - 1} (stage 2 acts after its "
                             f"attention), got {self.layer}")
        return [0]

    def after_attention_layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def decode_stages(self, num_layers: int) -> list[int]:
        """The official prefix cache: before layer 0 of every decode step, hide stage 2's dropped tokens
        (layers after M no longer hold them, so the choice holds for every layer)."""
        return [0] if self.prefix_kv == "official" else []

    def cluster_count(self, n: int) -> int:
        """c(n): n if n <= cluster_above, else int(n x cluster_ratio)."""
        return n if n <= self.cluster_above else int(n * self.cluster_ratio)

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL schedule (the trace has the measured one): a video without static tokens whose sets
        all exceed ``cluster_above``, floors ignored: round(cluster_ratio N) from layer 0, and
        round(alpha cluster_ratio N) (= round(r N) with alpha from retention) after ``layer``."""
        self.stages(num_layers)
        first = max(1, round(self.cluster_ratio * n_visual))
        second = max(1, round(self.kept_share * first))
        return [first if layer <= self.layer else second for layer in range(num_layers)]

    # -- stage 1 ------------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        with ctx.timed("prunevid_stage1"):
            frames, per_frame = ctx.layout.frames, ctx.layout.tokens_per_frame
            hidden = ctx.hidden_states.clone()
            keep, results, groups = [], [], []
            for b in range(ctx.batch_size):
                tokens = ctx.visual_tokens(b)
                if len(tokens) != frames * per_frame:
                    raise ValueError(f"prunevid: stage 1 needs the whole video ({frames} x {per_frame} tokens), "
                                     f"sample {b} has {len(tokens)} visual tokens (compose prunevid first)")
                x = ctx.hidden_states[b, tokens.positions].view(frames, per_frame, -1)
                res = self.stage1(x, official_order=self.compacts_at(0))
                hidden[b, tokens.positions[res.slots]] = res.rows.to(hidden.dtype)
                group = torch.full((ctx.n_visual,), -1, dtype=torch.long, device=res.slots.device)
                group[tokens.index[res.slots]] = res.group
                keep.append(res.slots)
                groups.append(group)
                results.append(res)
            ctx.state.group_of_index = groups  # per sample: the stage-2 group of each ORIGINAL index (-1: none)
            ctx.state.group_sizes = [r.group_sizes for r in results]
            t = ctx.trace
            t.segments = [r.segments for r in results]
            t.static = [[len(c) for c in r.static_cells] for r in results]  # |S| per segment
            t.static_cells = [[c.cpu() for c in r.static_cells] for r in results]
            t.group_sizes = [r.group_sizes for r in results]
            t.kept_stage1 = [len(r.slots) for r in results]
            t.content = [r.content.cpu() for r in results]  # per slot: the ORIGINAL index of its row's centre
            return Selection(keep_visual=keep, hidden_states=hidden)

    def stage1(self, x: torch.Tensor, official_order: bool = False) -> Stage1Result:
        """Segmentation, static averaging and clustering of one video x (T, N, C).

        ``official_order``: each segment's rows in the official order [static, dynamic frame 1..W]
        (clusters by descending score) are written into the segment's slots in ascending order (the
        LLM's order under compact positions); otherwise every row sits in its own centre's slot."""
        frames, per_frame, _ = x.shape
        generator = torch.Generator().manual_seed(self.seed)
        noise = lambda *shape: (torch.rand(shape, generator=generator) * self.density_noise).to(x.device)  # noqa: E731
        segments = segment_frames(x.float().mean(dim=1), self.segment_ratio, self.knn_k, noise(frames))
        cells = torch.arange(per_frame, device=x.device)
        slots, rows, group, sizes, statics = [], [], [], [], []  # statics: per segment its static cells
        start = 0
        for w in segments:
            seg = x[start:start + w]
            static = static_positions(seg, self.tau)
            statics.append(cells[static])
            seg_slots, seg_rows, seg_group = [], [], []
            if bool(static.any()):  # official: an empty static set adds nothing
                c, r = self.reduce_sets(seg[:, static].float().mean(dim=0)[None], cells[static], noise)
                seg_slots.append(start * per_frame + c[0])
                seg_rows.append(r[0])
                seg_group.append(torch.full((len(c[0]),), len(sizes), dtype=torch.long, device=x.device))
                sizes.append(len(c[0]))
            if bool((~static).any()):
                c, r = self.reduce_sets(seg[:, ~static].float(), cells[~static], noise)  # (W, c), (W, c, C)
                for i in range(w):
                    seg_slots.append((start + i) * per_frame + c[i])
                    seg_rows.append(r[i])
                    seg_group.append(torch.full((c.shape[1],), len(sizes), dtype=torch.long, device=x.device))
                    sizes.append(c.shape[1])
            seg_slots, seg_rows, seg_group = torch.cat(seg_slots), torch.cat(seg_rows), torch.cat(seg_group)
            if official_order:  # rows stay in the official order, slots ascending
                slots.append((seg_slots.sort().values, seg_slots))
                rows.append(seg_rows)
                group.append(seg_group)
            else:
                order = torch.argsort(seg_slots)
                slots.append((seg_slots[order], seg_slots[order]))
                rows.append(seg_rows[order])
                group.append(seg_group[order])
            start += w
        return Stage1Result(slots=torch.cat([s for s, _ in slots]), rows=torch.cat(rows),
                            content=torch.cat([c for _, c in slots]), group=torch.cat(group),
                            group_sizes=sizes, segments=segments, static_cells=statics)

    def reduce_sets(self, x: torch.Tensor, cells: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
        """G token sets of equal size n (x: (G, n, C) float32, at the grid ``cells`` (n,)): unchanged when
        n <= cluster_above, else int(n cluster_ratio) DPC-kNN clusters each (the member means, in
        descending score order, at their centres' cells). Returns (cells (G, c), rows (G, c, C))."""
        g, n, _ = x.shape
        if n <= self.cluster_above:
            return cells.expand(g, n), x
        clusters = self.cluster_count(n)
        centres, assignment = dpc_knn(x, clusters, self.knn_k, noise(g, n))
        return cells[centres], cluster_means(x, assignment, clusters)

    # -- stage 2 ------------------------------------------------------------------------------------
    def after_attention(self, ctx) -> Selection:
        with ctx.timed("prunevid_stage2"):
            groups = getattr(ctx.state, "group_of_index", None)
            if groups is None:  # stage 1 did not run in this prefill
                return Selection.unchanged()
            scores = self.scores(ctx)
            alpha = self.kept_share
            keep, kept = [], []
            for b in range(ctx.batch_size):
                tokens = ctx.visual_tokens(b)
                group = groups[b][tokens.index]  # (n,) group of each current visual token
                score = scores[b, tokens.positions]
                keep.append(keep_per_group(score, group, alpha))
                kept.append(len(keep[-1]))
            ctx.trace.alpha = alpha
            ctx.trace.kept_stage2 = kept
            if kept == list(ctx.visual_counts):  # alpha = 1 on sets of any size: nothing leaves
                return Selection.unchanged()
            ctx.state.stage2_kept = [ctx.visual_tokens(b).index[k] for b, k in enumerate(keep)]
            return Selection(keep_visual=keep)

    def decode_select(self, ctx) -> Selection:
        """Every decode step: the cached visual entries of layer 0 that stage 2 kept (all of them when
        stage 2 dropped nothing)."""
        kept = getattr(ctx.state, "stage2_kept", None)
        if kept is None:
            return Selection.unchanged()
        return Selection([torch.isin(ctx.visual_index(b), kept[b].to(ctx.visual_index(b).device)).nonzero().squeeze(1)
                          for b in range(ctx.batch_size)])

    @staticmethod
    def scores(ctx) -> torch.Tensor:
        """(b, s): the official stage-2 score of every row, layer ``ctx.layer_idx``'s attention without
        RoPE or causal mask, max over heads and over the query rows after the video (the last visual
        token's successors: LLaVA-OV's newline, Qwen's vision_end, the text)."""
        queries = [ctx.seq_len - 1 - int(ctx.visual_positions(b)[-1]) for b in range(ctx.batch_size)]
        out = None
        for q in sorted(set(queries)):
            s = ctx.last_token_attention(queries=q, rope=False, causal=False, reduce="max")
            if out is None:
                out = s
            else:
                rows = torch.tensor([n == q for n in queries], device=s.device)
                out = torch.where(rows[:, None], s, out)
        return out


def keep_per_group(score: torch.Tensor, group: torch.Tensor, alpha: float) -> torch.Tensor:
    """Indices (ascending) of the tokens kept: in each group g >= 0 of n_g tokens the int(alpha n_g) best
    ``score`` (official ``process_attention``); tokens of no group (-1) stay."""
    keep = [(group < 0).nonzero().squeeze(1)]
    for g in torch.unique(group[group >= 0]).tolist():
        members = (group == g).nonzero().squeeze(1)
        k = int(alpha * len(members))
        if k > 0:
            keep.append(members[torch.topk(score[members], k).indices])
    return torch.cat(keep).sort().values
