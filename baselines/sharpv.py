"""SharpV (Qin et al., "Sharp Eyes and Memory for VideoLLMs", 2025; no official code).

Two training-free stages, neither of which reads an attention score (so every attention
implementation, FlashAttention included, runs unchanged):

**Visual SharpV** (a stage before decoder layer 0, on the visual tokens' input embeddings: the
projected features entering the LLM). Per frame t (Qwen2-VL: per temporal patch) with current
tokens x_{t,i} (i = grid cell), all in float32:

    Dissim(a, b) = || a/|a| - b/|b| ||_2                                   in [0, 2]
    S_{t,i} = Dissim(x_{t,i}, mean_j x_{t,j})                              spatial score
    T_{t,i} = Dissim(x_{t,i}, x_{t-1,i})                                   temporal score
    T_{0,i} := S_{0,i}                                                     (first frame: no previous frame)
    I_{t,i} = T_{t,i} + w S_{t,i}                                          importance (w = 1)

``mode="adaptive"`` (the paper's): the frame's kept count follows the L2 norm of its temporal
scores, n_t = tokens of frame t, F = frames of the video:

    r_t = ||T_t||_2 / (K sqrt(f))       K = ``K`` (2, the summary's constant; Fig. 5 ablates K)
    f = n_t (``adaptive_f="tokens"``, default: r_t = RMS(T_t) x 2/K, in [0, 1] at K = 2 since Dissim <= 2)
    f = F   (``adaptive_f="frames"``: r_t = RMS(T_t) sqrt(n_t / F) x 2/K; r_t n_t is capped at n_t)
    ``adaptive_rule="ratio"`` (default): keep the top round(r_t n_t) tokens of the frame by I;
    ``adaptive_rule="threshold"``: keep the tokens with I_{t,i} > r_t (r_t read as a score threshold).

``mode="fixed"``: keep k = round(retention x N_vis) tokens, split over the frames in proportion to
their current token counts (largest remainders, ties to the earlier frame), the top k_t by I in
each frame (FLOPs-matched tables).

**Memory SharpV** (after the prefill, before decoding; ``memory_threshold`` M = 0.2, 0 = off): for
every decoder layer l, V_l = the visual tokens' rows of layer l's INPUT (the rows its keys and
values are computed from; ``memory_features="input"``, default) or of its OUTPUT (``"output"``),
V_0 = the rows entering layer 0 (the features entering the LLM):

    sim_l = mean_i cos(V_l[i], V_0[i])          (``similarity="token"``, default)
    sim_l = cos(mean_i V_l[i], mean_i V_0[i])   (``similarity="mean"``)

and every layer l >= 1 with sim_l < M in every sample of the batch loses its visual KV-cache entries
(``ctx.drop_visual_kv`` of the post-prefill context; the text entries stay). Layer 0 is never dropped (its cache length gives
generate's positions).

Every reading of the summary's text is written next to its formula in docs/sharpv.md. Results:
``trace.method("sharpv")``: per sample ``frame_kept``, ``frame_ratio``, ``spatial``, ``temporal``,
``importance``, ``kept_share``; memory stage: ``similarity`` (a list over the L layers of the
per-sample sim_l), ``memory_features``, ``memory_layers`` (one dict per layer), ``dropped_layers``,
``kv_bytes_before`` / ``kv_bytes_after`` / ``kv_bytes_saved``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sharp import PruningMethod, Selection, budget, split_budget

MODES = ("adaptive", "fixed")
ADAPTIVE_RULES = ("ratio", "threshold")
ADAPTIVE_FS = ("tokens", "frames")  # f of r_t: tokens of the frame | frames of the video
SIMILARITIES = ("token", "mean")
MEMORY_FEATURES = ("input", "output")  # V_l: layer l's input rows | its output rows
MAX_DISSIM = 2.0  # || u - v ||_2 of two unit vectors is at most 2
DEFAULT_K = MAX_DISSIM  # K of r_t = ||T_t|| / (K sqrt(f)): the summary's "2" (= the largest Dissim)
NOMINAL_RETENTION = 0.12  # the summary's reported average kept share on LLaVA-OV (adaptive FLOPs)


# -- Visual SharpV: scores --------------------------------------------------------------------
def dissimilarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dissim(a, b) = || a/|a| - b/|b| ||_2 over the last dim, in float32: (..., d), (..., d) -> (...)."""
    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).norm(dim=-1)


