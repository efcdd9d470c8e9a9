"""What a method sees of the engine: :class:`StageContext` (one layer of one prefill) and
:class:`SessionContext` (its ``install`` and ``after_prefill``). Methods never hold the session.

The same context is given to ``select`` (a stage before layer ``layer_idx``) and to
``attention_mask`` (every layer). It describes the CURRENT sequence: after earlier stages (of this
method or of methods composed before it) the visual tokens are fewer, and each one carries its
original visual index, its frame and its grid position (:meth:`StageContext.visual_tokens`).
Budgets stay shares of the ORIGINAL visual count (:meth:`StageContext.budget`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from sharp.engine.attention import attention_of_last_tokens
from sharp.engine.sequence import SeqState
from sharp.engine.method import budget

if TYPE_CHECKING:  # pragma: no cover
    from sharp.engine.prefill import PrefillRunner
    from sharp.engine.session import PruningSession


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
    backbone = property(lambda self: self._runner.backbone)
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

    def timed(self, key: str):
        """``with ctx.timed("attn"): ...`` adds the block's time (session clock, GPU synced) to
        ``stage_times[key]``."""
        return self._runner.trace.timed(key, self.hidden_states.device)

    def now(self) -> float:
        """The session's stage clock (GPU synced), for spans that ``timed`` cannot bracket."""
        return self._runner.trace.now(self.hidden_states.device)

    @property
    def clock(self):
        """The session's stage clock itself (a zero-argument callable; no GPU sync)."""
        return self._runner.trace.clock

    # -- other layers -----------------------------------------------------------------------------
    def recorded(self, layer: int) -> "StageContext":
        """The context of layer ``layer``'s recorded prefill input (a layer in the method's
        ``score_layers``, not after this one): its hidden states and its sequence."""
        hidden, seq = self._runner.recorded_input(layer)
        return StageContext(self._runner, layer, hidden, seq, self.owner)

    def last_token_attention(self, layer: Optional[int] = None, queries: int = 1, rope: bool = True,
                             softmax_over: str = "all", space: str = "prob") -> torch.Tensor:
        """Attention of the last ``queries`` tokens in layer ``layer`` (default: this layer), read at
        the CURRENT sequence's rows. Returns (b, s) float32.

        softmax(q k^T / sqrt(d_h) + mask) averaged over heads and queries, recomputed from that layer's
        input (input_layernorm, q_proj on the last rows, k_proj on all rows, RoPE) without building
        the N x N matrix. A recorded earlier layer whose sequence was longer (an earlier stage ran in
        between) is computed on ITS sequence and read at the rows still present.
        ``softmax_over="visual"`` normalises over the visual keys only (FEATHER); ``rope=False`` skips
        RoPE (FEATHER's de-RoPE criterion); ``space="logit"`` returns the pre-softmax logits averaged
        the same way (masked keys read 0).
        """
        if softmax_over not in ("all", "visual"):
            raise ValueError(f"softmax_over must be 'all' or 'visual', got {softmax_over!r}")
        src = self if layer is None or layer == self.layer_idx else self.recorded(layer)
        scores = attention_of_last_tokens(
            self.backbone, src.layer_idx, src.layer_input, src.seq.position_embeddings,
            src.seq.attention_mask_2d, queries=queries, rope=rope,
            key_mask=src.seq.visual_mask if softmax_over == "visual" else None, space=space)
        return self.seq.map_from(src.seq, scores, self._runner.input_length)

    # -- the vision tower ---------------------------------------------------------------------------
    def vision(self, layer: Union[int, str, None] = None):
        """:class:`~sharp.backbones.VisionMaps` of a vision-encoder layer listed in the method's
        ``vision_layers()`` (None / "feature": the layer that feeds the LLM), over the ORIGINAL visual
        tokens (b, N_vis, ...): index them with ``visual_tokens(b).index``."""
        return self._runner.vision_maps(layer)

    # -- probes -----------------------------------------------------------------------------------
    def probe(self, modify_inputs: Callable[[dict], dict], fn: Callable[["StageContext"], Any]) -> Any:
        """Forward ``modify_inputs(prefill inputs)`` without cache up to this stage and return fn(ctx).

        Earlier stages (this method's or composed methods') are replayed with the selections they
        made in the real prefill (the same kept original indices; merges are not replayed), so the
        probe's context has the same current visual tokens as this one.
        """
        return self._runner.probe(modify_inputs(dict(self.prefill_inputs)), (self.layer_idx, self.owner), fn)


class SessionContext:
    """What one method sees of its ``sharp.prune`` session outside a stage: in ``install`` (add hooks)
    and in ``after_prefill`` (read recorded layer inputs, drop KV-cache entries)."""

    def __init__(self, session: "PruningSession", owner: int):
        self._session = session
        self.owner = owner  # position of the method in the plan's (flattened) method list

    backbone = property(lambda self: self._session.backbone)
    num_layers = property(lambda self: self._session.plan.num_layers)
    layout = property(lambda self: self._session.prefill.layout)  # of the current (or last) prefill
    phase = property(lambda self: self._session.phase)  # "prefill" | "probe" | "decode" | None
    prefill_inputs = property(lambda self: self._session.prefill.prefill_inputs)

    @property
    def sequence(self):
        """The SeqState of the forward in progress: in a decoder-layer pre-hook added by ``install``
        (it runs after the engine's), the sequence entering that layer, after the layer's stages."""
        return self._session.prefill.state.seq

    @property
    def trace(self) -> SimpleNamespace:
        """The method's namespace on the trace."""
        return self._session.prefill.method_trace(self.owner)

    @property
    def state(self) -> SimpleNamespace:
        """The method's scratch space for this prefill."""
        return self._session.prefill.method_state(self.owner)

    def add_time(self, key: str, seconds: float) -> None:
        self._session.trace.add_time(key, seconds)

    def timed(self, key: str):
        """``with ctx.timed("memory"): ...``: the block's time (session clock, GPU synced) into
        ``stage_times[key]``."""
        return self._session.trace.timed(key, self.backbone.device)

    def add_hook(self, module: torch.nn.Module, hook: Callable, *, pre: bool = True, with_kwargs: bool = True):
        """Register a forward (pre-)hook that is removed when the ``sharp.prune`` block ends."""
        return self._session.add_hook(module, hook, pre=pre, with_kwargs=with_kwargs)

    def recorded_input(self, layer: int):
        """(hidden (b, s_l, d), SeqState) at the input of ``layer`` in the last prefill (a layer in the
        method's ``score_layers``)."""
        return self._session.prefill.recorded_input(layer)

    def drop_kv(self, layer: int, keep: list[torch.Tensor]) -> None:
        """Keep only entries ``keep[b]`` of layer ``layer``'s KV cache (same count per sample)."""
        self._session.kv.drop_kv(layer, keep)
