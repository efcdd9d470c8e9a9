"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
NeurIPS 2025; official code LunarShen/FastVID @ a40a109). Before the LLM (a stage at decoder layer 0,
on the input embeddings x_{t,i}, t = 1..T frames, i = 1..M tokens per frame), in four steps:

1. DySeg (dynamic temporal segmentation). With g_t the frame's global feature,

       s_t = cos(g_t, g_{t+1}),  t = 1..T-1,
       cuts = {the c-1 smallest s_t} U {t : s_t < tau},

   and the video is split after every cut frame (so at least c segments; every frame alone when
   T <= c). g_t is SigLIP's attention-pooling (MAP) head output on the frame's vision features
   (``ctx.frame_pooling``: LLaVA families; the head is reloaded from google/siglip-so400m-patch14-384
   on the 7B backbones, seeded random on the others); on the Qwen families it is the mean of the
   frame's (temporal patch's) merged embeddings.
2. Per-frame budget: R = int(M r), S = R - int(R d) salient and C = R - S context tokens
   (M = 196, r = 0.10: R = 19, S = 12, C = 7).
3. ATS (attention-based salient tokens): the S tokens with the largest probe attention a_t (the MAP
   head's attention to each patch, head mean, resized like the features; Qwen: the last ViT block's
   mean-query attention to each merged token).
4. STPrune's density tokens (DPC-style) on each frame's other m = M - S tokens y_j:

       d_jk  = ||y_j - y_k|| / sqrt(D),
       rho_j = exp(-mean_{k in 4-NN(j), j itself included} d_jk^2) + 1e-6 u_j,   u_j ~ U[0, 1)  (seeded),
       delta_j = min_{k : rho_k > rho_j} d_jk   (max_{k,l} d_kl for the densest token),
       score_j = rho_j delta_j.

   Anchor frames: in a segment of n frames, the frames at distance 0, p, 2p, ... from the segment's
   END each take floor(C n / ceil(n/p)) top-score tokens (anchors); the others take none.
   DTM (density-based token merging): each token to merge joins its most similar anchor (cosine, argmax);
   an anchor with k assigned tokens becomes

       x_a <- w x_a + (1 - w) mean(assigned),   w = max(1 / (k + 1), beta),

   where the tokens to merge are (official OV "parallel" code, ``rules="onevision"``): a single-frame
   segment's m tokens (its anchors included); in a multi-frame segment, ALL n m non-salient tokens of the
   segment, separately for every anchor frame.

Kept = salient U anchors, at their original positions (the official code gathers RoPE angles at the
kept indices: ``official_positions = "original"``); the anchors carry the merged rows
(``Selection.hidden_states``). The kept count depends on the video (the segments):
T S + sum_seg ceil(n/p) floor(C n / ceil(n/p)) on LLaVA-OV.