@dataclass
class FrameScores:
    """Scores of one sample's current visual tokens on a dense (F, C) grid: F frames that have tokens
    (in order), C cells per frame. ``rows`` (F, C) long: the token (index into the sample's current
    visual tokens) at each cell, -1 where absent; ``spatial``, ``temporal``, ``importance`` (F, C)
    float32 (meaningless where absent); ``frames`` (F,) the frame ids."""

    rows: torch.Tensor
    spatial: torch.Tensor
    temporal: torch.Tensor
    importance: torch.Tensor
    frames: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """(F, C) bool: the cell has a token."""
        return self.rows >= 0

    def per_token(self, dense: torch.Tensor) -> torch.Tensor:
        """(F, C) values -> (n,) in the tokens' order."""
        out = dense.new_empty(int(self.present.sum()))
        out[self.rows[self.present]] = dense[self.present]
        return out


def frame_grid(frame: torch.Tensor, cell: torch.Tensor, cells_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (F, C) long, frames (F,)): where each token of one sample sits, -1 for absent cells."""
    frames, frame_pos = torch.unique(frame, sorted=True, return_inverse=True)
    rows = torch.full((len(frames), cells_per_frame), -1, dtype=torch.long, device=frame.device)
    rows[frame_pos, cell] = torch.arange(len(frame), device=frame.device)
    return rows, frames


def frame_scores(x: torch.Tensor, frame: torch.Tensor, cell: torch.Tensor, cells_per_frame: int,
                 w: float) -> FrameScores:
    """S, T and I of one sample's current visual tokens.

    x: (n, d) the tokens' input embeddings; frame: (n,) frame id; cell: (n,) position in the frame's
    token grid (row x cols + col); cells_per_frame: grid size C. "The previous frame" is the previous
    frame that has tokens; a token whose cell is absent there (composed after another pruning
    method) gets T := S, as every token of the first frame.
    """
    rows, frames = frame_grid(frame, cell, cells_per_frame)
    present = rows >= 0
    dense = x.float()[rows.clamp_min(0)] * present[..., None]  # (F, C, d), absent cells 0
    mean = dense.sum(dim=1) / present.sum(dim=1, keepdim=True)  # (F, d) frame means of the present tokens
    spatial = dissimilarity(dense, mean[:, None])  # (F, C)
    temporal = spatial.clone()  # frame 0: T := S
    both = present[1:] & present[:-1]
    temporal[1:] = torch.where(both, dissimilarity(dense[1:], dense[:-1]), spatial[1:])
    return FrameScores(rows, spatial, temporal, temporal + w * spatial, frames)


def adaptive_ratios(scores: FrameScores, k_scale: float = DEFAULT_K, f: str = "tokens") -> torch.Tensor:
    """(F,) r_t = ||T_t||_2 / (K sqrt(f)) over each frame's present tokens (first frame: T_0 = S_0).

    k_scale: K (the summary's 2, Fig. 5's ablated K); f: ``"tokens"`` -> f = n_t, the frame's present
    tokens (then r_t = RMS(T_t) x 2 / K); ``"frames"`` -> f = F, the sample's frame count (rows of
    ``scores``), the same for every frame (then r_t = RMS(T_t) sqrt(n_t / F) x 2 / K).
    """
    present = scores.present
    norms = (scores.temporal.square() * present).sum(dim=1).sqrt()
    if f == "frames":
        count = torch.full_like(norms, float(present.shape[0]))
    else:
        count = present.sum(dim=1).float()
    return norms / (k_scale * count.sqrt())


def keep_top_per_frame(scores: FrameScores, k: torch.Tensor) -> torch.Tensor:
    """Indices (into the sample's current visual tokens) of the top ``k[t]`` tokens by I of every
    frame t; k (F,) long, at most the frame's count."""
    importance = scores.importance.masked_fill(~scores.present, float("-inf"))
    order = importance.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)  # rank of each cell within its frame
    return scores.rows[(rank < k[:, None]) & scores.present]


