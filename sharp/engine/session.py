"""The pruning session: prunes visual tokens inside an unmodified HF video LLM during prefill.

Mechanism (see docs/engine.md and ../shared/notes/engine.md):

* A forward pre-hook on the top-level model records the call (prefill vs decode, input_ids ->
  visual mask, 2-D padding mask) and a pre-hook on every decoder layer substitutes that layer's
  inputs: hidden states, attention mask, (cos, sin) position embeddings, cache_position.
* A stage at layer k runs before layer k in prefill: its owner scores and selects; the engine
  gathers the kept tokens (all text + chosen visual, original order), their RoPE angles (ORIGINAL,
  or re-numbered with ``positions="compact"``) and padding mask, and rebuilds the causal mask for
  the short sequence with transformers' own ``create_causal_mask`` (so every attention
  implementation gets its own format). A stage that keeps everything costs nothing.
* After-attention selections (FrameFusion): a pre-hook on a layer's ``post_attention_layernorm``
  sees the residual stream after the attention (the same tensor the layer adds its MLP output to);
  merged rows are written into it in place and the dropped tokens leave before the next layer.
* KV cache: layers < k keep the full cache, layers >= k the pruned one (DynamicCache layers have
  independent lengths). ``get_seq_length()`` reads layer 0, so generate's positions and Qwen2-VL's
  ``rope_deltas`` stay in the original frame. In decode, every layer whose cache was shortened gets
  a mask built for ITS cache length, and with compact positions its shifted RoPE angles.
* Composed methods (:mod:`sharp.engine.compose`) are flattened: every child's stages, masks and
  hooks run in order.
* Leaving the ``with`` block removes every hook; the model is untouched.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from transformers.masking_utils import create_causal_mask

from sharp.engine.attention import cuda_sync
from sharp.engine import masks as structured_masks
from sharp.engine.compose import ComposedMethod
from sharp.engine.context import StageContext
from sharp.engine.sequence import SeqState, gather_seq
from sharp.engine.trace import Trace
from sharp.methods.base import PruningMethod, Selection
from sharp.methods.registry import child_keys
from sharp.methods.settings import resolve_method


class _ProbeDone(Exception):
    """Raised inside a probe forward once the probed stage has been reached."""

    def __init__(self, result):
        super().__init__()
        self.result = result


class _MaskSizes:
    """Stands in for a cache in ``create_causal_mask``: answers for one layer's cache length."""

    is_compileable = False

    def __init__(self, past_length: int):
        self.past_length = past_length

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return self.past_length + cache_position.shape[0], 0


@dataclass
class _CallState:
    """State of one top-level forward (prefill, decode step or probe)."""

    phase: str = "prefill"  # prefill | decode | probe-pending | probe
    layout: Any = None
    seq: Optional[SeqState] = None
    layer_inputs: dict = field(default_factory=dict)  # layer -> (hidden, SeqState)
    probe_target: Optional[tuple[int, int]] = None  # (layer, owner) of the probing stage
    probe_fn: Optional[Callable] = None
    layer_input: Optional[torch.Tensor] = None  # input of the decoder layer now running (after its stages)
    pending: list = field(default_factory=list)  # (owner, kept ORIGINAL indices per sample) from after_attention
    vision_captured: dict = field(default_factory=dict)  # vision layer -> {"args", "kwargs", "output"}
    vision_maps: dict = field(default_factory=dict)  # vision layer -> VisionMaps
    decode_masks: dict = field(default_factory=dict)  # id(kv mask) -> (mask2d, mask, cache_position)
    decode_rope: dict = field(default_factory=dict)  # shift tuple -> (cos, sin), one decode step
    model_kwargs: dict = field(default_factory=dict)


def uses_mrope(backbone) -> bool:
    """Whether the backbone's LLM uses multimodal RoPE (Qwen2-VL): no 1-D compacted positions there."""
    scaling = getattr(backbone.text_config, "rope_scaling", None) or {}
    return "mrope_section" in scaling


