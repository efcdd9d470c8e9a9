"""ShaRP (Xia et al.): shallow-layer attention pruning with SegM, PosC and RegD.

``sharp.prune(bb, "sharp", retention=0.282)`` prunes once, before decoder layer ``layer`` (default 1:
"pruning at the first decoder layer", layer 0 sees every token):

1. SegM (Sec. 4.1, :mod:`sharp.segm`): frame segments from the frame means of the visual tokens
   entering the LLM (Eq. 3, tau_seg); in the layers before the pruning point visual tokens attend
   only to visual tokens of their own segment (Eq. 4) through the ``attention_mask`` hook.
2. Score: attention of the last token (mean over heads) in the map produced by layer ``layer-1``
   (FastV's convention, recomputed from that layer's input, no N x N matrix); ``score_at="stage"``
   reads layer ``layer``'s map instead (computed from its input, i.e. after SegM).
3. PosC (Sec. 4.2, Eq. 5): ``a - lam * b`` where ``b`` is the same score for an all-black video of
   the same layout, from one probe forward; cached per layout in memory and on disk.
4. Top-K by the calibrated score over all visual tokens, K = round(retention x N_vis).
5. RegD (Sec. 4.3, :mod:`sharp.regd`): per segment pre-filtering, deduplication, post-filling,
   so that exactly K visual tokens go on.

Every reading of the paper's text is documented in docs/sharp.md next to its equation.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sharp.engine import cuda_sync
from sharp.methods import PruningMethod, Selection, budget, register_method
from sharp.regd import ABSORB_MODES, CLUSTER_MODES, DEDUP_MODES, FILL_MODES, regd as run_regd
from sharp.segm import frame_segments, segment_mask, token_segment_ids

SCORE_AT = ("previous", "stage")
POSC_SPACES = ("prob", "logit")
POSC_KEYS = ("layout", "prompt")
SOFTMAX_OVER = ("all", "visual")
TIME_KEYS = ("attn", "filter", "dedup", "fill")

# PosC bias cache shared by every ShaRP instance of the process: key -> (n_vis,) float32 on CPU
_BIAS_MEMORY: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_BIAS_MEMORY_MAX = 4096
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def default_cache_dir() -> Path:
    """``$SHARP_CACHE_DIR`` or ``~/.cache/sharp``; ShaRP's PosC biases go to its ``posc/`` folder."""
    return Path(os.environ.get("SHARP_CACHE_DIR", "~/.cache/sharp")).expanduser()