# -- Memory SharpV: similarity and cache entries ------------------------------------------------
def degradation_similarity(v_l: torch.Tensor, v_0: torch.Tensor, kind: str) -> float:
    """Similarity of layer l's visual rows (n, d) to the same tokens' rows entering the LLM (n, d):
    ``"token"``: mean_i cos(v_l[i], v_0[i]); ``"mean"``: cos(mean_i v_l[i], mean_i v_0[i])."""
    a, b = v_l.float(), v_0.float()
    if kind == "mean":
        return float(F.cosine_similarity(a.mean(dim=0), b.mean(dim=0), dim=0))
    return float(F.cosine_similarity(a, b, dim=-1).mean())


@dataclass
class SharpV(PruningMethod):
    """SharpV with the summary's settings as defaults (w = 1, M = 0.2). See docs/sharpv.md."""

    name = "sharpv"
    # adaptive counts and the memory stage: R = 1 is not the identity (fixed mode with
    # memory_threshold=0 is, tests/test_sharpv.py checks it)
    identity_at_full_retention: ClassVar[bool] = False
    mode: str = "adaptive"  # "adaptive": per-frame counts from ||T_t|| | "fixed": retention x N_vis
    w: float = 1.0  # I = T + w S
    adaptive_rule: str = "ratio"  # r_t is the frame's kept share | "threshold": keep I > r_t
    K: float = DEFAULT_K  # r_t = ||T_t||_2 / (K sqrt(f)) (Fig. 5's K; the summary's 2)
    adaptive_f: str = "tokens"  # f of r_t: "tokens" = n_t, the frame's tokens | "frames" = F, the video's frames
    visual: bool = True  # Visual SharpV (the stage before layer 0); False: memory stage only
    memory_threshold: float = 0.2  # M: drop a layer's visual KV when sim_l < M; 0 = no memory stage
    similarity: str = "token"  # sim_l: mean of per-token cosines | "mean": cosine of the token means
    memory_features: str = "input"  # V_l: layer l's input rows (its K/V come from them) | "output"
    nominal_retention: float = NOMINAL_RETENTION  # adaptive mode's FLOPs schedule (kept share assumed)

    def __post_init__(self):
        super().__post_init__()
        for key, valid in (("mode", MODES), ("adaptive_rule", ADAPTIVE_RULES), ("adaptive_f", ADAPTIVE_FS),
                           ("similarity", SIMILARITIES), ("memory_features", MEMORY_FEATURES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"sharpv: {key} must be one of {', '.join(map(repr, valid))}, "
                                 f"got {getattr(self, key)!r}")
        if not math.isfinite(self.w) or self.w < 0:
            raise ValueError(f"sharpv: w must be a finite number >= 0 (I = T + w S), got {self.w!r}")
        if not math.isfinite(self.K) or self.K <= 0:
            raise ValueError(f"sharpv: K must be a finite number > 0 (r_t = ||T_t|| / (K sqrt(f)); the summary's "
                             f"2), got {self.K!r}")
        if not 0.0 <= self.memory_threshold <= 1.0:
            raise ValueError(f"sharpv: memory_threshold must be in [0, 1] (a cosine threshold; 0 = no memory "
                             f"stage), got {self.memory_threshold!r}")
        if not 0.0 < self.nominal_retention <= 1.0:
            raise ValueError(f"sharpv: nominal_retention must be in (0, 1], got {self.nominal_retention!r}")

    @property
    def input_dependent_schedule(self) -> bool:  # type: ignore[override]
        """Adaptive counts depend on the video (the token schedule is then nominal); fixed mode's are exact."""
        return self.visual and self.mode == "adaptive"

    @property
    def memory(self) -> bool:
        """Whether the memory stage runs (M > 0)."""
        return self.memory_threshold > 0.0

    # -- where it acts -----------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0] if self.visual else []

    def score_layers(self, num_layers: int) -> list[int]:
        """None: the memory stage computes sim_l on the fly (:meth:`install`), no layer input is kept."""
        return []

    def install(self, ctx) -> None:
        """Memory stage: sim_l is computed on the fly from every decoder layer's prefill input (the
        sequence entering it, after the visual stage) or output (``memory_features="output"``), against
        V_0 = layer 0's visual rows (``ctx.watch_layers``). Only V_0 (b, n_0, d) and, per layer, the (b,)
        similarities are kept: no layer's hidden states outlive its forward."""
        if not self.memory:
            return
        ctx.watch_layers(lambda rows: self._observe_input(ctx.state, rows), where="input")
        if self.memory_features == "output":
            ctx.watch_layers(lambda rows: self._record_similarity(ctx.state, rows), where="output")

    def _observe_input(self, state, rows) -> None:
        """A layer's input rows (:class:`~sharp.engine.context.LayerRows`): V_0 at layer 0, and sim_l when
        V_l is the input."""
        if rows.layer == 0:  # V_0: the visual rows entering the LLM (after the visual stage), by original index
            state.reference = [(rows.visual_index(i), rows.visual_rows(i).detach()) for i in range(rows.batch_size)]
        if self.memory_features == "input":
            if rows.layer == 0:
                state.sims = {0: torch.ones(rows.batch_size)}  # V_0 is the reference itself
            else:
                self._record_similarity(state, rows)

    def _record_similarity(self, state, rows) -> None:
        if not hasattr(state, "sims"):
            state.sims = {}  # layer -> (b,) sim_l
        state.sims[rows.layer] = self._similarities(state, rows)

    def _similarities(self, state, rows) -> torch.Tensor:
        """(b,) sim_l of a layer's visual rows against V_0, per sample (tokens matched by original index)."""
        out = torch.ones(rows.batch_size)
        for i, (index0, v_0) in enumerate(state.reference):
            row_of = torch.full((int(index0.max()) + 1 if index0.numel() else 1,), -1, dtype=torch.long,
                                device=index0.device)
            row_of[index0] = torch.arange(index0.numel(), device=index0.device)
            out[i] = degradation_similarity(rows.visual_rows(i), v_0[row_of[rows.visual_index(i)]], self.similarity)
        return out

    # -- Visual SharpV -------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        keep = []
        record = {key: [] for key in ("spatial", "temporal", "importance", "frames", "frame_ratio",
                                      "frame_kept", "kept_share")}
        for b in range(ctx.batch_size):
            tokens = ctx.visual_tokens(b)
            cell = tokens.row * ctx.layout.grid[1] + tokens.col
            scores = frame_scores(ctx.visual_hidden_states(b), tokens.frame, cell, ctx.layout.tokens_per_frame,
                                  self.w)
            ratios = self.frame_ratios(scores)
            k = self.frame_budgets(scores, ratios, ctx.budget(self.retention)[b])
            keep.append(keep_top_per_frame(scores, k))
            for key, dense in (("spatial", scores.spatial), ("temporal", scores.temporal),
                               ("importance", scores.importance)):
                record[key].append(scores.per_token(dense))
            record["frames"].append(scores.frames)
            record["frame_ratio"].append(ratios)
            record["frame_kept"].append(k)
            record["kept_share"].append(len(keep[-1]) / ctx.n_visual)
        for key, value in record.items():
            setattr(ctx.trace, key, value)
        return Selection(keep)

    def frame_ratios(self, scores: FrameScores) -> torch.Tensor:
        """(F,) r_t = ||T_t||_2 / (K sqrt(f)) with this method's K and f (``adaptive_f``)."""
        return adaptive_ratios(scores, self.K, self.adaptive_f)

    def frame_budgets(self, scores: FrameScores, ratios: torch.Tensor, k_fixed: int) -> torch.Tensor:
        """(F,) long: how many tokens each frame keeps (mode and rule as configured)."""
        counts = scores.present.sum(dim=1)
        if self.mode == "fixed":
            return torch.tensor(split_budget(k_fixed, counts.tolist(), rule="largest_remainder"), device=counts.device)
        if self.adaptive_rule == "ratio":
            k = torch.minimum(torch.round(ratios * counts).long(), counts)  # round half to even, as budget()
        else:
            k = ((scores.importance > ratios[:, None]) & scores.present).sum(dim=1)
        if int(k.sum()) == 0:  # a sample keeps at least one token: the most important one
            importance = scores.importance.masked_fill(~scores.present, float("-inf"))
            k[int(importance.max(dim=1).values.argmax())] = 1
        return k

    # -- Memory SharpV -------------------------------------------------------------------------
    def after_prefill(self, ctx) -> None:
        """sim_l of every layer, then the KV drop of the layers degraded in every sample (see
        :meth:`drop_degraded_layer`); results on the method's trace."""
        if not self.memory:
            return
        trace = ctx.trace
        if not ctx.has_kv_cache:
            trace.memory_layers, trace.dropped_layers, trace.kv_bytes_saved = [], [], 0
            return
        with ctx.timed("memory"):
            self._drop_degraded_layers(ctx, trace)

    def _drop_degraded_layers(self, ctx, trace) -> None:
        """sim_l of every layer, then each layer's KV drop; results on ``trace``."""
        sims = self.layer_similarities(ctx)  # (b, L)
        trace.similarity = sims.T.tolist()  # per layer l: [sim_l of each sample]
        trace.memory_features = self.memory_features
        trace.memory_layers = [self.drop_degraded_layer(ctx, layer, sims[:, layer])
                               for layer in range(ctx.num_layers)]
        trace.dropped_layers = [r["layer"] for r in trace.memory_layers if r["bytes_saved"] > 0]
        trace.kv_bytes_before = sum(r["bytes_before"] for r in trace.memory_layers)
        trace.kv_bytes_saved = sum(r["bytes_saved"] for r in trace.memory_layers)
        trace.kv_bytes_after = trace.kv_bytes_before - trace.kv_bytes_saved

    def drop_degraded_layer(self, ctx, layer: int, sims: torch.Tensor) -> dict:
        """Drop layer ``layer``'s visual cache entries (``ctx.drop_visual_kv``) if every sample is degraded
        there (sims (b,)); returns the layer's row of ``trace.memory_layers``."""
        visual_entries = ctx.visual_kv_entries(layer)
        degraded = self.degraded(sims, layer).tolist()
        row = {"layer": layer, "similarity": sims.tolist(), "degraded": degraded,
               "visual_entries": visual_entries, "dropped": [0] * len(visual_entries),
               "bytes_before": ctx.kv_bytes(layer), "bytes_saved": 0, "note": ""}
        if not all(degraded):
            if any(degraded):
                row["note"] = "not dropped: only some samples degraded (a batch drops what every sample drops)"
            return row
        freed = ctx.drop_visual_kv(layer)
        if freed is None:
            row["note"] = "not dropped: the samples cannot keep equal entry counts (drop_kv needs it)"
            return row
        row["dropped"] = visual_entries
        row["bytes_saved"] = freed
        return row

    def degraded(self, sims: torch.Tensor, layer: int) -> torch.Tensor:
        """(b,) bool: sim_l < M. Layer 0 is never dropped: with ``memory_features="input"`` its V_0 is
        the reference itself (sim_0 = 1); with ``"output"`` its sim_0 is logged, but the engine reads the
        sequence length (generate's positions) from layer 0's cache, which must stay whole."""
        return torch.zeros_like(sims, dtype=torch.bool) if layer == 0 else sims < self.memory_threshold

    def layer_similarities(self, ctx) -> torch.Tensor:
        """(b, L) float32 sim_l per sample, computed on the fly during the prefill (:meth:`install`):
        layer l's visual rows (its input, or with ``memory_features="output"`` its output) against the
        same tokens' rows entering layer 0 (V_0, matched by original visual index). Input reading:
        sim_0 = 1 by definition."""
        sims = ctx.state.sims
        return torch.stack([sims[layer] for layer in range(ctx.num_layers)], dim=1)

    # -- FLOPs ---------------------------------------------------------------------------------
    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """Every layer sees the stage's output. Fixed mode: budget(N_vis, retention), exact. Adaptive
        mode: NOMINAL budget(N_vis, nominal_retention) (the summary's 12% average on LLaVA-OV); the real
        counts depend on the video (the trace's ``visual_tokens_per_layer``, the harness's
        ``prefill_tflops_measured``). The memory stage changes decoding only."""
        if not self.visual:
            return [n_visual] * num_layers
        share = self.retention if self.mode == "fixed" else self.nominal_retention
        return [budget(n_visual, share)] * num_layers
