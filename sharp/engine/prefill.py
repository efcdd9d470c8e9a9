"""The prefill runner: what happens before each decoder layer of a prefill (or of a probe forward).

* A stage at layer k runs before layer k: its owner scores and selects (``select``); the runner
  gathers the kept tokens (all text + chosen visual, original order), their RoPE angles (ORIGINAL,
  or re-numbered with ``positions="compact"``) and padding mask, and rebuilds the causal mask for
  the short sequence with transformers' own ``create_causal_mask`` (so every attention
  implementation gets its own format; :func:`sharp.engine.masks.shortened_causal_mask`). A stage
  that keeps everything costs nothing.
* After-attention selections (FrameFusion): the input of a layer's ``post_attention_layernorm`` is
  the residual stream after the attention (the same tensor the layer adds its MLP output to); merged
  rows are written into it in place and the dropped tokens leave before the next layer.
* A method's custom mask (SegM) is ANDed with causal + padding for that layer; the mask (dense, or
  a segment plan) is assembled by :func:`sharp.engine.masks.restricted_mask`, and the runner switches
  that layer's attention function when the mask needs another one (restored after the prefill).
* The layers from a stage on cache the short sequence: the runner tells the
  :class:`~sharp.engine.decode.DecodePatcher` their key masks and position shifts.
* A probe (ShaRP's PosC) is a second forward, without cache, up to one stage; the earlier stages
  replay the kept original indices of the real prefill.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

from sharp.engine import compat
from sharp.engine import masks
from sharp.engine.context import StageContext
from sharp.engine.decode import DecodePatcher
from sharp.engine.method import PruningMethod, Selection
from sharp.engine.plan import PruningPlan
from sharp.engine.sequence import SeqState, gather_seq
from sharp.engine.trace import Trace


def write_rows(hidden: torch.Tensor, new_rows: list, index: Optional[torch.Tensor] = None,
               pad: Optional[torch.Tensor] = None) -> None:
    """Write :attr:`Selection.new_rows` (per sample ``(positions (k,), rows (k, d))`` in the stage's
    input sequence) into ``hidden`` (b, s', d) in place. With ``index`` / ``pad`` (b, s') of a shrink
    (``SeqState.keep_index``), ``hidden`` holds the gathered rows ``index`` and a position is written at
    its new row; positions that were not kept are skipped."""
    if len(new_rows) != hidden.shape[0]:
        raise RuntimeError(f"Selection.new_rows has {len(new_rows)} samples, expected {hidden.shape[0]}")
    for b, (positions, rows) in enumerate(new_rows):
        positions = torch.as_tensor(positions, device=hidden.device).long()
        rows = rows.to(device=hidden.device, dtype=hidden.dtype)
        if index is not None:
            real = (~pad[b]).nonzero().squeeze(1)  # (s'_b,) the sample's rows after the left padding
            # index[b, real] ascends (kept rows in sequence order): a kept position's new row by search
            slot = torch.searchsorted(index[b, real], positions).clamp(max=len(real) - 1)
            kept = index[b, real[slot]] == positions
            positions, rows = real[slot[kept]], rows[kept]
        hidden[b, positions] = rows


class _ProbeDone(Exception):
    """Raised inside a probe forward once the probed stage has been reached."""

    def __init__(self, result):
        super().__init__()
        self.result = result


@dataclass
class _Forward:
    """State of one prefill or probe forward."""

    phase: str  # prefill | probe
    layout: Any = None
    seq: Optional[SeqState] = None
    layer_inputs: dict = field(default_factory=dict)  # layer -> (hidden, SeqState)
    layer_seqs: dict = field(default_factory=dict)  # layer -> the SeqState entering it (= its KV-cache rows)
    restrictions: dict = field(default_factory=dict)  # owner -> (SeqState, key, its segment restriction)
    probe_target: Optional[tuple[int, int]] = None  # (layer, owner) of the probing stage
    probe_fn: Optional[Callable] = None
    layer_input: Optional[torch.Tensor] = None  # input of the decoder layer now running (after its stages)
    pending: list = field(default_factory=list)  # (owner, kept ORIGINAL indices per sample) from after_attention
    vision_captured: dict = field(default_factory=dict)  # vision layer -> {"args", "kwargs", "output"}
    vision_maps: dict = field(default_factory=dict)  # vision layer -> VisionMaps


class PrefillRunner:
    """Runs the plan's stages, masks and after-attention selections inside one prefill (and its probes)."""

    def __init__(self, backbone, plan: PruningPlan, trace: Trace, kv: DecodePatcher):
        self.backbone = backbone
        self.plan = plan
        self.trace = trace
        self.kv = kv
        self.prefill_inputs: dict = {}
        self.input_length = 0  # unpruned sequence length of the current prefill
        self._forwards: list[_Forward] = []  # [prefill] or [prefill, probe]
        self._probe_pending: Optional[_Forward] = None
        self._applied: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer, owner) -> kept original indices
        self._applied_after: dict[tuple[int, int], list[torch.Tensor]] = {}  # same, drops from after_attention
        self._scratch: list[SimpleNamespace] = [SimpleNamespace() for _ in plan.methods]
        self._attn_cfg_backup: dict[int, Any] = {}
        # (id of a layer config, impl) -> (that config, its copy running on impl): one copy per session,
        # shared by every layer that runs on impl (a config copy costs ~0.15 ms per layer per prefill)
        self._attn_cfg_copies: dict[tuple[int, str], tuple[Any, Any]] = {}
        self._prefill_t0 = self._llm_t0 = None

    # -- state --------------------------------------------------------------------------------
    @property
    def state(self) -> _Forward:
        return self._forwards[-1]

    @property
    def forwards(self) -> tuple:
        """The prefill forward and, inside it, a probe forward (those whose state is live)."""
        return tuple(self._forwards)

    @property
    def active(self) -> bool:
        return bool(self._forwards)

    @property
    def probe_pending(self) -> bool:
        """Whether ``probe`` has called the model and its forward has not started yet."""
        return self._probe_pending is not None

    @property
    def phase(self) -> Optional[str]:
        return self._forwards[-1].phase if self._forwards else None

    @property
    def layout(self):
        """VisualLayout of the current (or last) prefill's inputs."""
        return self._forwards[-1].layout if self._forwards else None

    def method_trace(self, owner: int) -> SimpleNamespace:
        """The trace namespace of one method, for its user-facing results."""
        return self.trace.methods.setdefault(self.plan.keys[owner], SimpleNamespace())

    def method_state(self, owner: int) -> SimpleNamespace:
        """Per-prefill scratch space of one method."""
        return self._scratch[owner]

    def layer_sequence(self, layer: int) -> SeqState:
        """The sequence that entered decoder layer ``layer`` in this (or the last) prefill: its KV-cache rows."""
        return self._forwards[0].layer_seqs[layer]

    def recorded_input(self, layer: int) -> tuple[torch.Tensor, SeqState]:
        """(hidden (b, s_l, d), SeqState) recorded at the input of ``layer`` in this prefill."""
        if layer not in self.plan.score_layers:
            raise RuntimeError(f"layer {layer}'s input is not recorded: list it in the method's score_layers()")
        if layer not in self.state.layer_inputs:
            raise RuntimeError(f"layer {layer}'s input is not recorded yet (a score layer must precede its stage)")
        return self.state.layer_inputs[layer]

    # -- the top-level call ---------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """A prefill (or the probe ``probe`` asked for) starts: the model's pre-hook calls this."""
        if self._probe_pending is not None:
            forward, self._probe_pending = self._probe_pending, None
            self._forwards.append(forward)
            self._start_sequence(forward, input_ids, kwargs)
            return
        forward = _Forward(phase="prefill")
        self._forwards = [forward]
        self._start_sequence(forward, input_ids, kwargs)
        self._prefill_t0, self._llm_t0 = self.trace.now(input_ids.device), None  # llm: set when decoder layer 0 starts
        self.prefill_inputs = compat.without_cache(kwargs)
        self.prefill_inputs.setdefault("input_ids", input_ids)
        self.input_length = input_ids.shape[1]
        self._applied, self._applied_after = {}, {}
        self._scratch = [SimpleNamespace() for _ in self.plan.methods]
        self.kv.start_prefill()
        self.trace.start_prefill(forward.layout.n_visual, list(self.plan.keys))

    def _start_sequence(self, forward: _Forward, input_ids, kwargs) -> None:
        if input_ids is None:
            raise ValueError("sharp.prune needs input_ids in the model call (inputs_embeds alone hide the visual tokens)")
        forward.layout = self.backbone.layout(kwargs if "input_ids" in kwargs else {**kwargs, "input_ids": input_ids})
        mask2d = kwargs.get("attention_mask")
        if mask2d is None:
            mask2d = torch.ones_like(input_ids)
        forward.seq = SeqState.initial(mask2d, self.backbone.visual_mask(input_ids, forward.layout))

    def finish(self) -> None:
        """The prefill forward returned: restore the layers' attention configs and record its times."""
        self.restore_attn_configs()
        self._record_times(self.trace.now(self.backbone.device))
        self.state.vision_captured, self.state.vision_maps = {}, {}

    def reset(self) -> None:
        self.restore_attn_configs()
        self._forwards.clear()

    def _record_times(self, t_end: float) -> None:
        """Table 4's columns: ``prefill`` (the whole forward), ``llm`` (from decoder layer 0 on: no vision
        tower), ``forward`` = llm - select - mask (the LLM forward without the selection overhead)."""
        times = self.trace.stage_times
        times["prefill"] = t_end - self._prefill_t0
        times["llm"] = t_end - (self._llm_t0 if self._llm_t0 is not None else self._prefill_t0)
        times["forward"] = max(0.0, times["llm"] - times.get("select", 0.0) - times.get("mask", 0.0))

    # -- vision tower ------------------------------------------------------------------------
    def vision_capture_hooks(self, i: int) -> tuple[Callable, Callable]:
        """(pre, post) forward hooks of vision layer ``i`` that keep its call for ``vision_maps``; where the
        family names the layer's query / key projections (:meth:`Backbone.vision_qk_capture`), their
        outputs too (``captured["qk"]``), so the maps need not recompute them."""
        taps: list = []

        def pre(mod, args, kwargs):
            while taps:  # a call that raised before its post hook
                taps.pop().remove()
            if self.active and self.phase in ("prefill", "probe"):
                captured = self.state.vision_captured[i] = {"args": args, "kwargs": kwargs}
                tap = self.backbone.vision_qk_capture(mod)
                if tap is not None:
                    modules, combine = tap
                    outputs: list = [None] * len(modules)

                    def keep(j):
                        def hook(m, a, out):
                            outputs[j] = out
                            if all(o is not None for o in outputs):
                                captured["qk"] = combine(*outputs)
                        return hook

                    taps.extend(m.register_forward_hook(keep(j)) for j, m in enumerate(modules))

        def post(mod, args, kwargs, output):
            while taps:
                taps.pop().remove()
            if self.active and i in self.state.vision_captured:
                self.state.vision_captured[i]["output"] = output

        return pre, post

    def vision_maps(self, layer=None):
        """VisionMaps of a requested vision layer in the current prefill (computed on first use)."""
        return self._from_vision_layer("maps", layer, self.backbone.vision_maps)

    def frame_pooling(self, layer=None):
        """FramePooling (FastVID's per-frame global feature and probe attention) of a requested vision
        layer in the current prefill (computed on first use)."""
        return self._from_vision_layer("frame_pooling", layer, self.backbone.frame_pooling)

    def _from_vision_layer(self, kind: str, layer, compute):
        """``compute(i, captured call, batch size)`` for requested vision layer i, once per prefill."""
        i = self.backbone.resolve_vision_layer(layer)
        state = self.state
        if i not in self.plan.vision_layers:
            raise RuntimeError(f"vision layer {i} was not requested: list it in the method's vision_layers()")
        if (kind, i) not in state.vision_maps:  # emptied when the next prefill starts
            if "output" not in state.vision_captured.get(i, {}):
                raise RuntimeError(f"vision layer {i} did not run in this forward (no video pixels?)")
            state.vision_maps[kind, i] = compute(i, state.vision_captured[i], state.seq.visual_mask.shape[0])
        return state.vision_maps[kind, i]

    # -- before each decoder layer -------------------------------------------------------------
    def layer_kwargs(self, idx: int, args, kwargs):
        """The forward pre-hook result for decoder layer ``idx`` (None: the layer runs unchanged)."""
        state = self.state
        if idx == 0 and state.phase == "prefill":
            self._llm_t0 = self.trace.now(self.backbone.device)
        hidden_in = args[0] if args else kwargs["hidden_states"]  # (b, s, d)
        if not state.seq.pruned and state.seq.position_embeddings is None:
            state.seq = state.seq.with_rope(kwargs["position_embeddings"])
        hidden = self._apply_after_attention_drops(idx, hidden_in)
        hidden = self._run_stages(idx, hidden)
        seq = state.seq
        state.layer_input = hidden
        if idx in self.plan.score_layers:
            state.layer_inputs[idx] = (hidden, seq)
        state.layer_seqs[idx] = seq
        if state.phase == "prefill" and len(self.trace.visual_tokens_per_layer) == idx:
            self.trace.record_layer_counts(seq.visual_mask.sum(dim=1).tolist())

        t0 = self.trace.clock()
        extra = self._method_masks(idx, hidden, seq)
        if not seq.pruned and extra is None and hidden is hidden_in:
            return None
        new_kwargs = dict(kwargs)
        if seq.pruned:
            new_kwargs.update(position_embeddings=seq.position_embeddings,
                              position_ids=None,  # RoPE is in position_embeddings; FA2 must not see gapped ids
                              attention_mask=seq.mask)
            compat.set_cache_position(self.backbone.layers[idx], new_kwargs, seq.cache_position)
        if extra is not None:
            mask, run_on = masks.restricted_mask(extra, seq.attention_mask_2d, hidden,
                                                 self.backbone.text_config._attn_implementation)
            if run_on is not None:
                self._switch_layer_attn(idx, run_on)
            new_kwargs["attention_mask"] = mask
            if state.phase == "prefill":
                self.trace.add_time("mask", self.trace.clock() - t0)
        if args:
            return (hidden,) + tuple(args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _context(self, idx: int, hidden: torch.Tensor, seq: SeqState, owner: int, **kw) -> StageContext:
        return StageContext(self, idx, hidden, seq, owner, **kw)

    def _run_stages(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Every stage at layer ``idx``, in composition order (probe: replay, then stop at its stage)."""
        state = self.state
        for owner in self.plan.stage_owners.get(idx, ()):
            if state.phase == "probe":
                if (idx, owner) == state.probe_target:
                    raise _ProbeDone(state.probe_fn(self._context(idx, hidden, state.seq, owner)))
                hidden = self._replay_stage(idx, owner, hidden)
            else:
                hidden = self._run_stage(idx, owner, hidden)
        if state.phase == "probe" and idx >= state.probe_target[0]:
            raise RuntimeError("probe passed its stage")
        return hidden

    def _run_stage(self, idx: int, owner: int, hidden: torch.Tensor) -> torch.Tensor:
        """Score, select and (unless nothing is removed) shrink the sequence before layer ``idx``."""
        state = self.state
        t0 = self.trace.clock()
        method = self.plan.methods[owner]
        ctx = self._context(idx, hidden, state.seq, owner)
        selection: Selection = method.select(ctx)
        b = hidden.shape[0]
        if selection.hidden_states is not None:
            hidden = selection.hidden_states
        keep = selection.keep_visual
        if keep is not None and len(keep) != b:
            raise RuntimeError(f"{method.name}.select returned {len(keep)} samples, expected {b}")
        if keep is not None and [len(k) for k in keep] != ctx.visual_counts:
            hidden = self._shrink(idx, method, hidden, keep, record_kv=True, new_rows=selection.new_rows)
            self._applied[(idx, owner)] = self._record_selection(idx, owner)
        elif selection.new_rows is not None:  # nothing removed: a copy of the input with the new rows
            hidden = hidden.clone()
            write_rows(hidden, selection.new_rows)
        self.trace.add_time("select", self.trace.clock() - t0)
        return hidden

    def _record_selection(self, idx: int, owner: int) -> list[torch.Tensor]:
        """The kept ORIGINAL visual indices per sample after a stage, recorded on the trace."""
        kept = [v[v >= 0].clone() for v in self.state.seq.visual_index]
        self.trace.record_stage(idx, self.plan.keys[owner], kept)
        return kept

    def _replay_stage(self, idx: int, owner: int, hidden: torch.Tensor) -> torch.Tensor:
        """In a probe: keep the tokens the real prefill kept at this stage (no merges)."""
        kept = self._applied.get((idx, owner))
        if kept is None:
            return hidden
        return self._keep_originals(idx, owner, hidden, kept, record_kv=False)

    # -- after-attention selections (FrameFusion's hook point) ---------------------------------
    def after_attention(self, idx: int, residual: torch.Tensor) -> None:
        """Layer ``idx``'s after-attention selections on the residual stream (b, s, d): merged rows are
        written into it in place; the drops are applied before layer ``idx + 1``."""
        state = self.state
        t0 = self.trace.clock()
        for owner in self.plan.after_attention_owners[idx]:
            ctx = self._context(idx, residual, state.seq, owner, layer_input=state.layer_input)
            selection: Selection = self.plan.methods[owner].after_attention(ctx)
            if selection.hidden_states is not None and selection.hidden_states is not residual:
                residual.copy_(selection.hidden_states)
            if selection.new_rows is not None:
                write_rows(residual, selection.new_rows)
            keep = selection.keep_visual
            if keep is None or [len(k) for k in keep] == ctx.visual_counts or idx + 1 >= self.plan.num_layers:
                continue
            originals = [ctx.current_visual_index(b)[torch.as_tensor(keep[b], device=residual.device).long()]
                         for b in range(residual.shape[0])]
            state.pending.append((owner, originals))
        self.trace.add_time("select", self.trace.clock() - t0)

    def _apply_after_attention_drops(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the drops decided after layer ``idx - 1``'s attention (prefill) or replay them (probe)."""
        state = self.state
        if state.phase == "probe":
            for (layer, owner), kept in self._applied_after.items():
                if layer == idx:
                    hidden = self._keep_originals(idx, owner, hidden, kept, record_kv=False)
            return hidden
        pending, state.pending = state.pending, []
        for owner, kept in pending:
            t0 = self.trace.clock()
            hidden = self._keep_originals(idx, owner, hidden, kept, record_kv=True)
            self._applied_after[(idx, owner)] = self._record_selection(idx, owner)
            self.trace.add_time("select", self.trace.clock() - t0)
        return hidden

    # -- shrinking the sequence ------------------------------------------------------------------
    def _keep_originals(self, idx: int, owner: int, hidden: torch.Tensor, kept: list[torch.Tensor],
                        record_kv: bool) -> torch.Tensor:
        """Shrink to the current visual tokens whose ORIGINAL index is in ``kept[b]`` (and all text)."""
        seq = self.state.seq
        keep = []
        for b in range(hidden.shape[0]):
            current = seq.visual_index[b, seq.visual_positions(b)]
            keep.append(torch.isin(current, kept[b].to(current.device)).nonzero().squeeze(1))
        return self._shrink(idx, self.plan.methods[owner], hidden, keep, record_kv=record_kv)

    def _shrink(self, idx: int, method: PruningMethod, hidden: torch.Tensor, keep: list[torch.Tensor],
                record_kv: bool, new_rows: Optional[list] = None) -> torch.Tensor:
        """Gather the kept rows, their RoPE angles and masks; the new sequence becomes current.
        ``new_rows`` (:attr:`Selection.new_rows`): written into the gathered kept rows."""
        state = self.state
        seq = state.seq
        index, pad = seq.keep_index(keep)  # (b, s')
        new_hidden = gather_seq(hidden, index, 1)  # (b, s', d)
        if new_rows is not None:
            write_rows(new_hidden, new_rows, index, pad)
        new = seq.gathered(index, pad)
        if method.compacts_at(idx):
            new = self._compact(idx, seq, new, new_hidden, record_kv)
        new = replace(new, mask=masks.shortened_causal_mask(self.backbone.text_config, new_hidden,
                                                           new.attention_mask_2d))
        state.seq = new
        if record_kv:
            self.kv.record_pruned(idx, new.attention_mask_2d)
        return new_hidden

    def _compact(self, idx: int, old: SeqState, new: SeqState, hidden: torch.Tensor, record: bool) -> SeqState:
        """Re-number the kept tokens 0..len-1 (left padding as generate numbers it) and tell the decode
        patcher how many real tokens the layers from ``idx`` on no longer see."""
        mask2d = new.attention_mask_2d
        positions = (mask2d.cumsum(1) - 1).masked_fill(mask2d == 0, 1)  # (b, s')
        rope = self.backbone.language_model.rotary_emb(hidden, positions)
        if record:
            self.kv.record_shift(idx, old.attention_mask_2d.sum(1) - mask2d.sum(1))  # (b,)
        return replace(new, position_embeddings=rope)

    # -- custom masks ------------------------------------------------------------------------------
    def _method_masks(self, idx: int, hidden: torch.Tensor, seq: SeqState) -> Optional[torch.Tensor]:
        """AND of the methods' custom masks for layer ``idx`` (None when no method restricts it)."""
        extra = None
        for owner, m in enumerate(self.plan.methods):
            mask = m.attention_mask(self._context(idx, hidden, seq, owner))
            if mask is not None:
                extra = masks.combine(extra, mask)
        return extra

    def _switch_layer_attn(self, idx: int, impl: str) -> None:
        """Run layer ``idx``'s attention on ``impl`` until :meth:`restore_attn_configs` (a config copy)."""
        attn = self.backbone.layers[idx].self_attn
        if idx not in self._attn_cfg_backup:
            own = self._attn_cfg_backup[idx] = attn.config
            kept = self._attn_cfg_copies.get((id(own), impl))
            if kept is None or kept[0] is not own:
                cfg = copy.copy(own)
                cfg._attn_implementation = impl
                kept = self._attn_cfg_copies[id(own), impl] = (own, cfg)
            attn.config = kept[1]

    def restore_attn_configs(self) -> None:
        for idx, cfg in self._attn_cfg_backup.items():
            self.backbone.layers[idx].self_attn.config = cfg
        self._attn_cfg_backup = {}

    # -- probe -----------------------------------------------------------------------------
    def probe(self, inputs: dict, stage: tuple[int, int], fn: Callable) -> Any:
        """Run the model on ``inputs`` (no cache) up to ``stage`` = (layer, owner), replaying the
        earlier stages' selections, and return fn(ctx) there."""
        self._probe_pending = _Forward(phase="probe", probe_target=stage, probe_fn=fn)
        inner = self.backbone.model.model
        saved_rope_deltas = getattr(inner, "rope_deltas", None)  # Qwen2-VL caches it per prefill
        try:
            with torch.no_grad():
                self.backbone.model(**compat.without_cache(inputs, "use_cache", "cache_position"), use_cache=False)
        except _ProbeDone as done:
            return done.result
        finally:
            self._probe_pending = None
            if self._forwards and self._forwards[-1].phase == "probe":
                self._forwards.pop()
            if hasattr(inner, "rope_deltas"):
                inner.rope_deltas = saved_rope_deltas
        raise RuntimeError(f"probe never reached layer {stage[0]}")