``rules`` picks the official code's variant per family (docs/methods/fastvid.md has every difference):
"onevision" (fastvid_llavaonevision modeling_qwen2.py L900-1074), "llava_video" (fastvid_llavavideo:
per-segment budgets, salient spread over the segment's frames, the merge set without the segment's
salient tokens and the anchor frame's own targets) and "qwen" (fastvid_qwen25vl modeling_qwen2_5_vl.py:
the llava_video rules plus at least one context token per segment, near-duplicate frames with
s >= ``ignore`` given no tokens, anchors capped at M // 2). Results go to ``trace.method("fastvid")``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from baselines.density_peaks import density_peak_scores
from sharp import PruningMethod, Selection

RULES = ("auto", "onevision", "llava_video", "qwen")
# the official code's variant for each backbone family (Qwen2-VL and Qwen3-VL follow the Qwen2.5-VL code)
FAMILY_RULES = {"llava_onevision": "onevision", "llava_video": "llava_video",
                "qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen"}
NEIGHBOURS = 4  # the density's k nearest neighbours (the token itself included), official topk(k=4)


# -- DySeg ----------------------------------------------------------------------------------------


def frame_similarities(global_features: torch.Tensor) -> torch.Tensor:
    """(T, d) global features -> (T-1,) float32 cosine of consecutive frames s_t = cos(g_t, g_{t+1})."""
    g = F.normalize(global_features.float(), dim=-1)
    return (g[:-1] * g[1:]).sum(dim=-1)


def dyseg_cuts(similarity: torch.Tensor, min_segments: int, tau: float) -> torch.Tensor:
    """Sorted frame indices t after which a segment ends: the min(c-1, T-1) smallest s_t and every
    s_t < tau (official ``topk(largest=False)`` U ``nonzero(s < tau)``, unique, sorted)."""
    k = min(min_segments - 1, similarity.numel())
    smallest = torch.topk(similarity, k, largest=False).indices
    below = (similarity < tau).nonzero().squeeze(1)
    return torch.unique(torch.cat([smallest, below])).sort().values


def segment_sizes(cuts: torch.Tensor, frames: int) -> list[int]:
    """Frames per segment, in order, from the cut positions (a segment ends after each cut)."""
    ends = cuts.tolist() + [frames - 1]
    starts = [-1] + cuts.tolist()
    return [e - s for s, e in zip(starts, ends) if e > s]


# -- budgets --------------------------------------------------------------------------------------


def frame_budget(tokens_per_frame: int, retention: float, context_ratio: float) -> tuple[int, int, int]:
    """(R, S, C) per frame: R = int(M r) (at least 1), S = R - int(R d) salient, C = R - S context."""
    retain = max(1, int(tokens_per_frame * retention))
    salient = retain - int(retain * context_ratio)
    return retain, salient, retain - salient


def anchor_frames(n: int, stride: int) -> list[int]:
    """Positions (0..n-1) of a segment's anchor frames: distance 0, p, 2p, ... from its end."""
    return [i for i in range(n) if (n - 1 - i) % stride == 0]


def onevision_anchor_counts(sizes: list[int], context: int, stride: int, available: int) -> list[int]:
    """OV rules: anchors per frame. A segment of n frames gives each anchor frame
    floor(C n / ceil(n/p)) (C for n = 1), at most the frame's ``available`` non-salient tokens."""
    counts = []
    for n in sizes:
        per = min((context * n) // math.ceil(n / stride), available)
        anchors = set(anchor_frames(n, stride))
        counts += [per if i in anchors else 0 for i in range(n)]
    return counts


def spread(total: int, parts: int) -> list[int]:
    """``total`` over ``parts`` as equally as possible, the remainder to the first parts (official)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def segment_budgets(n: int, retain: int, context_ratio: float, stride: int, tokens_per_frame: int, qwen: bool,
                    similarity: Optional[torch.Tensor] = None, ignore: Optional[float] = None
                    ) -> tuple[list[int], list[int]]:
    """LLaVA-Video / Qwen rules: (salient, context) counts of each frame of a segment of n frames.

    The segment keeps R n tokens: C_seg = int(R n d) context (Qwen: at least 1), S_seg the rest. For
    n > 1 the salient tokens are spread over the frames (Qwen: over the near-duplicate groups, cut where
    s_t < ``ignore``, each group's tokens going to its LAST frame), the context tokens over the
    ceil(n'/p) anchor frames, the larger shares nearest the segment's end (Qwen: at most M // 2 each);
    ``similarity``: (n-1,) s_t inside the segment (Qwen)."""
    m = tokens_per_frame
    seg_retain = retain * n
    seg_context = int(seg_retain * context_ratio)
    if qwen:
        seg_context = max(seg_context, 1)
    seg_salient = seg_retain - seg_context
    if n == 1:
        return [min(seg_salient, m)], [min(seg_context, m - min(seg_salient, m))]
    groups = [1] * n  # every frame its own group (LLaVA-Video; Qwen without ``ignore``)
    if qwen and ignore is not None:
        groups = segment_sizes((similarity < ignore).nonzero().squeeze(1).cpu(), n)
    v = len(groups)
    salient_v = spread(seg_salient, v)
    chunks = spread(seg_context, math.ceil(v / stride))
    context_v = [0] * v
    for j, i in enumerate(range(0, v, stride)):  # chunk j to group v-1-j*p (official: assigned, then reversed)
        context_v[v - 1 - i] = min(chunks[j], m // 2) if qwen else chunks[j]
    salient, context = [], []
    for size, s, c in zip(groups, salient_v, context_v):
        c = min(c, m)
        salient += [0] * (size - 1) + [min(s, m - c)]
        context += [0] * (size - 1) + [c]
    return salient, context


# -- density and merging --------------------------------------------------------------------------


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(T, m, D) -> (T, m, m) Euclidean distances through ||a||^2 + ||b||^2 - 2 a.b, one batched matmul
    (the expansion ``torch.cdist`` itself uses past 25 rows, as in the official call; 3x faster on CPU)."""
    sq = (x * x).sum(dim=-1)
    d2 = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
    return d2.clamp_min_(0.0).sqrt_()


def density_scores(tokens: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DPC score rho delta of each token, per frame: tokens (T, m, D), noise (T, m) added to rho.
    Returns (T, m) float32."""
    x = tokens.float()
    dist = pairwise_distances(x) / math.sqrt(x.shape[-1])  # (T, m, m)
    return density_peak_scores(dist, NEIGHBOURS, noise)


def merge_into_anchors(anchors: torch.Tensor, pool: torch.Tensor, beta: float,
                       pool_mask: Optional[torch.Tensor] = None, pool_unit: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """DTM: every pool token joins its most cosine-similar anchor; anchor a with k tokens becomes
    w x_a + (1-w) mean(assigned), w = max(1/(k+1), beta).

    anchors: (A, K, D), A independent anchor sets; pool: (A, P, D) the tokens each set merges, or
    (P, D) one pool every set merges separately (OV's multi-frame segments); pool_mask: (A, P) bool,
    False for tokens that do not merge; pool_unit: ``pool`` L2-normalised, when already at hand.
    Returns (A, K, D) float32."""
    a, p = anchors.float(), pool.float()
    a_unit = F.normalize(a, dim=-1)
    p_unit = F.normalize(p, dim=-1) if pool_unit is None else pool_unit
    if p.dim() == 2:  # one shared pool: one matmul, no copies per anchor set
        sim = (p_unit @ a_unit.reshape(-1, a.shape[-1]).T).reshape(p.shape[0], *a.shape[:2]).transpose(0, 1)
    else:
        sim = torch.bmm(p_unit, a_unit.transpose(1, 2))  # (A, P, K)
    one_hot = F.one_hot(sim.argmax(dim=-1), a.shape[1]).float()  # (A, P, K): first max on ties
    if pool_mask is not None:
        one_hot = one_hot * pool_mask[..., None].float()
    counts = one_hot.sum(dim=1)[..., None]  # (A, K, 1)
    weight = (1.0 / (counts + 1.0)).clamp(min=beta)
    summed = (torch.einsum("apk,pd->akd", one_hot, p) if p.dim() == 2
              else torch.bmm(one_hot.transpose(1, 2), p))
    return weight * a + (1.0 - weight) * summed / counts.clamp(min=1.0)


def topk_sorted(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, ascending."""
    return torch.topk(values, k, dim=-1).indices.sort(dim=-1).values


# -- one sample -----------------------------------------------------------------------------------


@dataclass
class FastVIDResult:
    """FastVID on one sample (indices are frame-major local indices t M + i of its visual tokens).

    keep: (k,) ascending; salient, anchors: the two kinds, ascending; rows: (len(anchors), D) float32,
    the merged anchor rows in the order of ``anchors``; segments: frames per segment; cuts: DySeg cuts."""

    keep: torch.Tensor
    salient: torch.Tensor
    anchors: torch.Tensor
    rows: torch.Tensor
    segments: list[int]
    cuts: list[int]


# -- the method -----------------------------------------------------------------------------------


@dataclass
class FastVID(PruningMethod):
    """FastVID before the LLM; ``retention`` = r, the per-frame share R = int(M r) (the kept share of the
    original tokens is at most r: DySeg's floors lose a few). See docs/methods/fastvid.md."""

    name = "fastvid"
    official_positions = "original"  # position_ids = cache_position = the kept indices (gaps)
    input_dependent_schedule: ClassVar[bool] = True  # the segments set the anchor counts
    reads_frame_pooling: ClassVar[bool] = True  # g_t and a_t: SigLIP's pooling head on LLaVA (hub on the 7B)
    min_segments: int = 8  # c (fastvid_DySeg_c): DySeg cuts at least the c-1 least similar transitions
    tau: float = 0.9  # fastvid_DySeg_tau: and every transition with s_t < tau (Qwen: 0.84, the yaml)
    context_ratio: float = 0.4  # d (fastvid_STPrune_d): the context (anchor) share of each budget
    anchor_stride: int = 4  # p (fastvid_DTM_p): one anchor frame every p frames from a segment's end
    beta: float = 0.6  # fastvid_DTM_beta: least weight of an anchor's own row in its merge
    # fastvid_DySeg_ignore (Qwen rules only): frames of a segment more similar than this to the next
    # are given no tokens (None: off; 0.95 on the Qwen families, the yaml)
    ignore: Optional[float] = None  # noqa: UP045
    # "auto": the official variant of the backbone's family (llava_onevision -> "onevision",
    # llava_video -> "llava_video", Qwen families -> "qwen") | "onevision" | "llava_video" | "qwen"
    rules: str = "auto"
    seed: int = 0  # seed of the density's tie-breaking noise (the official code draws torch.rand unseeded)
    density_noise: float = 1e-6  # scale of that noise (0: none)

    def __post_init__(self):
        super().__post_init__()
        if self.min_segments < 1:
            raise ValueError(f"fastvid: min_segments (c) must be an int >= 1, got {self.min_segments!r}")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"fastvid: tau must be a cosine in [-1, 1] (official 0.9), got {self.tau!r}")
        if not 0.0 <= self.context_ratio <= 1.0:
            raise ValueError(f"fastvid: context_ratio (d) must be in [0, 1] (official 0.4), got {self.context_ratio!r}")
        if self.anchor_stride < 1:
            raise ValueError(f"fastvid: anchor_stride (p) must be an int >= 1 (official 4), got {self.anchor_stride!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"fastvid: beta must be in [0, 1] (official 0.6), got {self.beta!r}")
        if self.ignore is not None and not -1.0 <= self.ignore <= 1.0:
            raise ValueError(f"fastvid: ignore must be None or a cosine in [-1, 1] (official Qwen 0.95), "
                             f"got {self.ignore!r}")
        if self.rules not in RULES:
            raise ValueError(f"fastvid: rules must be one of {', '.join(map(repr, RULES))}, got {self.rules!r}")
        if self.density_noise < 0:
            raise ValueError(f"fastvid: density_noise must be >= 0 (official 1e-6), got {self.density_noise!r}")

    # -- where --------------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0]  # before the LLM: on the input embeddings

    def vision_layers(self) -> list[str]:
        return ["feature"]  # the features the LLM gets (OV-7B: the last of the 26 SigLIP layers it keeps)

    def backbone_settings(self, backbone) -> dict:
        """``rules="auto"`` -> the official variant of the backbone's family."""
        out = super().backbone_settings(backbone)
        if self.rules == "auto":
            out["rules"] = self._family_rules(backbone.family)
        return out

    @staticmethod
    def _family_rules(family: str) -> str:
        if family not in FAMILY_RULES:
            raise ValueError(f"fastvid: no official variant for backbone family {family!r} (known: "
                             f"{', '.join(sorted(FAMILY_RULES))}); set rules= explicitly")
        return FAMILY_RULES[family]

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL schedule (the real count depends on the segments: the trace's visual_tokens_per_layer):
        round(r N_vis) from layer 0 on, the paper's FLOPs convention; N_vis when nothing is pruned."""
        return super().token_schedule(n_visual, num_layers, backbone)

    # -- what ---------------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        frames, per_frame = ctx.layout.frames, ctx.layout.tokens_per_frame
        retain, salient, context = frame_budget(per_frame, self.retention, self.context_ratio)
        if retain >= per_frame:  # every frame keeps all its tokens: nothing to prune
            return Selection.unchanged()
        rules = self.rules if self.rules != "auto" else self._family_rules(ctx.backbone_family)
        pooling = ctx.frame_pooling("feature")
        hidden = ctx.hidden_states.clone()
        results = []
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            if len(tokens) != frames * per_frame:
                raise ValueError(f"fastvid: runs on the whole video ({frames} x {per_frame} tokens), but sample {b} "
                                 f"has {len(tokens)} visual tokens left (compose it first)")
            x = self.rows(ctx.hidden_states[b], tokens.positions).reshape(frames, per_frame, -1)  # (T, M, D)
            att = pooling.attention[b].to(x.device).reshape(frames, per_frame)  # (T, M)
            g = (pooling.global_features[b].to(x.device) if pooling.global_features is not None
                 else x.float().mean(dim=1))  # Qwen: mean of the temporal patch's merged embeddings
            res = self.prune_sample(x, att, g, rules, retain)
            hidden[b, tokens.positions[res.anchors]] = res.rows.to(hidden.dtype)
            results.append(res)
        self.record(ctx, rules, (retain, salient, context), pooling.source, results)
        return Selection([r.keep for r in results], hidden_states=hidden)

    @staticmethod
    def rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden[positions]: a view when the positions are one run (a video's tokens), else a copy."""
        first, n = int(positions[0]), len(positions)
        if int(positions[-1]) - first + 1 == n:
            return hidden[first:first + n]
        return hidden[positions]

    def prune_sample(self, x: torch.Tensor, attention: torch.Tensor, global_features: torch.Tensor, rules: str,
                     retain: int) -> FastVIDResult:
        """FastVID on one video: x (T, M, D) embeddings, attention (T, M), global_features (T, d)."""
        frames = x.shape[0]
        similarity = frame_similarities(global_features)
        cuts = dyseg_cuts(similarity, self.min_segments, self.tau).cpu()
        sizes = segment_sizes(cuts, frames)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        if rules == "onevision":
            salient, anchors, rows = self.onevision(x, attention, sizes, generator)
        else:
            salient, anchors, rows = self.per_segment(x, attention, similarity, sizes, retain, rules == "qwen",
                                                      generator)
        order = torch.argsort(anchors)
        anchors, rows = anchors[order], rows[order]
        keep = torch.cat([salient, anchors]).sort().values
        return FastVIDResult(keep, salient.sort().values, anchors, rows, sizes, cuts.tolist())

    def noise(self, shape: tuple, generator: torch.Generator, device) -> torch.Tensor:
        """The density's tie-breaking noise: density_noise x U[0, 1) from the sample's seeded generator."""
        return (torch.rand(shape, generator=generator) * self.density_noise).to(device)

    def onevision(self, x: torch.Tensor, attention: torch.Tensor, sizes: list[int], generator: torch.Generator):
        """The OV "parallel" code: S salient per frame, density on every frame's other tokens, single-frame
        segments merged inside the frame, multi-frame segments merged per anchor frame over the segment."""
        frames, m_all, dim = x.shape
        _, salient_n, context_n = frame_budget(m_all, self.retention, self.context_ratio)
        device = x.device
        base = torch.arange(frames, device=device)[:, None] * m_all  # (T, 1) frame offsets
        top = torch.topk(attention, salient_n, dim=-1).indices  # (T, S)
        rest_mask = torch.ones(frames, m_all, dtype=torch.bool, device=device)
        rest_mask.scatter_(1, top, False)
        m = m_all - salient_n
        rest = rest_mask.nonzero()[:, 1].reshape(frames, m)  # (T, m) ascending
        y = x[torch.arange(frames, device=device)[:, None], rest]  # (T, m, D)
        score = density_scores(y, self.noise((frames, m), generator, device))  # (T, m)
        counts = onevision_anchor_counts(sizes, context_n, self.anchor_stride, m)
        anchors, rows = [], []
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        y_unit = F.normalize(y.float(), dim=-1)  # (T, m, D), shared by both merges
        single = [s for s, n in zip(starts, sizes) if n == 1 and counts[s] > 0]
        if single:  # as the official code: every frame merged into its own top-C, the single-frame ones kept
            every = torch.arange(frames, device=device)[:, None]
            pick = torch.topk(score, counts[single[0]], dim=-1).indices  # (T, C)
            merged = merge_into_anchors(y[every, pick], y, self.beta, pool_unit=y_unit)  # (T, C, D)
            f = torch.tensor(single, device=device)
            rows.append(merged[f].reshape(-1, dim))
            anchors.append((base[f] + rest[f[:, None], pick[f]]).reshape(-1))
        for start, n in zip(starts, sizes):
            anchor_f = [start + i for i in anchor_frames(n, self.anchor_stride)]
            if n == 1 or counts[anchor_f[0]] == 0:
                continue
            f = torch.tensor(anchor_f, device=device)
            pick = torch.topk(score[f], counts[anchor_f[0]], dim=-1).indices  # (A, K)
            pool = y[start:start + n].reshape(n * m, dim)  # every non-salient token of the segment
            unit = y_unit[start:start + n].reshape(n * m, dim)
            rows.append(merge_into_anchors(y[f[:, None], pick], pool, self.beta, pool_unit=unit).reshape(-1, dim))
            anchors.append((base[f] + rest[f[:, None], pick]).reshape(-1))
        salient = (base + top).reshape(-1)
        if not anchors:
            return salient, salient.new_zeros(0), x.new_zeros(0, dim, dtype=torch.float32)
        return salient, torch.cat(anchors), torch.cat(rows)

    def per_segment(self, x: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor, sizes: list[int],
                    retain: int, qwen: bool, generator: torch.Generator):
        """The LLaVA-Video / Qwen2.5-VL code: per-segment budgets; each anchor frame's targets merge the
        segment's tokens that are neither salient nor its own targets."""
        frames, m_all, dim = x.shape
        device = x.device
        salient_all, anchors_all, rows_all = [], [], []
        start = 0
        for n in sizes:
            seg_sim = similarity[start:start + n - 1]
            s_counts, c_counts = segment_budgets(n, retain, self.context_ratio, self.anchor_stride, m_all, qwen,
                                                 seg_sim, self.ignore if qwen else None)
            kept = torch.zeros(n, m_all, dtype=torch.bool, device=device)  # the segment's salient tokens
            targets = []  # (frame in segment, (K,) token indices)
            for i in range(n):
                top = (torch.topk(attention[start + i], s_counts[i]).indices if s_counts[i] > 0
                       else torch.zeros(0, dtype=torch.long, device=device))
                kept[i, top] = True
                if c_counts[i] > 0:
                    rest = (~kept[i]).nonzero().squeeze(1)  # ascending
                    score = density_scores(x[start + i, rest][None], self.noise((1, len(rest)), generator, device))
                    targets.append((i, rest[topk_sorted(score[0], c_counts[i])]))
            flat = x[start:start + n].reshape(n * m_all, dim)
            for i, t in targets:
                pool_mask = ~kept.reshape(-1).clone()
                pool_mask[i * m_all + t] = False
                merged = merge_into_anchors(x[start + i, t][None], flat[None], self.beta, pool_mask[None])[0]
                anchors_all.append(start * m_all + i * m_all + t)
                rows_all.append(merged)
            salient_all.append(start * m_all + kept.reshape(-1).nonzero().squeeze(1))
            start += n
        salient = torch.cat(salient_all)
        if not anchors_all:
            return salient, salient.new_zeros(0), x.new_zeros(0, dim, dtype=torch.float32)
        return salient, torch.cat(anchors_all), torch.cat(rows_all)

    @staticmethod
    def record(ctx, rules: str, budget: tuple[int, int, int], source: str, results: list[FastVIDResult]) -> None:
        """``trace.method("fastvid")``: rules, per-frame (R, S, C), the pooling head's source, and per
        sample the DySeg cuts and segment sizes and the ORIGINAL indices of the salient and anchor tokens."""
        t = ctx.trace
        t.rules, t.frame_budget, t.pooling_source = rules, budget, source
        index = [ctx.visual_tokens(b).index for b in range(len(results))]
        t.cuts = [r.cuts for r in results]
        t.segments = [r.segments for r in results]
        t.salient = [i[r.salient].cpu() for i, r in zip(index, results)]
        t.anchors = [i[r.anchors].cpu() for i, r in zip(index, results)]
