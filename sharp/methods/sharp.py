"""ShaRP (Xia et al.): shallow-layer attention pruning with SegM, PosC and RegD.

``sharp.prune(bb, "sharp", retention=0.282)`` prunes once, before decoder layer ``layer`` (default 1:
"pruning at the first decoder layer", layer 0 sees every token):

1. SegM (Sec. 4.1, :mod:`sharp.methods.segm`): frame segments from the frame means of the visual
   tokens entering the LLM (Eq. 3, tau_seg); in the layers before the pruning point visual tokens
   attend only to the visual tokens of their own segment (Eq. 4; ``segm_sees_text=True``: and to the
   text before the video) through the ``attention_mask`` hook. ``segm_pass="forward"`` (default):
   in the model's own forward; ``"scoring"``: only in a recomputation of those layers that feeds the
   ranking (one probe forward of the unmodified inputs), the model's forward keeps its causal mask.
2. Score: attention of the last token (mean over heads) in layer ``layer``'s map, computed from its
   input, i.e. after the SegM-masked layer(s), so the question and SegM shape the ranking (Sec. 4.3;
   no N x N matrix); ``score_at="previous"`` reads the map produced by layer ``layer-1`` (FastV's
   convention; with layer 1 that map is computed from the embeddings alone). ``posc_space``:
   pre-softmax logits (Eq. 2's a~, default) or post-softmax probabilities.
3. PosC (Sec. 4.2, Eq. 5, :mod:`sharp.methods.posc`): ``a - lam * b`` where ``b`` is the same score
   (same SegM mask) for an all-black video of the same layout, from one probe forward; cached.
4. Top-K by the calibrated score over all current visual tokens, K = round(retention x N_vis).
5. RegD (Sec. 4.3, :mod:`sharp.methods.regd`): per segment pre-filtering, deduplication,
   post-filling, so that exactly K visual tokens go on.

Composed after another method (``visionzip+sharp``): ShaRP works on the CURRENT visual tokens.
Segments are computed from the frames that still have tokens at layer 0's input (Eq. 3 over the
surviving tokens' frame means); the PosC probe replays the earlier stages' selections, so the bias
has one entry per current token; K stays a share of the ORIGINAL count (at most the current one).

Every reading of the paper's text is documented in docs/sharp.md next to its equation. Results go
to ``trace.method("sharp")``: retention, budget, segments, scores, bias, after_topk, after_regd.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sharp.engine.method import PruningMethod, Selection, budget, layer_kwarg
from sharp.methods.posc import POSC_KEYS, BiasCache, default_cache_dir, positional_bias
from sharp.methods.regd import ABSORB_MODES, CENTRE_MODES, CLUSTER_MODES, DEDUP_MODES, FILL_MODES, regd as run_regd
from sharp.methods.segm import token_segments

SCORE_AT = ("previous", "stage")
POSC_SPACES = ("prob", "logit")
SOFTMAX_OVER = ("all", "visual")
REGD_SEGMENTS = ("eq3", "video")
SEGM_PASSES = ("forward", "scoring")


@dataclass
class ShaRP(PruningMethod):
    """ShaRP with the paper's settings as defaults (Sec. 5.1). See docs/sharp.md."""

    name = "sharp"
    identity_at_full_retention = False  # segm_pass="forward" (default): SegM changes layer 0 even at retention 1
    # components (Table 5's variants)
    posc: bool = True
    segm: bool = True
    regd: bool = True
    # paper hyper-parameters (Sec. 5.1)
    lam: float = 0.6
    beta: float = 0.008
    tau_seg: float = 0.9
    tau_filter: float = 0.7
    tau_merge: float = 0.8
    tau_cluster: float = 0.4
    layer: int = layer_kwarg(1, scaling="fixed", lowest=0)  # the first layer that sees the pruned sequence
    # readings of ambiguous text (docs/sharp.md)
    score_at: str = "stage"  # "stage": layer's own map, after SegM (Sec. 4.3) | "previous": layer-1's (FastV)
    posc_space: str = "prob"  # post-softmax attention (measured, docs/sharp.md) | "logit": Eq. 2/5's a~ literally
    softmax_over: str = "all"  # softmax over all keys (FastV) | "visual": visual keys only ("prob" only)
    segm_pass: str = "forward"  # SegM in the model's forward | "scoring": only in the pass that ranks
    segm_layers: Optional[int] = None  # SegM in layers [0, segm_layers); None = every layer < layer
    segm_sees_text: bool = True  # visual rows also see the text before the video (measured) | False: Eq. 4 literally
    absorb: str = "mean"  # what absorbing does: "mean" of the hidden states | "drop"
    dedup: str = "pivot"  # compare with the current pivot | "adjacent": with the previous token
    cluster: str = "first"  # join the cluster whose first token is similar | "adjacent"
    centre: str = "first"  # a cluster's centre c_k: its first token | "medoid" | "mean" (docs/sharp.md)
    fill: str = "segment"  # refill each segment's dedup losses | "global": best centres anywhere
    regd_segments: str = "eq3"  # RegD's unit: Eq. 3's segments (also with segm=False) | "video": one segment
    # FLOPs matching: retention is the target method's, ShaRP's own is solved for equal TFLOPs
    match_flops: Optional[str] = None  # e.g. "fastv"
    match_kwargs: Optional[dict] = None  # the target method's kwargs (fastv: layer=2 default)
    flops_backbone: Optional[str] = None  # backbone name for token_schedule outside a session
    # PosC cache
    cache_dir: Optional[str] = None  # None: $SHARP_CACHE/posc; "": no disk cache
    posc_key: str = "layout"  # bias per layout | "prompt": per layout and prompt token ids

    _backbone: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        for key, valid in (("score_at", SCORE_AT), ("posc_space", POSC_SPACES), ("softmax_over", SOFTMAX_OVER),
                           ("segm_pass", SEGM_PASSES), ("absorb", ABSORB_MODES), ("dedup", DEDUP_MODES),
                           ("cluster", CLUSTER_MODES), ("centre", CENTRE_MODES), ("fill", FILL_MODES),
                           ("posc_key", POSC_KEYS), ("regd_segments", REGD_SEGMENTS)):
            if getattr(self, key) not in valid:
                options = ", ".join(map(repr, valid))
                raise ValueError(f"sharp: {key} must be one of {options}, got {getattr(self, key)!r}")
        if self.score_at == "previous" and self.layer < 1:
            raise ValueError(
                f"sharp: layer must be >= 1 with score_at='previous' (it scores with layer-1), got {self.layer}")
        if self.layer < 0:
            raise ValueError(f"sharp: layer must be >= 0, got {self.layer}")
        if self.posc_space == "logit" and self.softmax_over != "all":
            raise ValueError("sharp: softmax_over only applies to posc_space='prob'")
        if self.segm_layers is not None and self.segm_layers < 0:
            raise ValueError(f"sharp: segm_layers must be >= 0, got {self.segm_layers}")
        folder = None if self.cache_dir == "" else (
            Path(self.cache_dir).expanduser() / "posc" if self.cache_dir is not None else default_cache_dir())
        self._bias_cache = BiasCache(folder)

    # -- where it acts ---------------------------------------------------------------------
    @property
    def score_layer(self) -> int:
        return self.layer - 1 if self.score_at == "previous" else self.layer

    @property
    def n_segm_layers(self) -> int:
        """SegM's layers are [0, n_segm_layers) ("scoring": at most the layers before ``layer``)."""
        n = self.layer if self.segm_layers is None else self.segm_layers
        return min(n, self.layer) if self.segm_pass == "scoring" else n

    @property
    def segm_feeds_score(self) -> bool:
        """Whether a SegM-masked layer lies before the layer whose input the score reads."""
        return self.segm and min(self.n_segm_layers, self.score_layer) > 0

    def stages(self, num_layers: int) -> list[int]:
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"sharp: layer must be in 0..{num_layers - 1}, got {self.layer}")
        return [self.layer]

    def score_layers(self, num_layers: int) -> list[int]:
        # layer 0's input = the visual tokens entering the LLM: Eq. 3's segments are computed from it
        layers = {0} if self.layer > 0 else set()
        if self.score_layer != self.layer:
            layers.add(self.score_layer)
        return sorted(layers)

    # -- retention / FLOPs matching ----------------------------------------------------------
    def effective_retention(self, n_visual: int, backbone=None) -> float:
        """ShaRP's own retention: ``retention``, or the FLOPs-matched one when ``match_flops`` is set."""
        if self.match_flops is None:
            return self.retention
        bb = backbone if backbone is not None else (self._backbone or self.flops_backbone)
        if bb is None:
            raise ValueError(
                "sharp: match_flops needs the backbone's sizes outside a sharp.prune session: pass "
                "flops_backbone=<backbone name>")
        name = bb if isinstance(bb, str) else bb.name
        kwargs = tuple(sorted((self.match_kwargs or {}).items()))
        return _matched_retention(name, n_visual, self.match_flops, self.retention, kwargs, self.layer)

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        kept = budget(n_visual, self.effective_retention(n_visual, backbone))
        return [n_visual if layer < self.layer else kept for layer in range(num_layers)]

    # -- session hooks -----------------------------------------------------------------------
    def install(self, ctx) -> None:
        self._backbone = ctx.backbone_name  # FLOPs matching outside a stage (token_schedule) needs the sizes

    # -- SegM (Sec. 4.1) ---------------------------------------------------------------------
    def segments(self, ctx) -> list[torch.Tensor]:
        """Per sample, the segment id of every ORIGINAL visual index (-1: not present at layer 0),
        computed once per prefill from layer 0's input (Eq. 3 over the frames that have tokens)."""
        st = ctx.state
        if getattr(st, "segment_of_index", None) is None:
            src = ctx if ctx.layer_idx == 0 else ctx.recorded(0)
            segments, ids = [], []
            for b in range(src.batch_size):
                tokens = src.visual_tokens(b)
                segs, seg_ids = token_segments(src.rows(b, tokens.positions), tokens.frame, self.tau_seg)
                of_index = torch.full((ctx.n_visual,), -1, dtype=torch.long, device=seg_ids.device)
                of_index[tokens.index] = seg_ids
                segments.append(segs)
                ids.append(of_index)
            st.segment_of_index = ids
            ctx.trace.segments = segments
        return st.segment_of_index

    def attention_mask(self, ctx) -> Optional[torch.Tensor]:
        """Eq. 4 in layers [0, n_segm_layers): in the prefill with segm_pass="forward"; in a probe this
        method runs (the scoring pass, the PosC probe) with the segments it set in ``state.probe_segments``."""
        if not self.segm or ctx.layer_idx >= self.n_segm_layers:
            return None
        if ctx.phase == "prefill" and self.segm_pass == "forward":
            with ctx.timed("attn"):
                return self._segment_restriction(ctx, self.segments(ctx))
        if ctx.phase == "probe" and getattr(ctx.state, "probe_segments", None) is not None:
            return self._segment_restriction(ctx, ctx.state.probe_segments)  # timed by the probe's owner
        return None

    def _segment_restriction(self, ctx, segment_of_index):
        """SegM's restriction for this layer's sequence (``ctx.segment_restriction``: structured, built
        once per sequence; None when every sample is one segment that sees the text)."""
        return ctx.segment_restriction(segment_of_index, visual_sees_text=self.segm_sees_text)

    def _restricts(self, segment_of_index) -> bool:
        """Whether Eq. 4's mask changes anything for these segments (several segments in a sample, or
        visual rows that may not see the text)."""
        return not self.segm_sees_text or any(int(s.max()) > 0 for s in segment_of_index)

    def _with_probe_segments(self, ctx, segment_of_index, probe_inputs, fn):
        """``ctx.probe(probe_inputs, fn)`` with SegM applied in the probe's layers [0, n_segm_layers)."""
        st = ctx.state
        st.probe_segments = segment_of_index if self.segm else None
        try:
            return ctx.probe(probe_inputs, fn)
        finally:
            st.probe_segments = None

    # -- scoring and PosC (Sec. 4.2) -----------------------------------------------------------
    def _scores(self, ctx) -> torch.Tensor:
        """(b, s) float32 score of every position (only visual positions are read). segm_pass="scoring":
        the layers before the score layer are recomputed under Eq. 4's mask (a probe forward of the
        unmodified inputs, earlier stages replayed) and the score is read there; the prefill's own
        hidden states stay causal."""
        if self.segm_pass == "scoring" and ctx.phase == "prefill" and self.segm_feeds_score:
            of_index = self.segments(ctx)
            if self._restricts(of_index):
                scores = self._with_probe_segments(ctx, of_index, _unchanged, self._read_scores)
                if scores.shape != (ctx.batch_size, ctx.seq_len):
                    raise RuntimeError(f"sharp: scoring pass returned {tuple(scores.shape)}, expected "
                                       f"{(ctx.batch_size, ctx.seq_len)}")
                return scores.to(ctx.hidden_states.device)
        return self._read_scores(ctx)

    def _read_scores(self, ctx) -> torch.Tensor:
        """(b, s) float32: last-token attention (``posc_space``) in the score layer of this context."""
        return ctx.last_token_attention(layer=self.score_layer, softmax_over=self.softmax_over,
                                        space=self.posc_space)

    def _black_segments(self, ctx) -> list[torch.Tensor]:
        """The PosC probe's segments: Eq. 3 on a black video finds one segment (identical frames)."""
        return [torch.zeros(ctx.n_visual, dtype=torch.long, device=ctx.hidden_states.device)
                for _ in range(ctx.batch_size)]

    def calibrated_scores(self, ctx) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Eq. 5 over the current visual tokens: ((b, n_max) a_{i,T} - lam * b_{i,T}, bias or None);
        entries past a sample's count are -inf. Without PosC (posc=False or lam == 0) no probe runs."""
        a = ctx.gather_visual(self._scores(ctx))
        if not self.posc or self.lam == 0:
            return a, None
        reading = f"L={self.score_layer}|{self.score_at}|{self.posc_space}|{self.softmax_over}"
        black_segments = None
        if self.segm_feeds_score and not self.segm_sees_text:  # one segment that restricts: the bias sees it
            black_segments = self._black_segments(ctx)
            reading += f"|segm<{self.n_segm_layers}|no-text"

        def probe(modify, fn):
            return self._with_probe_segments(ctx, black_segments, modify, fn)

        bias = positional_bias(ctx, self._read_scores, self._bias_cache, reading,
                               per_prompt=self.posc_key == "prompt", probe=probe)
        return a - self.lam * bias, bias

    # -- selection (Sec. 4.3) --------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        with ctx.timed("attn", excluding=("probe",)):  # PosC's probe forward has its own column
            of_index = self.segments(ctx)
            retention = self.effective_retention(ctx.n_visual, ctx.backbone_name)
            k = ctx.budget(retention)
            calibrated, bias = self.calibrated_scores(ctx)
            topk = Selection.top_k(calibrated, k).keep_visual
        self._record(ctx, retention, k, calibrated, bias, topk)
        if not self.regd:
            ctx.trace.after_regd = [t.clone() for t in ctx.trace.after_topk]
            return Selection(keep_visual=topk)
        keep, new_rows = self._deduplicate(ctx, calibrated, topk, of_index)
        ctx.trace.after_regd = [ctx.current_visual_index(b)[kk].sort().values.cpu() for b, kk in enumerate(keep)]
        return Selection(keep_visual=keep, new_rows=new_rows)

    def _record(self, ctx, retention, k, calibrated, bias, topk) -> None:
        t = ctx.trace
        t.retention = retention
        t.budget = k[0] if len(set(k)) == 1 else k
        t.scores = calibrated.cpu()  # (b, n_max) Eq. 5 scores of the current visual tokens
        t.bias = None if bias is None else bias.cpu()  # (b, n_max) PosC bias b_{i,T}
        t.after_topk = [ctx.current_visual_index(b)[x].sort().values.cpu() for b, x in enumerate(topk)]

    def _deduplicate(self, ctx, calibrated, topk, of_index):
        """RegD per sample on the stage's input hidden states; kept tokens may absorb dropped ones.
        Returns (keep per sample, :attr:`Selection.new_rows` of the tokens that absorbed, or None)."""
        keep, new_rows = [], []
        for b, registers in enumerate(topk):
            tokens = ctx.visual_tokens(b)
            segment_ids = of_index[b][tokens.index]
            if self.regd_segments == "video" and not self.segm:
                segment_ids = torch.zeros_like(segment_ids)  # SegM off: the whole video is one unit
            r = run_regd(
                ctx.rows(b, tokens.positions), calibrated[b, : len(tokens)], registers,
                segment_ids, tau_filter=self.tau_filter, tau_merge=self.tau_merge,
                tau_cluster=self.tau_cluster, beta=self.beta, absorb=self.absorb, dedup=self.dedup,
                cluster=self.cluster, fill=self.fill, clock=ctx.now, centre=self.centre)
            for key in ("filter", "dedup", "fill"):
                ctx.add_time(key, r.times[key])
            keep.append(r.keep)
            if r.kept_hidden is not None:  # absorb="mean": kept tokens carry what they absorbed
                new_rows.append((tokens.positions[r.keep], r.kept_hidden))
            else:
                new_rows.append((tokens.positions[:0], ctx.hidden_states[b, :0]))
        return keep, new_rows if any(len(p) for p, _ in new_rows) else None


def _unchanged(inputs: dict) -> dict:
    """The scoring pass's probe inputs: the prefill's own."""
    return inputs


@functools.lru_cache(maxsize=1024)
def _matched_retention(backbone: str, n_visual: int, target: str, retention: float, target_kwargs: tuple,
                       layer: int) -> float:
    """FLOPs matching depends on sizes only: solved once per (backbone, N_vis, target, ...)."""
    from sharp import flops

    return flops.match_retention(backbone, "sharp", target, retention, visual_tokens=n_visual,
                                 target_kwargs=dict(target_kwargs), layer=layer)


def matched_retention(backbone, target: str = "fastv", retention: float = 0.25, n_visual: Optional[int] = None,
                      target_kwargs: Optional[dict] = None, **sharp_kwargs) -> float:
    """ShaRP's retention whose prefill TFLOPs equal ``target`` at ``retention`` (Table 1: 0.25 -> ~0.282)."""
    from sharp import flops

    return flops.match_retention(backbone, "sharp", target, retention, visual_tokens=n_visual,
                                 target_kwargs=target_kwargs, **sharp_kwargs)