class PruningSession:
    """Hooks one (possibly composed) method into one backbone; created by :func:`prune`."""

    def __init__(self, backbone, method: PruningMethod):
        self.backbone = backbone
        self.method = method
        self.methods: list[PruningMethod] = (method.flat_children() if isinstance(method, ComposedMethod)
                                             else [method])
        self.method_keys = child_keys([m.name for m in self.methods])
        self.trace = Trace()
        self.num_layers = backbone.num_layers
        self.stage_owners = self._stage_owners()  # layer -> [owner, ...] in composition order
        self.stage_layers = sorted(self.stage_owners)
        self.after_attention_owners = self._after_attention_owners()  # layer -> [owner, ...]
        self.score_layers = self._score_layers()
        self.vision_layer_ids = self._vision_layers()
        if any(m.positions == "auto" for m in self.methods):
            raise ValueError("positions='auto' is decided for a backbone: resolve the method first "
                             "(sharp.resolve_method(method, backbone); sharp.prune does)")
        if uses_mrope(backbone) and any(m.positions == "compact" for m in self.methods):
            raise ValueError(
                f"positions='compact' needs 1-D RoPE, but {backbone.name} uses multimodal RoPE (M-RoPE): each "
                f"visual token's position is its (t, h, w) grid cell and the compact re-numbering (PyramidDrop's, "
                f"the pre-LLM methods') is defined for 1-D positions only; use positions='original' on this backbone")
        self.prefill_inputs: dict = {}
        self.input_length = 0  # unpruned sequence length of the current prefill
        self._states: list[_CallState] = []
        self._handles: list = []
        self.kv_masks: dict[int, torch.Tensor] = {}  # layer -> (b, kv_len) key mask of its cache
        self.position_shift: dict[int, torch.Tensor] = {}  # layer -> (b,) real tokens dropped by compaction
        self._applied: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer, owner) -> kept original indices
        self._applied_after: dict[tuple[int, int], list[torch.Tensor]] = {}  # same, drops from after_attention
        self._scratch: list[SimpleNamespace] = [SimpleNamespace() for _ in self.methods]
        self._attn_cfg_backup: dict[int, Any] = {}
        self._last_cache = None
        self._last_mask2d = None
        self._prefill_t0 = self._llm_t0 = None

    def _stage_owners(self) -> dict[int, list[int]]:
        owners: dict[int, list[int]] = {}
        for i, m in enumerate(self.methods):
            layers = m.stages(self.num_layers)
            bad = [k for k in layers if not 0 <= k < self.num_layers]
            if bad:
                raise ValueError(f"{m.name}: stage layer(s) {bad} outside 0..{self.num_layers - 1}")
            for k in layers:
                owners.setdefault(k, []).append(i)
        return owners

    def _after_attention_owners(self) -> dict[int, list[int]]:
        owners: dict[int, list[int]] = {}
        for i, m in enumerate(self.methods):
            layers = m.after_attention_layers(self.num_layers)
            bad = [k for k in layers if not 0 <= k < self.num_layers]
            if bad:
                raise ValueError(f"{m.name}: after-attention layer(s) {bad} outside 0..{self.num_layers - 1}")
            for k in layers:
                owners.setdefault(k, []).append(i)
        return owners

    def _score_layers(self) -> set[int]:
        layers = set()
        for m in self.methods:
            got = m.score_layers(self.num_layers)
            bad = [k for k in got if not 0 <= k < self.num_layers]
            if bad:
                raise ValueError(f"{m.name}: score layer(s) {bad} outside 0..{self.num_layers - 1}")
            layers.update(got)
        return layers

    def _vision_layers(self) -> list[int]:
        wanted = [v for m in self.methods for v in m.vision_layers()]
        return sorted({self.backbone.resolve_vision_layer(v) for v in wanted})

    # -- public state -----------------------------------------------------------------------
    @property
    def state(self) -> _CallState:
        return self._states[-1]

    @property
    def phase(self) -> str:
        return self.state.phase

    @property
    def layout(self):
        """VisualLayout of the current (or last) prefill's inputs."""
        return self.state.layout

    @property
    def attn_implementation(self) -> str:
        return self.backbone.text_config._attn_implementation

    def method_key(self, owner: int) -> str:
        return self.method_keys[owner]

    def _owner_of(self, method_or_owner) -> int:
        if isinstance(method_or_owner, int):
            return method_or_owner
        for i, m in enumerate(self.methods):
            if m is method_or_owner:
                return i
        raise ValueError(f"{method_or_owner!r} is not a method of this session")

    def method_trace(self, method) -> SimpleNamespace:
        """The trace namespace of one method (instance or position), for its user-facing results."""
        return self.trace.methods.setdefault(self.method_keys[self._owner_of(method)], SimpleNamespace())

    def method_state(self, method) -> SimpleNamespace:
        """Per-prefill scratch space of one method (instance or position)."""
        return self._scratch[self._owner_of(method)]

    def recorded_input(self, layer: int) -> tuple[torch.Tensor, SeqState]:
        """(hidden (b, s_l, d), SeqState) recorded at the input of ``layer`` in this prefill."""
        if layer not in self.score_layers:
            raise RuntimeError(f"layer {layer}'s input is not recorded: list it in the method's score_layers()")
        if layer not in self.state.layer_inputs:
            raise RuntimeError(f"layer {layer}'s input is not recorded yet (a score layer must precede its stage)")
        return self.state.layer_inputs[layer]

    # -- install / remove ------------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: Callable, *, pre: bool = True, with_kwargs: bool = True):
        """Register a hook that is removed when the ``sharp.prune`` block ends."""
        if pre:
            h = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        else:
            h = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(h)
        return h

    def install(self) -> None:
        self.add_hook(self.backbone.model, self._model_pre_hook)
        self.add_hook(self.backbone.model, self._model_post_hook, pre=False)
        for i, layer in enumerate(self.backbone.layers):
            self.add_hook(layer, self._make_layer_hook(i))
        for i in self.after_attention_owners:
            self.add_hook(self.backbone.layers[i].post_attention_layernorm, self._make_after_attention_hook(i))
        for i in self.vision_layer_ids:
            self._install_vision_capture(i)
        for m in self.methods:
            m.install(self)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore_attn_configs()
        self._states.clear()

    # -- top-level hooks -------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pkv = kwargs.get("past_key_values")
        if self._states and self._states[-1].phase == "probe-pending":
            state = self._states[-1]
            state.phase = "probe"
        else:
            is_prefill = pkv is None or pkv.get_seq_length() == 0
            state = _CallState(phase="prefill" if is_prefill else "decode")
            if self._states and self._states[-1].phase in ("prefill", "decode"):
                self._states[-1] = state  # a new top-level call replaces the finished one
            else:
                self._states.append(state)
        if state.phase in ("prefill", "probe"):
            self._start_sequence(state, input_ids, kwargs)
        if state.phase == "prefill":
            self._start_prefill(state, input_ids, kwargs)
        elif state.phase == "decode":
            state.model_kwargs = {"attention_mask": kwargs.get("attention_mask")}
        if state.phase != "probe":
            self._last_mask2d = kwargs.get("attention_mask")
        return None

    def _start_sequence(self, state: _CallState, input_ids, kwargs) -> None:
        if input_ids is None:
            raise ValueError("sharp.prune needs input_ids in the model call (inputs_embeds alone hide the visual tokens)")
        state.layout = self.backbone.layout(kwargs if "input_ids" in kwargs else {**kwargs, "input_ids": input_ids})
        mask2d = kwargs.get("attention_mask")
        if mask2d is None:
            mask2d = torch.ones_like(input_ids)
        state.seq = SeqState.initial(mask2d, self.backbone.visual_mask(input_ids, state.layout))

    def _start_prefill(self, state: _CallState, input_ids, kwargs) -> None:
        cuda_sync(input_ids.device)
        self._prefill_t0 = time.perf_counter()
        self._llm_t0 = None  # set when decoder layer 0 starts
        self.prefill_inputs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        self.prefill_inputs.setdefault("input_ids", input_ids)
        self.input_length = input_ids.shape[1]
        self.kv_masks = {}
        self.position_shift = {}
        self._applied = {}
        self._applied_after = {}
        self._scratch = [SimpleNamespace() for _ in self.methods]
        self.trace.start_prefill(state.layout.n_visual, self.method_keys)

    def _model_post_hook(self, module, args, kwargs, output):
        state = self._states[-1] if self._states else None
        if state is None or state.phase not in ("prefill", "decode"):
            return None
        pkv = getattr(output, "past_key_values", None)
        if pkv is not None:
            self._last_cache = pkv
        if state.phase == "prefill":
            self._restore_attn_configs()
            cuda_sync(self.backbone.device)
            self._record_prefill_times(time.perf_counter())
            state.vision_captured, state.vision_maps = {}, {}
            for m in self.methods:
                m.after_prefill(self)
        else:
            self._advance_kv_masks()
        return None

    def _record_prefill_times(self, t_end: float) -> None:
        """Table 4's columns: ``prefill`` (the whole forward), ``llm`` (from decoder layer 0 on: no vision
        tower), ``forward`` = llm - select - mask (the LLM forward without the selection overhead)."""
        times = self.trace.stage_times
        times["prefill"] = t_end - self._prefill_t0
        times["llm"] = t_end - (self._llm_t0 if self._llm_t0 is not None else self._prefill_t0)
        times["forward"] = max(0.0, times["llm"] - times.get("select", 0.0) - times.get("mask", 0.0))

    # -- vision tower ------------------------------------------------------------------------
    def _install_vision_capture(self, i: int) -> None:
        module = self.backbone.vision_layers[i]

        def pre(mod, args, kwargs):
            if self._states and self.state.phase in ("prefill", "probe"):
                self.state.vision_captured[i] = {"args": args, "kwargs": kwargs}

        def post(mod, args, kwargs, output):
            if self._states and i in self.state.vision_captured:
                self.state.vision_captured[i]["output"] = output

        self.add_hook(module, pre)
        self.add_hook(module, post, pre=False)

    def vision_maps(self, layer=None):
        """VisionMaps of a requested vision layer in the current prefill (computed on first use)."""
        i = self.backbone.resolve_vision_layer(layer)
        state = self.state
        if i not in self.vision_layer_ids:
            raise RuntimeError(f"vision layer {i} was not requested: list it in the method's vision_layers()")
        if i not in state.vision_maps:
            if "output" not in state.vision_captured.get(i, {}):
                raise RuntimeError(f"vision layer {i} did not run in this forward (no video pixels?)")
            state.vision_maps[i] = self.backbone.vision_maps(i, state.vision_captured[i], state.seq.visual_mask.shape[0])
        return state.vision_maps[i]

    # -- layer hook ------------------------------------------------------------------------
    def _make_layer_hook(self, idx: int):
        def hook(module, args, kwargs):
            if not self._states:
                return None
            phase = self.state.phase
            if phase == "decode":
                return self._decode_layer(idx, args, kwargs)
            if phase in ("prefill", "probe"):
                return self._prefill_layer(idx, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, idx: int, args, kwargs):
        state = self.state
        if idx == 0 and state.phase == "prefill":
            cuda_sync(self.backbone.device)
            self._llm_t0 = time.perf_counter()
        hidden_in = args[0] if args else kwargs["hidden_states"]
        if not state.seq.pruned and state.seq.position_embeddings is None:
            state.seq = state.seq.with_rope(kwargs["position_embeddings"])
        hidden = self._run_after_attention_drops(idx, hidden_in)
        hidden = self._run_stages(idx, hidden)
        seq = state.seq
        state.layer_input = hidden
        if idx in self.score_layers:
            state.layer_inputs[idx] = (hidden, seq)
        if state.phase == "prefill" and len(self.trace.visual_tokens_per_layer) == idx:
            counts = seq.visual_mask.sum(dim=1).tolist()
            self.trace.visual_tokens_per_layer.append(int(counts[0]))
            self.trace.visual_tokens_by_sample.append([int(c) for c in counts])

        t0 = time.perf_counter()
        extra = self._method_masks(idx, hidden, seq)
        if not seq.pruned and extra is None and hidden is hidden_in:
            return None
        new_kwargs = dict(kwargs)
        if seq.pruned:
            new_kwargs.update(position_embeddings=seq.position_embeddings, cache_position=seq.cache_position,
                              position_ids=None,  # RoPE is in position_embeddings; FA2 must not see gapped ids
                              attention_mask=seq.mask)
        if extra is not None:
            new_kwargs["attention_mask"] = self._custom_mask(idx, extra, seq, hidden)
            if state.phase == "prefill":
                self.trace.add_time("mask", time.perf_counter() - t0)
        if args:
            return (hidden,) + tuple(args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _run_stages(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Every stage at layer ``idx``, in composition order (probe: replay, then stop at its stage)."""
        state = self.state
        for owner in self.stage_owners.get(idx, ()):
            if state.phase == "probe":
                if (idx, owner) == state.probe_target:
                    raise _ProbeDone(state.probe_fn(StageContext(self, idx, hidden, state.seq, owner)))
                hidden = self._replay_stage(idx, owner, hidden)
            else:
                hidden = self._run_stage(idx, owner, hidden)
        if state.phase == "probe" and idx >= state.probe_target[0]:
            raise RuntimeError("probe passed its stage")
        return hidden

    # -- after-attention selections (FrameFusion's hook point) ---------------------------------
    def _make_after_attention_hook(self, idx: int):
        """Pre-hook of layer ``idx``'s post_attention_layernorm: its input IS the residual stream after
        the attention (the decoder layer adds the MLP output to this same tensor), so a method's merged
        rows are written into it in place; its drops are applied before layer ``idx + 1``."""

        def hook(module, args, kwargs):
            if not self._states or self.state.phase != "prefill":
                return None
            residual = args[0] if args else kwargs["hidden_states"]
            self._run_after_attention(idx, residual)
            return None

        return hook

    def _run_after_attention(self, idx: int, residual: torch.Tensor) -> None:
        state = self.state
        t0 = time.perf_counter()
        for owner in self.after_attention_owners[idx]:
            ctx = StageContext(self, idx, residual, state.seq, owner, layer_input=state.layer_input)
            selection: Selection = self.methods[owner].after_attention(ctx)
            if selection.hidden_states is not None and selection.hidden_states is not residual:
                residual.copy_(selection.hidden_states)
            keep = selection.keep_visual
            if keep is None or [len(k) for k in keep] == ctx.visual_counts or idx + 1 >= self.num_layers:
                continue
            originals = [ctx.current_visual_index(b)[torch.as_tensor(keep[b], device=residual.device).long()]
                         for b in range(residual.shape[0])]
            state.pending.append((owner, originals))
        self.trace.add_time("select", time.perf_counter() - t0)

    def _run_after_attention_drops(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the drops decided after layer ``idx - 1``'s attention (prefill) or replay them (probe)."""
        state = self.state
        if state.phase == "probe":
            for (layer, owner), kept in self._applied_after.items():
                if layer == idx:
                    hidden = self._keep_originals(idx, owner, hidden, kept, record_kv=False)
            return hidden
        pending, state.pending = state.pending, []
        for owner, kept in pending:
            t0 = time.perf_counter()
            hidden = self._keep_originals(idx, owner, hidden, kept, record_kv=True)
            now = [v[v >= 0].clone() for v in state.seq.visual_index]
            self._applied_after[(idx, owner)] = now
            self.trace.kept.append(now)
            self.trace.stage_layers.append(idx)
            self.trace.stage_owners.append(self.method_keys[owner])
            self.trace.add_time("select", time.perf_counter() - t0)
        return hidden

    def _method_masks(self, idx: int, hidden: torch.Tensor, seq: SeqState) -> Optional[torch.Tensor]:
        """AND of the methods' custom masks for layer ``idx`` (None when no method restricts it)."""
        extra = None
        for owner, m in enumerate(self.methods):
            mask = m.attention_mask(StageContext(self, idx, hidden, seq, owner))
            if mask is not None:
                extra = structured_masks.combine(extra, mask)
        return extra

    def _run_stage(self, idx: int, owner: int, hidden: torch.Tensor) -> torch.Tensor:
        """Score, select and (unless nothing is removed) shrink the sequence before layer ``idx``."""
        state = self.state
        t0 = time.perf_counter()
        method = self.methods[owner]
        ctx = StageContext(self, idx, hidden, state.seq, owner)
        selection: Selection = method.select(ctx)
        b = hidden.shape[0]
        if selection.hidden_states is not None:
            hidden = selection.hidden_states
        keep = selection.keep_visual
        if keep is not None and len(keep) != b:
            raise RuntimeError(f"{method.name}.select returned {len(keep)} samples, expected {b}")
        if keep is not None and [len(k) for k in keep] != ctx.visual_counts:
            hidden = self._shrink(idx, method, hidden, keep, record_kv=True)
            kept = [v[v >= 0].clone() for v in state.seq.visual_index]
            self._applied[(idx, owner)] = kept
            self.trace.kept.append(kept)
            self.trace.stage_layers.append(idx)
            self.trace.stage_owners.append(self.method_keys[owner])
        self.trace.add_time("select", time.perf_counter() - t0)
        return hidden

    def _replay_stage(self, idx: int, owner: int, hidden: torch.Tensor) -> torch.Tensor:
        """In a probe: keep the tokens the real prefill kept at this stage (no merges)."""
        kept = self._applied.get((idx, owner))
        if kept is None:
            return hidden
        return self._keep_originals(idx, owner, hidden, kept, record_kv=False)

    def _keep_originals(self, idx: int, owner: int, hidden: torch.Tensor, kept: list[torch.Tensor],
                        record_kv: bool) -> torch.Tensor:
        """Shrink to the current visual tokens whose ORIGINAL index is in ``kept[b]`` (and all text)."""
        seq = self.state.seq
        keep = []
        for b in range(hidden.shape[0]):
            current = seq.visual_index[b, seq.visual_positions(b)]
            keep.append(torch.isin(current, kept[b].to(current.device)).nonzero().squeeze(1))
        return self._shrink(idx, self.methods[owner], hidden, keep, record_kv=record_kv)

    def _shrink(self, idx: int, method: PruningMethod, hidden: torch.Tensor, keep: list[torch.Tensor],
                record_kv: bool) -> torch.Tensor:
        """Gather the kept rows, their RoPE angles and masks; the new sequence becomes current."""
        state = self.state
        seq = state.seq
        index, pad = seq.keep_index(keep)
        new_hidden = gather_seq(hidden, index, 1)
        new = seq.gathered(index, pad)
        if method.compacts_at(idx):
            new = self._compact(idx, seq, new, new_hidden, record_kv)
        new = replace(new, mask=create_causal_mask(
            config=self.backbone.text_config, input_embeds=new_hidden, attention_mask=new.attention_mask_2d,
            cache_position=new.cache_position, past_key_values=None, position_ids=None))
        state.seq = new
        if record_kv:
            for layer in range(idx, self.num_layers):
                self.kv_masks[layer] = new.attention_mask_2d
        return new_hidden

    def _compact(self, idx: int, old: SeqState, new: SeqState, hidden: torch.Tensor, record: bool) -> SeqState:
        """Re-number the kept tokens 0..len-1 (left padding as generate numbers it) and remember, for
        decode, how many real tokens the layers from ``idx`` on no longer see."""
        mask2d = new.attention_mask_2d
        positions = (mask2d.cumsum(1) - 1).masked_fill(mask2d == 0, 1)  # (b, s')
        rope = self.backbone.language_model.rotary_emb(hidden, positions)
        if record:
            dropped = old.attention_mask_2d.sum(1) - mask2d.sum(1)  # (b,)
            for layer in range(idx, self.num_layers):
                self.position_shift[layer] = self.position_shift.get(layer, 0) + dropped
        return replace(new, position_embeddings=rope)

    def _custom_mask(self, idx: int, extra: torch.Tensor, seq: SeqState, hidden: torch.Tensor):
        """Causal + padding mask AND the methods' restriction, in the layer's attention format."""
        if isinstance(extra, structured_masks.SegmentRestriction):  # SegM: no dense s x s mask if it fits
            structured = self._structured_mask(idx, extra, seq, hidden)
            if structured is not None:
                return structured
            extra = extra.dense()
        b, s = hidden.shape[:2]
        allowed = torch.ones(s, s, dtype=torch.bool, device=hidden.device).tril()[None, None]  # (1, 1, s, s)
        allowed = allowed & seq.attention_mask_2d.bool()[:, None, None, :]
        allowed = allowed & extra.to(hidden.device)
        # a fully masked row (left padding) would give NaN in sdpa: let it see itself
        allowed = allowed | torch.eye(s, dtype=torch.bool, device=hidden.device)[None, None]
        impl = self.attn_implementation
        if impl == "flash_attention_2":  # FA2 takes no 4-D mask: run this one layer on sdpa
            self._switch_layer_attn(idx, "sdpa")
            impl = "sdpa"
        if impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)

    def _structured_mask(self, idx: int, extra, seq: SeqState, hidden: torch.Tensor):
        """A :class:`sharp.engine.masks.SegmentPlan` for this layer (run on the ``sharp_segments``
        attention function), or None when the dense mask is needed (mode, padding, eager, layout)."""
        mode = structured_masks.resolved_mode(hidden.device)
        if mode == "dense" or self.attn_implementation not in ("sdpa", "flash_attention_2", "flex_attention"):
            return None
        plan = structured_masks.plan(extra.to(hidden.device), seq.attention_mask_2d)
        if plan is None:
            return None
        plan.mode = mode
        structured_masks.register()
        self._switch_layer_attn(idx, structured_masks.ATTN_NAME)
        return plan

    def _switch_layer_attn(self, idx: int, impl: str) -> None:
        attn = self.backbone.layers[idx].self_attn
        if idx not in self._attn_cfg_backup:
            self._attn_cfg_backup[idx] = attn.config
            cfg = copy.copy(attn.config)
            cfg._attn_implementation = impl
            attn.config = cfg

    def _restore_attn_configs(self) -> None:
        for idx, cfg in self._attn_cfg_backup.items():
            self.backbone.layers[idx].self_attn.config = cfg
        self._attn_cfg_backup = {}

    # -- decode ----------------------------------------------------------------------------
    def _decode_layer(self, idx: int, args, kwargs):
        if idx not in self.kv_masks and idx not in self.position_shift:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        new_kwargs = dict(kwargs, position_ids=None)
        if idx in self.kv_masks:
            mask2d, mask, cache_position = self._decode_mask(idx, hidden)
            new_kwargs.update(attention_mask=mask, cache_position=cache_position)
        if idx in self.position_shift:
            new_kwargs["position_embeddings"] = self._decode_rope(idx, hidden, kwargs)
        return args, new_kwargs

    def _decode_mask(self, idx: int, hidden: torch.Tensor):
        state = self.state
        q = hidden.shape[1]
        key = id(self.kv_masks[idx])
        if key not in state.decode_masks:
            past = self.kv_masks[idx]
            full = state.model_kwargs.get("attention_mask")
            new_cols = full[:, -q:].long() if full is not None else past.new_ones(past.shape[0], q)
            mask2d = torch.cat([past, new_cols], dim=1)
            cache_position = torch.arange(past.shape[1], past.shape[1] + q, device=hidden.device)
            mask = create_causal_mask(
                config=self.backbone.text_config, input_embeds=hidden, attention_mask=mask2d,
                cache_position=cache_position, past_key_values=_MaskSizes(past.shape[1]), position_ids=None)
            state.decode_masks[key] = (mask2d, mask, cache_position)
        return state.decode_masks[key]

    def _decode_rope(self, idx: int, hidden: torch.Tensor, kwargs) -> tuple:
        """RoPE angles of this decode step shifted back by what compaction removed before ``idx``."""
        shift = self.position_shift[idx].to(hidden.device)  # (b,)
        key = tuple(shift.tolist())
        state = self.state
        if key not in state.decode_rope:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = kwargs["cache_position"][None].expand(hidden.shape[0], -1)
            state.decode_rope[key] = self.backbone.language_model.rotary_emb(hidden, pos - shift[:, None])
        return state.decode_rope[key]

    def _advance_kv_masks(self) -> None:
        """After a decode step, the layers' key masks grow by the step's columns."""
        state = self.state
        grown = {}
        for layer, m in self.kv_masks.items():
            key = id(m)
            if key in state.decode_masks:
                grown[layer] = state.decode_masks[key][0]
        self.kv_masks.update(grown)

    def drop_kv(self, layer_idx: int, keep: list[torch.Tensor], cache=None) -> None:
        """Keep only entries ``keep[b]`` (indices into layer ``layer_idx``'s cache) of each sample.

        Every sample must keep the same number of entries. Positions stay those of the kept entries
        (RoPE is already applied to cached keys).
        """
        cache = cache if cache is not None else self._last_cache
        if cache is None:
            raise RuntimeError("drop_kv needs the KV cache of a finished prefill")
        layer = cache.layers[layer_idx]
        index = torch.stack([torch.as_tensor(k, device=layer.keys.device).sort().values for k in keep])  # (b, n)
        gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = torch.gather(layer.keys, 2, gather)
        layer.values = torch.gather(layer.values, 2, gather)
        base = self.kv_masks.get(layer_idx)
        if base is None:  # this layer still had the model's own (full-length) cache
            base = self._last_mask2d
            if base is None:
                base = torch.ones(index.shape[0], cache.get_seq_length(), dtype=torch.long)
            base = base.long()
        self.kv_masks[layer_idx] = torch.gather(base.to(index.device), 1, index)

    # -- probe -----------------------------------------------------------------------------
    def probe(self, inputs: dict, stage: tuple[int, int], fn: Callable) -> Any:
        """Run the model on ``inputs`` (no cache) up to ``stage`` = (layer, owner), replaying the
        earlier stages' selections, and return fn(ctx) there."""
        self._states.append(_CallState(phase="probe-pending", probe_target=stage, probe_fn=fn))
        inner = self.backbone.model.model
        saved_rope_deltas = getattr(inner, "rope_deltas", None)  # Qwen2-VL caches it per prefill
        try:
            with torch.no_grad():
                self.backbone.model(**{k: v for k, v in inputs.items()
                                       if k not in ("past_key_values", "use_cache", "cache_position")},
                                    use_cache=False)
        except _ProbeDone as done:
            return done.result
        finally:
            self._states.pop()
            if hasattr(inner, "rope_deltas"):
                inner.rope_deltas = saved_rope_deltas
        raise RuntimeError(f"probe never reached layer {stage[0]}")


@contextlib.contextmanager
def prune(backbone, method: str | PruningMethod = "vanilla", retention: float = 1.0, **method_kwargs):
    """Prune visual tokens of ``backbone.model`` inside the block; yields the :class:`Trace`.

    ``method`` is a registered name (``sharp.method_names()``), a ``+``-joined composition
    (``"visionzip+sharp"``) or a method instance (``sharp.compose(m1, m2)`` included), resolved for the
    backbone by :func:`sharp.methods.settings.resolve_method` (unset layers follow its depth, automatic
    positions; an instance's automatic settings are filled in a copy); ``retention``
    in (0, 1] is the kept share of the ORIGINAL visual tokens; ``method_kwargs`` override the method's
    defaults (e.g. ``layer=3``; for a composition, per child: ``sharp={"layer": 2, "retention": 0.1}``).
    Leaving the block (also by an exception) removes every hook.
    """
    if isinstance(method, PruningMethod) and method_kwargs:
        raise TypeError("pass method kwargs to the method instance, not to prune()")
    m = resolve_method(method, backbone, retention, **method_kwargs).method
    session = PruningSession(backbone, m)
    try:
        session.install()
        yield session.trace
    finally:
        session.remove()
