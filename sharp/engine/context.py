"""What a method sees of the engine: :class:`StageContext` (one layer of one prefill) and
:class:`SessionContext` (its ``install`` and ``after_prefill``). Methods never hold the session.

These two classes are the whole of what a method may use (``tests/test_method_api.py`` walks every
method module and fails on ``ctx.seq``, a backbone's HF modules or any other ``sharp.engine`` module):
the plumbing behind each named operation (hooks, the KV cache, masks, positions) lives once here and
in the modules it calls.

The same context is given to ``select`` (a stage before layer ``layer_idx``) and to
``attention_mask`` (every layer). It describes the CURRENT sequence: after earlier stages (of this
method or of methods composed before it) the visual tokens are fewer, and each one carries its
original visual index, its frame and its grid position (:meth:`StageContext.visual_tokens`).
Budgets stay shares of the ORIGINAL visual count (:meth:`StageContext.budget`).
"""
from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch

from sharp.engine.attention import attention_of_last_tokens
from sharp.engine.masks import SegmentRestriction
from sharp.engine.sequence import SeqState
from sharp.engine.method import budget, split_budget

if TYPE_CHECKING:  # pragma: no cover
    from sharp.engine.prefill import PrefillRunner
    from sharp.engine.session import PruningSession


_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights (names, shapes, first values of every parameter), computed
    once per model: part of :attr:`StageContext.model_identity`, so that a cache keyed by it (ShaRP's
    PosC biases) is never reused for other weights that share a backbone name (tiny random models built
    with another seed)."""
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


@dataclass(frozen=True)
class VisualTokens:
    """Sample b's current visual tokens, in sequence order (all (n_b,) long).

    positions: sequence positions in the current sequence; index: ORIGINAL visual index
    (0..N_vis-1); frame: frame (LLaVA-OV) or temporal patch (Qwen2-VL); row, col: position in the
    frame's token grid (``layout.grid``).
    """

    positions: torch.Tensor
    index: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


class StageContext:
    """One layer of one prefill (or probe) as a method sees it."""

    def __init__(self, runner: "PrefillRunner", layer_idx: int, hidden_states: torch.Tensor, seq: SeqState,
                 owner: Optional[int] = None, layer_input: Optional[torch.Tensor] = None):
        self._runner = runner
        self.layer_idx = layer_idx
        # (b, s, d): input of layer ``layer_idx`` (a stage), or the residual stream after its attention
        # (an ``after_attention`` context, whose ``layer_input`` is then the layer's input)
        self.hidden_states = hidden_states
        self.layer_input = hidden_states if layer_input is None else layer_input
        self.seq = seq
        self.owner = owner  # position of the method in the plan's (flattened) method list

    # -- the call -----------------------------------------------------------------------------
    backbone = property(lambda self: self._runner.backbone)  # the engine's (and tests'); methods use the facts below
    backbone_name = property(lambda self: self._runner.backbone.name)  # e.g. "llava_onevision_7b"
    backbone_family = property(lambda self: self._runner.backbone.family)  # e.g. "llava_onevision", "qwen2_vl"
    layout = property(lambda self: self._runner.layout)
    phase = property(lambda self: self._runner.phase)  # "prefill" | "probe"
    num_layers = property(lambda self: self._runner.plan.num_layers)  # decoder layers of the backbone
    prefill_inputs = property(lambda self: self._runner.prefill_inputs)  # the prefill call's kwargs
    batch_size = property(lambda self: self.hidden_states.shape[0])
    seq_len = property(lambda self: self.hidden_states.shape[1])

    # -- the current sequence -------------------------------------------------------------------
    visual_mask = property(lambda self: self.seq.visual_mask)  # (b, s) bool
    visual_index = property(lambda self: self.seq.visual_index)  # (b, s) long, original index or -1
    attention_mask_2d = property(lambda self: self.seq.attention_mask_2d)  # (b, s)
    position_embeddings = property(lambda self: self.seq.position_embeddings)

    @property
    def n_visual(self) -> int:
        """N_vis: the ORIGINAL visual-token count of one sample (budgets are shares of it)."""
        return self.layout.n_visual

    @property
    def visual_counts(self) -> list[int]:
        """Current visual tokens per sample."""
        return self.seq.visual_mask.sum(dim=1).tolist()

    def visual_positions(self, b: int) -> torch.Tensor:
        """Sequence positions of sample b's current visual tokens, in order."""
        return self.seq.visual_positions(b)

    def current_visual_index(self, b: int) -> torch.Tensor:
        """Original visual indices of sample b's current visual tokens."""
        return self.seq.visual_index[b, self.visual_positions(b)]

    def visual_hidden_states(self, b: int) -> torch.Tensor:
        """(n_b, d) hidden states of sample b's current visual tokens."""
        return self.hidden_states[b, self.visual_positions(b)]

    def rows(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        """``hidden_states[b, positions]`` (positions of any shape -> (*shape, d)), READ-ONLY: a view of
        the hidden states, not a copy, when the positions are one ascending run (a video's tokens
        before any pruning), else the gathered rows. Do not write into it."""
        flat = positions.reshape(-1)
        n = flat.numel()
        if n and int(flat[-1]) - int(flat[0]) == n - 1 and (n == 1 or bool((flat.diff() == 1).all())):
            start = int(flat[0])
            return self.hidden_states[b, start:start + n].view(*positions.shape, -1)
        return self.hidden_states[b, positions]

    def visual_tokens(self, b: int) -> VisualTokens:
        """Sample b's current visual tokens with their original index, frame and grid position."""
        pos = self.visual_positions(b)
        index = self.seq.visual_index[b, pos]
        per_frame = self.layout.tokens_per_frame
        within = index % per_frame
        return VisualTokens(positions=pos, index=index, frame=index // per_frame,
                            row=within // self.layout.grid[1], col=within % self.layout.grid[1])

    def budget(self, retention: float) -> list[int]:
        """Kept count per sample: round(retention x N_vis ORIGINAL), at most the current count."""
        k = budget(self.n_visual, retention)
        return [min(k, n) for n in self.visual_counts]

    @staticmethod
    def split_budget(k: int, counts: Sequence[int], rule: str = "cumulative") -> list[int]:
        """``k`` tokens over groups of ``counts`` tokens (frames, windows): :func:`sharp.split_budget`."""
        return split_budget(k, list(counts), rule)

    def newline_position(self, b: int) -> Optional[int]:
        """Sequence position, in the CURRENT sequence, of the separator token the backbone appends after
        sample b's video (LLaVA-OV's trailing ``image_newline``, a text row to the engine), or None: the
        backbone has none, or it is no longer the row after the video's last current visual token."""
        if not getattr(self.backbone, "video_newline", False):
            return None
        newline_origin = self.input_video_start(b) + self.n_visual  # the row after the video's N tokens
        candidate = int(self.visual_positions(b)[-1]) + 1  # only (removed) visual tokens lie between
        origin = self.seq.origin
        if candidate >= origin.shape[1] or int(origin[b, candidate]) != newline_origin:
            return None
        return candidate

    def input_video_start(self, b: int) -> int:
        """Position of sample b's first visual token in the UNPRUNED prefill input (padding included): a
        current visual token's unpruned position minus its original visual index (a video's visual tokens
        are one contiguous run of the input)."""
        first = int(self.visual_positions(b)[0])
        return int(self.seq.origin[b, first]) - int(self.seq.visual_index[b, first])

    def gather_visual(self, values: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """Per-position values (b, s) -> (b, n_max) over each sample's current visual tokens, in
        order; samples with fewer tokens are padded with ``fill`` at the end."""
        counts = self.visual_counts
        out = values.new_full((values.shape[0], max(counts)), fill)
        for b, n in enumerate(counts):
            out[b, :n] = values[b, self.visual_positions(b)]
        return out

    # -- per-method places ------------------------------------------------------------------------
    @property
    def trace(self) -> SimpleNamespace:
        """The owner method's namespace on the trace (results users read: ``trace.method(name)``)."""
        return self._runner.method_trace(self.owner)

    @property
    def state(self) -> SimpleNamespace:
        """The owner method's scratch space for this prefill (emptied when the next prefill starts)."""
        return self._runner.method_state(self.owner)

    def add_time(self, key: str, seconds: float) -> None:
        """Add ``seconds`` to the trace's ``stage_times[key]`` (a method's own timing column)."""
        self._runner.trace.add_time(key, seconds)

    def stage_time(self, key: str) -> float:
        """Seconds recorded so far in this prefill under ``stage_times[key]`` (0 when none)."""
        return self._runner.trace.stage_times.get(key, 0.0)

    def timed(self, key: str, excluding: Sequence[str] = ()):
        """``with ctx.timed("attn"): ...`` adds the block's time (session clock, GPU synced) to
        ``stage_times[key]``; ``excluding=("probe",)`` leaves out what the block itself recorded under
        those keys (a probe forward inside it has its own column)."""
        if not excluding:
            return self._runner.trace.timed(key, self.hidden_states.device)
        return self._timed_excluding(key, tuple(excluding))

    @contextlib.contextmanager
    def _timed_excluding(self, key: str, excluding: tuple) -> Iterator[None]:
        before = sum(self.stage_time(k) for k in excluding)
        t0 = self.now()
        try:
            yield
        finally:
            inner = sum(self.stage_time(k) for k in excluding) - before
            self.add_time(key, self.now() - t0 - inner)

    def now(self) -> float:
        """The session's stage clock (GPU synced), for spans that ``timed`` cannot bracket."""
        return self._runner.trace.now(self.hidden_states.device)

    @property
    def clock(self):
        """The session's stage clock itself (a zero-argument callable; no GPU sync)."""
        return self._runner.trace.clock

    # -- attention restrictions ---------------------------------------------------------------------
    def segment_restriction(self, segment_of_index: Sequence[torch.Tensor], visual_sees_text: bool = True
                            ) -> Optional[SegmentRestriction]:
        """An ``attention_mask`` result restricting visual queries to the visual keys of their own segment
        (ShaRP's Eq. 4): ``segment_of_index[b]`` (N_vis,) long gives the segment of every ORIGINAL visual
        index of sample b (-1: absent). Text rows are not restricted; with ``visual_sees_text`` visual rows
        also see every text key; causality and padding are the engine's. The engine runs it as one
        attention call per segment (no ``s x s`` mask) where it can (:mod:`sharp.engine.masks`).

        Built once per sequence and reused by the following layers on the same sequence; None (no
        restriction) when every sample is one segment that sees the text anyway."""
        cache = self._runner.state.restrictions
        key = (id(segment_of_index), visual_sees_text)
        seq, cached_key, mask = cache.get(self.owner, (None, None, None))
        if seq is not self.seq or cached_key != key:
            mask = _segment_restriction(self.seq, segment_of_index, visual_sees_text, self.hidden_states.device)
            cache[self.owner] = (self.seq, key, mask)
        return mask

    # -- identities for caches ------------------------------------------------------------------------
    @property
    def model_identity(self) -> str:
        """What a cache of model outputs must key on: backbone name, a fingerprint of its weights, dtype
        and device type (``"llava_onevision_7b|3f2a...|torch.bfloat16|cuda"``)."""
        bb = self.backbone
        return f"{bb.name}|{model_fingerprint(bb.model)}|{bb.dtype}|{self.hidden_states.device.type}"

    # -- other layers -----------------------------------------------------------------------------
    def recorded(self, layer: int) -> "StageContext":
        """The context of layer ``layer``'s recorded prefill input (a layer in the method's
        ``score_layers``, not after this one): its hidden states and its sequence."""
        hidden, seq = self._runner.recorded_input(layer)
        return StageContext(self._runner, layer, hidden, seq, self.owner)

    def last_token_attention(self, layer: Optional[int] = None, queries: int = 1, rope: bool = True,
                             softmax_over: str = "all", space: str = "prob", causal: bool = True,
                             reduce: str = "mean") -> torch.Tensor:
        """Attention of the last ``queries`` tokens in layer ``layer`` (default: this layer), read at
        the CURRENT sequence's rows. Returns (b, s) float32.

        softmax(q k^T / sqrt(d_h) + mask) averaged over heads and queries, recomputed from that layer's
        input (input_layernorm, q_proj on the last rows, k_proj on all rows, RoPE) without building
        the N x N matrix. A recorded earlier layer whose sequence was longer (an earlier stage ran in
        between) is computed on ITS sequence and read at the rows still present.
        ``softmax_over="visual"`` normalises over the visual keys only (FEATHER); ``rope=False`` skips
        RoPE (FEATHER's de-RoPE criterion); ``space="logit"`` returns the pre-softmax logits averaged
        the same way (masked keys read 0). ``causal=False``: the query rows see every key, later ones
        too (no causal mask; padding still masked); ``reduce="max"``: the max over heads and queries
        instead of the mean (PruneVid's official non-causal, un-RoPE'd, max-reduced map).
        """
        if softmax_over not in ("all", "visual"):
            raise ValueError(f"softmax_over must be 'all' or 'visual', got {softmax_over!r}")
        src = self if layer is None or layer == self.layer_idx else self.recorded(layer)
        scores = attention_of_last_tokens(
            self.backbone, src.layer_idx, src.layer_input, src.seq.position_embeddings,
            src.seq.attention_mask_2d, queries=queries, rope=rope,
            key_mask=src.seq.visual_mask if softmax_over == "visual" else None, space=space,
            causal=causal, reduce=reduce)
        return self.seq.map_from(src.seq, scores, self._runner.input_length)

    # -- the vision tower ---------------------------------------------------------------------------
    def vision(self, layer: Union[int, str, None] = None):
        """:class:`~sharp.backbones.VisionMaps` of a vision-encoder layer listed in the method's
        ``vision_layers()`` (None / "feature": the layer that feeds the LLM), over the ORIGINAL visual
        tokens (b, N_vis, ...): index them with ``visual_tokens(b).index``."""
        return self._runner.vision_maps(layer)

    def frame_pooling(self, layer: Union[int, str, None] = None):
        """:class:`~sharp.backbones.vision.FramePooling` of a vision layer listed in ``vision_layers()``
        (FastVID's inputs): per frame a global feature ``(b, frames, d_vis)`` and the probe attention over
        the ORIGINAL visual tokens ``(b, N_vis)`` float32. LLaVA families: SigLIP's post_layernorm +
        attention-pooling head on the layer's per-frame output (reloaded from
        google/siglip-so400m-patch14-384 on a pretrained backbone, a seeded random head otherwise: see
        ``source``); Qwen families: the mean-query attention of the layer (no global feature: None).
        Computed once per prefill."""
        return self._runner.frame_pooling(layer)

    # -- probes -----------------------------------------------------------------------------------
    def probe(self, modify_inputs: Callable[[dict], dict], fn: Callable[["StageContext"], Any]) -> Any:
        """Forward ``modify_inputs(prefill inputs)`` without cache up to this stage and return fn(ctx).

        Earlier stages (this method's or composed methods') are replayed with the selections they
        made in the real prefill (the same kept original indices; merges are not replayed), so the
        probe's context has the same current visual tokens as this one.
        """
        return self._runner.probe(modify_inputs(dict(self.prefill_inputs)), (self.layer_idx, self.owner), fn)

    def black_video(self, inputs: dict) -> dict:
        """``inputs`` with every video pixel black (the backbone's own normalisation of a black frame):
        ``ctx.probe(ctx.black_video, fn)`` is ShaRP's PosC probe."""
        return self.backbone.black_inputs(inputs)


@dataclass(frozen=True)
class LayerRows:
    """One decoder layer's prefill input (or output: the same rows) as a layer watcher sees it
    (:meth:`SessionContext.watch_layers`)."""

    layer: int
    hidden_states: torch.Tensor  # (b, s_l, d): the layer's input after the stages before it, or its output
    _seq: SeqState

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden_states.dtype

    def visual_index(self, b: int) -> torch.Tensor:
        """(n_b,) ORIGINAL visual indices of sample b's visual rows in this layer, in sequence order."""
        return self._seq.visual_index[b, self._seq.visual_positions(b)]

    def visual_rows(self, b: int) -> torch.Tensor:
        """(n_b, d) sample b's visual rows in this layer, in sequence order (aligned with visual_index)."""
        return self.hidden_states[b, self._seq.visual_positions(b)]


class _OwnerView:
    """What every session-level context of one method shares: the backbone's facts, the method's trace
    namespace and scratch space, and the session's clock."""

    def __init__(self, session: "PruningSession", owner: int):
        self._session = session
        self.owner = owner  # position of the method in the plan's (flattened) method list

    backbone = property(lambda self: self._session.backbone)  # the engine's (and tests'); methods use the facts
    backbone_name = property(lambda self: self._session.backbone.name)
    backbone_family = property(lambda self: self._session.backbone.family)
    num_layers = property(lambda self: self._session.plan.num_layers)

    @property
    def trace(self) -> SimpleNamespace:
        """The method's namespace on the trace."""
        return self._session.prefill.method_trace(self.owner)

    @property
    def state(self) -> SimpleNamespace:
        """The method's scratch space of the last prefill (it lasts through the decode steps after it)."""
        return self._session.prefill.method_state(self.owner)

    def timed(self, key: str):
        """``with ctx.timed(key): ...``: the block's time (session clock, GPU synced) into
        ``stage_times[key]``."""
        return self._session.trace.timed(key, self.backbone.device)


class SessionContext(_OwnerView):
    """What one method sees of its ``sharp.prune`` session outside a stage: in ``install`` (watch layers,
    add hooks) and in ``after_prefill`` (read recorded layer inputs, edit the KV cache)."""

    layout = property(lambda self: self._session.prefill.layout)  # of the current (or last) prefill
    phase = property(lambda self: self._session.phase)  # "prefill" | "probe" | "decode" | None
    prefill_inputs = property(lambda self: self._session.prefill.prefill_inputs)

    def add_time(self, key: str, seconds: float) -> None:
        self._session.trace.add_time(key, seconds)

    # -- in install --------------------------------------------------------------------------------
    def watch_layers(self, fn: Callable[[LayerRows], None], where: str = "input") -> None:
        """Call ``fn(rows)`` (a :class:`LayerRows`) with every decoder layer's prefill input, i.e. the
        sequence entering it after the stages before it (``where="input"``, the rows its keys and values
        are computed from), or with its output (``"output"``); in the prefill only, for as long as the
        ``sharp.prune`` block lasts. Keep only what is needed: the rows die with the layer's forward."""
        self._session.watch_layers(fn, where)

    def add_hook(self, module: torch.nn.Module, hook: Callable, *, pre: bool = True, with_kwargs: bool = True):
        """Register a forward (pre-)hook on a module of one's own (e.g. a scoring head) that is removed
        when the ``sharp.prune`` block ends. A backbone's layers are watched with :meth:`watch_layers`."""
        return self._session.add_hook(module, hook, pre=pre, with_kwargs=with_kwargs)

    # -- in after_prefill ----------------------------------------------------------------------------
    def recorded_input(self, layer: int):
        """(hidden (b, s_l, d), SeqState) at the input of ``layer`` in the last prefill (a layer in the
        method's ``score_layers``)."""
        return self._session.prefill.recorded_input(layer)

    @property
    def has_kv_cache(self) -> bool:
        """Whether the last prefill returned a KV cache (False with ``use_cache=False``)."""
        return self._session.kv.last_cache is not None

    def kv_bytes(self, layer: int) -> int:
        """Bytes layer ``layer``'s KV cache holds now (keys + values, every sample; 0 without a cache)."""
        return self._session.kv.kv_bytes(layer)

    def visual_kv_entries(self, layer: int) -> list[int]:
        """Per sample, the visual entries of layer ``layer``'s cache after the last prefill (its input rows)."""
        return self._session.prefill.layer_sequence(layer).visual_mask.sum(dim=1).tolist()

    def drop_visual_kv(self, layer: int) -> Optional[int]:
        """Remove layer ``layer``'s visual KV-cache entries for the decoding that follows (text entries
        stay; every later decode step of that layer attends to the text only). Returns the bytes freed, or
        None when nothing was dropped: a batch whose samples cannot keep equal entry counts (too little
        padding). Layer 0's cache gives generate its positions: drop it only if that is what you mean."""
        seq = self._session.prefill.layer_sequence(layer)
        return self._session.kv.drop_visual_kv(layer, seq.visual_mask, seq.attention_mask_2d)

    def drop_kv(self, layer: int, keep: list[torch.Tensor]) -> None:
        """Keep only entries ``keep[b]`` of layer ``layer``'s KV cache (same count per sample)."""
        self._session.kv.drop_kv(layer, keep)

def _segment_restriction(seq: SeqState, segment_of_index: Sequence[torch.Tensor], visual_sees_text: bool,
                         device: torch.device) -> Optional[SegmentRestriction]:
    """The :class:`SegmentRestriction` of ``seq`` (per position: the segment of its visual token, -1 for
    text), or None when it restricts nothing (one segment per sample, which sees the text)."""
    vidx = seq.visual_index.to(device)  # (b, s) original visual index or -1
    of_index = torch.stack([s.to(device) for s in segment_of_index])  # (b, N_vis)
    seg = torch.where(vidx >= 0, of_index.gather(1, vidx.clamp_min(0)), -1)  # (b, s)
    if visual_sees_text:
        present = seg >= 0
        highest = seg.masked_fill(~present, -1).amax(dim=1)
        lowest = seg.masked_fill(~present, torch.iinfo(seg.dtype).max).amin(dim=1)
        if bool(((highest <= lowest) | ~present.any(dim=1)).all()):  # one segment (or none) per sample
            return None
    return SegmentRestriction(seg, visual_sees_text=visual_sees_text)


class DecodeContext(_OwnerView):
    """What ``decode_select`` sees: one decode step, before decoder layer ``layer_idx`` (a layer in the
    method's ``decode_stages``). The step's query is the token being decoded; the visual entries are
    those of this layer's KV cache (the prefill's kept visual tokens, in cache order)."""

    phase = "decode"

    def __init__(self, session: "PruningSession", layer: int, owner: int):
        super().__init__(session, owner)
        self.layer_idx = layer

    step = property(lambda self: self._session.kv.step_index)  # 0: the first decode step after the prefill

    def _rows(self) -> torch.Tensor:
        return self._session.kv.cache_visual_index[self.layer_idx]  # (b, kv_prefill) ORIGINAL id or -1

    @property
    def batch_size(self) -> int:
        return self._rows().shape[0]

    @property
    def visual_counts(self) -> list[int]:
        """Per sample, the visual entries of this layer's cache."""
        return (self._rows() >= 0).sum(dim=1).tolist()

    def visual_index(self, b: int) -> torch.Tensor:
        """(n_b,) ORIGINAL visual indices of sample b's cached visual entries, in cache order (what
        ``Selection.keep_visual[b]`` indexes)."""
        rows = self._rows()[b]
        return rows[rows >= 0]

    def visual_attention(self, layer: int) -> torch.Tensor:
        """(b, n_max) float32: the attention the step's query paid, in the earlier decoder layer ``layer``
        (head mean, softmax over every cache entry that layer's attention saw in this step), to each of
        THIS layer's cached visual entries (cache order; 0 past a sample's count or where ``layer`` does not
        hold the entry). DyCoke's a = mean_h A_{L-1}[last query, visual]."""
        if not 0 <= layer < self.layer_idx:
            raise ValueError(f"visual_attention: layer must be in 0..{self.layer_idx - 1} (it must have run), got {layer}")
        attention, rows = self._session.kv.query_attention(layer)  # (b, kv), (b, kv)
        counts = self.visual_counts
        out = attention.new_zeros(len(counts), max(counts, default=0))
        for b, n in enumerate(counts):
            present = rows[b] >= 0
            table = attention.new_zeros(int(rows[b].max().clamp_min(0)) + 1)
            table[rows[b][present]] = attention[b][present]
            wanted = self.visual_index(b).to(table.device)
            inside = wanted < table.shape[0]
            out[b, :n][inside] = table[wanted[inside]]
        return out