def clear_bias_memory() -> None:
    """Forget the in-memory PosC biases (the disk cache is untouched)."""
    _BIAS_MEMORY.clear()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights (names, shapes, first values of every parameter).

    Part of the PosC cache key, so a cached bias is never reused for other weights that share a
    backbone name (e.g. tiny random models built with another seed).
    """
    fp = _FINGERPRINTS.get(model)
    if fp is None:
        h = hashlib.sha1()
        with torch.no_grad():
            for name, p in model.named_parameters():
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
                h.update(p.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
        fp = h.hexdigest()[:16]
        _FINGERPRINTS[model] = fp
    return fp


@dataclass
class _PrefillState:
    call: int  # trace.prefill_calls of the prefill this state belongs to
    segments: list  # per sample: [(first_frame, last_frame), ...]
    token_segments: list  # per sample: (n_vis,) long segment id of every ORIGINAL visual index
    mask: Optional[torch.Tensor] = None  # SegM restriction of the unpruned sequence (b, 1, s, s)


@register_method
@dataclass
class ShaRP(PruningMethod):
    """ShaRP with the paper's settings as defaults (Sec. 5.1). See docs/sharp.md."""

    name = "sharp"
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
    layer: int = 1  # the first layer that sees the pruned sequence
    # readings of ambiguous text (docs/sharp.md)
    score_at: str = "previous"  # "previous": layer-1's attention map (FastV) | "stage": layer's own
    posc_space: str = "prob"  # Eq. 5 on post-softmax scores | "logit": pre-softmax (Eq. 2's a~)
    softmax_over: str = "all"  # softmax over all keys (FastV) | "visual": visual keys only
    segm_layers: Optional[int] = None  # SegM in layers [0, segm_layers); None = every layer < layer
    segm_sees_text: bool = True  # visual queries also see the text before the video (Eq. 4: not)
    absorb: str = "mean"  # what absorbing does: "mean" of the hidden states | "drop"
    dedup: str = "pivot"  # compare with the current pivot | "adjacent": with the previous token
    cluster: str = "first"  # join the cluster whose first token is similar | "adjacent"
    fill: str = "segment"  # refill each segment's dedup losses | "global": best centres anywhere
    # FLOPs matching: retention is the target method's, ShaRP's own is solved for equal TFLOPs
    match_flops: Optional[str] = None  # e.g. "fastv"
    match_kwargs: Optional[dict] = None  # the target method's kwargs (fastv: layer=2 default)
    flops_backbone: Optional[str] = None  # backbone name for token_schedule outside a session
    # PosC cache
    cache_dir: Optional[str] = None  # None: $SHARP_CACHE_DIR or ~/.cache/sharp; "": no disk cache
    posc_key: str = "layout"  # bias per layout | "prompt": per layout and prompt token ids

    _state: Optional[_PrefillState] = field(default=None, init=False, repr=False, compare=False)
    _backbone: Any = field(default=None, init=False, repr=False, compare=False)
    _matched: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        for key, valid in (("score_at", SCORE_AT), ("posc_space", POSC_SPACES), ("softmax_over", SOFTMAX_OVER),
                           ("absorb", ABSORB_MODES), ("dedup", DEDUP_MODES), ("cluster", CLUSTER_MODES),
                           ("fill", FILL_MODES), ("posc_key", POSC_KEYS)):
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

    # -- where it acts ---------------------------------------------------------------------
    @property
    def score_layer(self) -> int:
        return self.layer - 1 if self.score_at == "previous" else self.layer

    @property
    def n_segm_layers(self) -> int:
        return self.layer if self.segm_layers is None else self.segm_layers

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
        bb_key = bb if isinstance(bb, str) else bb.name
        key = (bb_key, n_visual)
        if key not in self._matched:
            from sharp import flops

            self._matched[key] = flops.match_retention(
                bb, "sharp", self.match_flops, self.retention, visual_tokens=n_visual,
                target_kwargs=self.match_kwargs, layer=self.layer)
        return self._matched[key]

    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        kept = budget(n_visual, self.effective_retention(n_visual, backbone))
        return [n_visual if layer < self.layer else kept for layer in range(num_layers)]

    # -- session hooks -----------------------------------------------------------------------
    def install(self, session) -> None:
        self._backbone = session.backbone
        self._state = None

    def after_prefill(self, session) -> None:
        # Table 4's "LLM Fw.": the engine's prefill time minus ShaRP's own steps
        times = session.trace.stage_times
        ours = sum(times.get(k, 0.0) for k in TIME_KEYS + ("probe",))
        times["forward"] = max(0.0, times["prefill"] - ours)

    def _prefill_state(self, session, hidden0: Optional[torch.Tensor] = None) -> _PrefillState:
        """Segments of the current prefill (computed once, from the visual tokens entering the LLM)."""
        call = session.trace.prefill_calls
        if self._state is not None and self._state.call == call:
            return self._state
        state = session.state
        if hidden0 is None:
            hidden0 = state.layer_inputs[0][0]
        layout = state.layout
        seq = state.seq
        segments, token_segments = [], []
        for b in range(hidden0.shape[0]):
            pos = seq.visual_mask[b].nonzero().squeeze(1)
            segs = frame_segments(hidden0[b, pos], layout.frames, layout.tokens_per_frame, self.tau_seg)
            segments.append(segs)
            token_segments.append(token_segment_ids(segs, layout.tokens_per_frame, device=hidden0.device))
        self._state = _PrefillState(call=call, segments=segments, token_segments=token_segments)
        session.trace.segments = segments
        return self._state

    def attention_mask(self, session, layer_idx: int) -> Optional[torch.Tensor]:
        if not self.segm or layer_idx >= self.n_segm_layers or session.state.phase != "prefill":
            return None  # the PosC probe runs without SegM: a black video is one segment anyway
        device = session.backbone.device
        cuda_sync(device)
        t0 = time.perf_counter()
        st = self._prefill_state(session)
        seq = session.state.seq
        unpruned = layer_idx < self.layer
        if unpruned and st.mask is not None:
            mask = st.mask
        elif all(len(s) == 1 for s in st.segments):
            mask = None  # one segment per sample: no restriction (and the model's own fast path)
        else:
            b, s = seq.visual_mask.shape
            positions = [seq.visual_mask[i].nonzero().squeeze(1) for i in range(b)]
            ids = [st.token_segments[i][seq.visual_index[i, positions[i]]] for i in range(b)]
            mask = segment_mask(s, positions, ids, visual_sees_text=self.segm_sees_text, device=device)
            if unpruned:
                st.mask = mask
        cuda_sync(device)
        session.trace.add_time("attn", time.perf_counter() - t0)
        return mask

    # -- scoring ---------------------------------------------------------------------------
    def _scores(self, ctx) -> torch.Tensor:
        """(b, s) float32 score of every position (only visual positions are read)."""
        return ctx.last_token_attention(layer=self.score_layer, softmax_over=self.softmax_over,
                                        space=self.posc_space)

    def _bias_keys(self, ctx) -> list[str]:
        session, layout = ctx.session, ctx.layout
        inputs = session.prefill_inputs
        ids = inputs["input_ids"]
        mask2d = ctx.attention_mask_2d
        common = (
            f"{ctx.backbone.name}|{model_fingerprint(ctx.backbone.model)}|{ctx.backbone.dtype}|"
            f"{ctx.hidden_states.device.type}|{layout.n_visual}x{layout.frames}x{layout.tokens_per_frame}"
            f"x{layout.grid}|s={ids.shape[1]}|pos_ids={'position_ids' in inputs}|L={self.score_layer}|"
            f"{self.score_at}|{self.posc_space}|{self.softmax_over}"
        )
        keys = []
        for b in range(ids.shape[0]):
            vis = ctx.visual_positions(b)
            real = mask2d[b].bool()
            before = int(real[: int(vis[0])].sum())
            pads = int((~real).sum())
            key = f"{common}|pads={pads}|before={before}"
            if self.posc_key == "prompt":
                key += "|ids=" + hashlib.sha1(ids[b][real.to(ids.device)].cpu().numpy().tobytes()).hexdigest()
            keys.append(key)
        return keys

    def _disk_path(self, key: str) -> Optional[Path]:
        if self.cache_dir == "":
            return None
        root = Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()
        return root / "posc" / (hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def positional_bias(self, ctx) -> torch.Tensor:
        """(b, n_vis) PosC bias b_{i,T}: the score of each visual position for an all-black video."""
        keys = self._bias_keys(ctx)
        found: dict[int, torch.Tensor] = {}
        for b, key in enumerate(keys):
            if key in _BIAS_MEMORY:
                _BIAS_MEMORY.move_to_end(key)
                found[b] = _BIAS_MEMORY[key]
                continue
            path = self._disk_path(key)
            if path is not None and path.is_file():
                try:
                    blob = torch.load(path, map_location="cpu", weights_only=True)
                    if blob.get("key") == key:
                        found[b] = blob["bias"]
                except Exception:  # a corrupt/partial file: recompute
                    pass
        if len(found) < len(keys):
            device = ctx.hidden_states.device
            cuda_sync(device)
            t0 = time.perf_counter()

            def measure(pctx):
                scores = self._scores(pctx)
                return [scores[b, pctx.visual_positions(b)].float().cpu() for b in range(scores.shape[0])]

            probed = ctx.probe(ctx.backbone.black_inputs, measure)
            cuda_sync(device)
            ctx.session.trace.add_time("probe", time.perf_counter() - t0)
            for b, key in enumerate(keys):
                if b in found:
                    continue
                found[b] = probed[b]
                path = self._disk_path(key)
                if path is not None:
                    try:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_suffix(f".tmp{os.getpid()}")
                        torch.save({"key": key, "bias": probed[b]}, tmp)
                        os.replace(tmp, path)
                    except OSError as err:  # read-only cache: keep going with the memory cache
                        print(f"sharp: could not write the PosC cache {path}: {err}", file=sys.stderr)
        for b, key in enumerate(keys):
            _BIAS_MEMORY[key] = found[b]
            _BIAS_MEMORY.move_to_end(key)
        while len(_BIAS_MEMORY) > _BIAS_MEMORY_MAX:
            _BIAS_MEMORY.popitem(last=False)
        return torch.stack([found[b] for b in range(len(keys))]).to(ctx.hidden_states.device)

    def calibrated_scores(self, ctx) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Eq. 5 over the current visual tokens: ((b, n_vis) a_{i,T} - lam * b_{i,T}, bias or None).

        Without PosC (posc=False or lam == 0) no probe runs and the scores are a_{i,T} unchanged.
        """
        scores = self._scores(ctx)
        a = torch.stack([scores[b, ctx.visual_positions(b)] for b in range(scores.shape[0])]).float()
        if not self.posc or self.lam == 0:
            return a, None
        bias = self.positional_bias(ctx)
        return a - self.lam * bias, bias

    # -- selection -------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        session, trace = ctx.session, ctx.session.trace
        device = ctx.hidden_states.device
        cuda_sync(device)
        t0 = time.perf_counter()
        probe0 = trace.stage_times.get("probe", 0.0)
        state = self._prefill_state(session, hidden0=ctx.hidden_states if ctx.layer_idx == 0 else None)
        n_vis = ctx.layout.n_visual
        retention = self.effective_retention(n_vis, ctx.backbone)
        k = budget(n_vis, retention)
        calibrated, bias = self.calibrated_scores(ctx)
        topk = [torch.topk(calibrated[b], k).indices for b in range(calibrated.shape[0])]
        cuda_sync(device)
        t1 = time.perf_counter()
        trace.add_time("attn", t1 - t0 - (trace.stage_times.get("probe", 0.0) - probe0))  # probe: own key
        trace.sharp_retention = retention
        trace.sharp_budget = k
        trace.visual_scores = calibrated.cpu()  # (b, n_vis) Eq. 5 scores of the current visual tokens
        trace.visual_bias = None if bias is None else bias.cpu()  # (b, n_vis) PosC bias b_{i,T}
        trace.visual_after_topk = [ctx.current_visual_index(b)[t].sort().values.cpu() for b, t in enumerate(topk)]
        if not self.regd:
            trace.visual_after_regd = [t.clone() for t in trace.visual_after_topk]
            return Selection(keep_visual=topk)

        keep, new_hidden = [], None
        for b, reg in enumerate(topk):
            pos = ctx.visual_positions(b)
            seg_ids = state.token_segments[b][ctx.current_visual_index(b)]
            r = run_regd(
                ctx.hidden_states[b, pos], calibrated[b], reg, seg_ids, tau_filter=self.tau_filter,
                tau_merge=self.tau_merge, tau_cluster=self.tau_cluster, beta=self.beta, absorb=self.absorb,
                dedup=self.dedup, cluster=self.cluster, fill=self.fill)
            for key in ("filter", "dedup", "fill"):
                trace.add_time(key, r.times[key])
            keep.append(r.keep)
            if r.kept_hidden is not None:  # absorb="mean": kept tokens carry what they absorbed
                if new_hidden is None:
                    new_hidden = ctx.hidden_states.clone()
                new_hidden[b, pos[r.keep]] = r.kept_hidden
        trace.visual_after_regd = [ctx.current_visual_index(b)[kk].sort().values.cpu() for b, kk in enumerate(keep)]
        return Selection(keep_visual=keep, hidden_states=new_hidden)


def matched_retention(backbone, target: str = "fastv", retention: float = 0.25, n_visual: Optional[int] = None,
                      target_kwargs: Optional[dict] = None, **sharp_kwargs) -> float:
    """ShaRP's retention whose prefill TFLOPs equal ``target`` at ``retention`` (Table 1: 0.25 -> ~0.282)."""
    from sharp import flops

    return flops.match_retention(backbone, "sharp", target, retention, visual_tokens=n_visual,
                                 target_kwargs=target_kwargs, **sharp_kwargs)
