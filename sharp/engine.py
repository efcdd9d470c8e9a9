"""The pruning engine: prunes visual tokens inside an unmodified HF video LLM during prefill.

Mechanism (see docs/engine.md and ../shared/notes/engine.md):

* A forward pre-hook on the top-level model records the call (prefill vs decode, input_ids ->
  visual mask, 2-D padding mask) and a pre-hook on every decoder layer substitutes that layer's
  inputs: hidden states, attention mask, (cos, sin) position embeddings, cache_position.
* A stage at layer k (``method.stages``) runs before layer k in prefill: the method scores and
  selects; the engine gathers the kept tokens (all text + chosen visual, original order), their
  ORIGINAL RoPE angles and padding mask, and rebuilds the causal mask for the short sequence with
  transformers' own ``create_causal_mask`` (so every attention implementation gets its own format).
* KV cache: layers < k keep the full cache, layers >= k the pruned one (DynamicCache layers have
  independent lengths). ``get_seq_length()`` reads layer 0, so generate's positions and Qwen2-VL's
  ``rope_deltas`` stay in the original frame. In decode, every layer whose cache was shortened gets
  a mask built for ITS cache length.
* Leaving the ``with`` block removes every hook; the model is untouched.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers.masking_utils import create_causal_mask

from sharp.backbones import Backbone, VisualLayout
from sharp.methods import PruningMethod, Selection, make_method


def cuda_sync(device: torch.device) -> None:
    """Wait for the GPU so that perf_counter brackets the real work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
class Trace:
    """What pruning did during the last prefill of a ``sharp.prune`` block.

    kept: [stage][sample] -> 1-D LongTensor of ORIGINAL visual indices present after the stage.
    visual_tokens_per_layer: visual tokens each decoder layer processed in prefill (sample 0).
    stage_times: seconds spent per named step (methods add their own keys, e.g. ShaRP's).
    Methods may attach more attributes (e.g. ``segments``).
    """

    kept: list[list[torch.Tensor]] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    n_visual: int = 0
    stage_times: dict[str, float] = field(default_factory=dict)
    prefill_calls: int = 0
    segments: list = field(default_factory=list)  # ShaRP/SegM: per sample [(first_frame, last_frame), ...]

    def add_time(self, key: str, seconds: float) -> None:
        self.stage_times[key] = self.stage_times.get(key, 0.0) + seconds


@dataclass
class _SeqState:
    """The current (possibly pruned) prefill sequence as seen by the layers from some layer on."""

    attention_mask_2d: Optional[torch.Tensor] = None  # (b, s) long
    visual_mask: Optional[torch.Tensor] = None  # (b, s) bool
    visual_index: Optional[torch.Tensor] = None  # (b, s) long, original visual index or -1
    position_embeddings: Optional[tuple] = None  # (cos, sin) with the seq dim at -2
    mask: Any = None  # the layer attention mask for this sequence (model format)
    cache_position: Optional[torch.Tensor] = None
    pruned: bool = False  # sequence differs from the model's own


@dataclass
class _CallState:
    """State of one top-level forward (prefill, decode step or probe)."""

    phase: str = "prefill"  # prefill | decode | probe
    layout: Optional[VisualLayout] = None
    seq: _SeqState = field(default_factory=_SeqState)
    layer_inputs: dict = field(default_factory=dict)  # layer -> (hidden, position_embeddings, seq)
    probe_stage: Optional[int] = None
    probe_fn: Optional[Callable] = None
    decode_masks: dict = field(default_factory=dict)  # id(kv mask) -> built mask (one decode step)
    model_kwargs: dict = field(default_factory=dict)


def _gather_seq(x: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather along ``seq_dim`` with per-sample ``index`` (b, s'); x's batch dim is seq_dim - 1."""
    batch_dim = seq_dim - 1 if seq_dim > 0 else x.dim() + seq_dim - 1
    seq_dim = seq_dim % x.dim()
    b = index.shape[0]
    if x.shape[batch_dim] != b:
        x = x.expand(*[b if d == batch_dim else -1 for d in range(x.dim())])
    shape = [1] * x.dim()
    shape[batch_dim], shape[seq_dim] = b, index.shape[1]
    idx = index.view(shape).expand(*[index.shape[1] if d == seq_dim else x.shape[d] for d in range(x.dim())])
    return torch.gather(x, seq_dim, idx)


class StageContext:
    """Everything a method's ``select`` may look at, for one stage of one prefill."""

    def __init__(self, session: "PruningSession", layer_idx: int, hidden_states: torch.Tensor, seq: _SeqState):
        self.session = session
        self.layer_idx = layer_idx
        self.hidden_states = hidden_states  # (b, s, d)
        self._seq = seq

    backbone = property(lambda self: self.session.backbone)
    layout = property(lambda self: self.session.state.layout)
    visual_mask = property(lambda self: self._seq.visual_mask)  # (b, s) bool
    visual_index = property(lambda self: self._seq.visual_index)  # (b, s) long
    attention_mask_2d = property(lambda self: self._seq.attention_mask_2d)  # (b, s)
    position_embeddings = property(lambda self: self._seq.position_embeddings)

    def visual_positions(self, b: int) -> torch.Tensor:
        """Sequence positions of sample b's current visual tokens, in order."""
        return self.visual_mask[b].nonzero().squeeze(1)

    def visual_hidden_states(self, b: int) -> torch.Tensor:
        return self.hidden_states[b, self.visual_positions(b)]

    def current_visual_index(self, b: int) -> torch.Tensor:
        """Original visual indices of sample b's current visual tokens."""
        return self.visual_index[b, self.visual_positions(b)]

    def last_token_attention(self, layer: Optional[int] = None, queries: int = 1, rope: bool = True,
                             softmax_over: str = "all", space: str = "prob") -> torch.Tensor:
        """Attention of the last ``queries`` tokens in layer ``layer`` (default: this stage's layer).

        Returns (b, s) float32: softmax(q k^T / sqrt(d_h) + mask) averaged over heads and queries,
        recomputed from that layer's input (input_layernorm, q_proj on the last rows, k_proj on all
        rows, RoPE) without building the N x N matrix. ``softmax_over="visual"`` normalises over the
        visual keys only (FEATHER); ``rope=False`` skips RoPE (FEATHER's de-RoPE criterion);
        ``space="logit"`` returns the pre-softmax logits q k^T / sqrt(d_h) averaged the same way
        (masked keys read 0).
        """
        layer = self.layer_idx if layer is None else layer
        if layer == self.layer_idx:
            hidden, pos = self.hidden_states, self._seq.position_embeddings
        else:
            if layer not in self.session.state.layer_inputs:
                raise RuntimeError(f"layer {layer}'s input was not recorded: list it in the method's score_layers()")
            hidden, pos, seq = self.session.state.layer_inputs[layer]
            if hidden.shape[1] != self.hidden_states.shape[1]:
                raise RuntimeError(f"layer {layer}'s input has a different sequence than stage layer {self.layer_idx}")
        return attention_of_last_tokens(
            self.backbone, layer, hidden, pos, self.attention_mask_2d, queries=queries, rope=rope,
            key_mask=self.visual_mask if softmax_over == "visual" else None, space=space)

    def probe(self, modify_inputs: Callable[[dict], dict], fn: Callable[["StageContext"], Any]) -> Any:
        """Forward ``modify_inputs(prefill inputs)`` without pruning or cache up to this stage; return fn(ctx)."""
        return self.session.probe(modify_inputs(dict(self.session.prefill_inputs)), self.layer_idx, fn)


def rope_apply(backbone: Backbone, layer: int) -> Callable:
    """The attention module's own RoPE function, as f(x (b, h, n, d), cos, sin) -> x."""
    attn = backbone.layers[layer].self_attn
    module = sys.modules[type(attn).__module__]
    if hasattr(module, "apply_multimodal_rotary_pos_emb"):
        section = attn.rope_scaling["mrope_section"]
        return lambda x, cos, sin: module.apply_multimodal_rotary_pos_emb(x, x, cos, sin, section)[0]
    return lambda x, cos, sin: module.apply_rotary_pos_emb(x, x, cos, sin)[0]


def attention_of_last_tokens(backbone: Backbone, layer: int, hidden: torch.Tensor, position_embeddings,
                             attention_mask_2d: Optional[torch.Tensor], queries: int = 1, rope: bool = True,
                             key_mask: Optional[torch.Tensor] = None, space: str = "prob") -> torch.Tensor:
    """Head- and query-averaged attention of the last ``queries`` tokens of ``hidden`` in ``layer``.

    hidden: (b, s, d) input of the layer; returns (b, s) float32: softmax probabilities
    (``space="prob"``) or pre-softmax logits (``space="logit"``, masked keys 0).
    """
    if space not in ("prob", "logit"):
        raise ValueError(f"space must be 'prob' or 'logit', got {space!r}")
    block = backbone.layers[layer]
    attn = block.self_attn
    b, s, _ = hidden.shape
    hd = attn.head_dim
    n_heads = attn.config.num_attention_heads
    n_kv = attn.config.num_key_value_heads
    x = block.input_layernorm(hidden)
    q = attn.q_proj(x[:, -queries:]).view(b, queries, n_heads, hd).transpose(1, 2)  # (b, H, n, hd)
    k = attn.k_proj(x).view(b, s, n_kv, hd).transpose(1, 2)  # (b, KV, s, hd)
    if rope:
        cos, sin = position_embeddings
        apply = rope_apply(backbone, layer)
        q = apply(q, cos[..., -queries:, :], sin[..., -queries:, :])
        k = apply(k, cos, sin)
    groups = n_heads // n_kv
    q = q.float().view(b, n_kv, groups, queries, hd)
    logits = torch.einsum("bkgnd,bksd->bkgns", q, k.float()) * attn.scaling  # (b, KV, G, n, s)
    allowed = torch.ones(b, queries, s, dtype=torch.bool, device=hidden.device)
    qpos = torch.arange(s - queries, s, device=hidden.device)
    allowed &= torch.arange(s, device=hidden.device)[None, None, :] <= qpos[None, :, None]  # causal
    if attention_mask_2d is not None:
        allowed &= attention_mask_2d.bool()[:, None, :]
    if key_mask is not None:
        allowed &= key_mask.bool()[:, None, :]
    if space == "logit":
        return logits.masked_fill(~allowed[:, None, None], 0.0).mean(dim=(1, 2, 3))
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=(1, 2, 3))  # (b, s)


class PruningSession:
    """Hooks one method into one backbone; created by :func:`prune`."""

    def __init__(self, backbone: Backbone, method: PruningMethod):
        self.backbone = backbone
        self.method = method
        self.trace = Trace()
        self.num_layers = backbone.num_layers
        self.stage_layers = sorted(method.stages(self.num_layers))
        bad = [k for k in self.stage_layers if not 0 <= k < self.num_layers]
        if bad:
            raise ValueError(f"{method.name}: stage layer(s) {bad} outside 0..{self.num_layers - 1}")
        self.score_layers = set(method.score_layers(self.num_layers))
        self.prefill_inputs: dict = {}
        self._states: list[_CallState] = []
        self._handles: list = []
        # per layer: the 2-D key mask of its KV cache (b, kv_len) when it differs from the model's
        self.kv_masks: dict[int, torch.Tensor] = {}
        self._attn_cfg_backup: dict[int, Any] = {}

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> _CallState:
        return self._states[-1]

    @property
    def attn_implementation(self) -> str:
        return self.backbone.text_config._attn_implementation

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
        self.method.install(self)

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
            if input_ids is None:
                raise ValueError("sharp.prune needs input_ids in the model call (inputs_embeds alone hide the visual tokens)")
            state.layout = self.backbone.layout(kwargs if "input_ids" in kwargs else {**kwargs, "input_ids": input_ids})
            mask2d = kwargs.get("attention_mask")
            if mask2d is None:
                mask2d = torch.ones_like(input_ids)
            vis = self.backbone.visual_mask(input_ids, state.layout)
            vidx = torch.where(vis, vis.long().cumsum(1) - 1, torch.full_like(input_ids, -1))
            state.seq = _SeqState(attention_mask_2d=mask2d.long(), visual_mask=vis, visual_index=vidx)
            if state.phase == "prefill":
                cuda_sync(input_ids.device)
                self._prefill_t0 = time.perf_counter()
                self.prefill_inputs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
                if input_ids is not None and "input_ids" not in kwargs:
                    self.prefill_inputs["input_ids"] = input_ids
                self.kv_masks = {}
                self.trace.kept = []
                self.trace.visual_tokens_per_layer = []
                self.trace.stage_times = {}
                self.trace.n_visual = state.layout.n_visual
                self.trace.prefill_calls += 1
        else:
            state.model_kwargs = {"attention_mask": kwargs.get("attention_mask")}
        if state.phase != "probe":
            self._last_mask2d = kwargs.get("attention_mask")
        return None

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
            self.trace.stage_times["prefill"] = time.perf_counter() - self._prefill_t0
            self.method.after_prefill(self)
        else:
            self._advance_kv_masks()
        return None

    # -- layer hook ------------------------------------------------------------------------
    def _make_layer_hook(self, idx: int):
        def hook(module, args, kwargs):
            if not self._states:
                return None
            state = self.state
            if state.phase == "decode":
                return self._decode_layer(idx, args, kwargs)
            if state.phase in ("prefill", "probe"):
                return self._prefill_layer(idx, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, idx: int, args, kwargs):
        state = self.state
        seq = state.seq
        hidden = args[0] if args else kwargs["hidden_states"]
        if not seq.pruned:
            seq.position_embeddings = kwargs["position_embeddings"]
        changed = seq.pruned

        if idx in self.stage_layers:
            if state.phase == "probe" and idx == state.probe_stage:
                raise _ProbeDone(state.probe_fn(StageContext(self, idx, hidden, seq)))
            if state.phase == "prefill":
                hidden = self._run_stage(idx, hidden, kwargs)
                changed = changed or seq.pruned
        if state.phase == "probe" and state.probe_stage is not None and idx > state.probe_stage:
            raise RuntimeError("probe passed its stage")

        if idx in self.score_layers:
            state.layer_inputs[idx] = (hidden, seq.position_embeddings, seq)
        if state.phase == "prefill" and len(self.trace.visual_tokens_per_layer) == idx:
            self.trace.visual_tokens_per_layer.append(int(seq.visual_mask[0].sum()))

        t0 = time.perf_counter()
        extra = self.method.attention_mask(self, idx)
        if not changed and extra is None:
            return None
        new_kwargs = dict(kwargs)
        if changed:
            new_kwargs["position_embeddings"] = seq.position_embeddings
            new_kwargs["cache_position"] = seq.cache_position
            new_kwargs["position_ids"] = None  # RoPE is in position_embeddings; FA2 must not see gapped ids
            new_kwargs["attention_mask"] = seq.mask
        if extra is not None:
            new_kwargs["attention_mask"] = self._custom_mask(idx, extra, seq, hidden)
            if state.phase == "prefill":
                self.trace.add_time("mask", time.perf_counter() - t0)
        return (hidden,) + tuple(args[1:]), new_kwargs

    def _run_stage(self, idx: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        """Score, select and shrink the sequence before layer ``idx``."""
        seq = self.state.seq
        t0 = time.perf_counter()
        ctx = StageContext(self, idx, hidden, seq)
        selection: Selection = self.method.select(ctx)
        b = hidden.shape[0]
        if len(selection.keep_visual) != b:
            raise RuntimeError(f"{self.method.name}.select returned {len(selection.keep_visual)} samples, expected {b}")
        if selection.hidden_states is not None:
            hidden = selection.hidden_states
        keep_rows = []
        for i in range(b):
            vis_pos = ctx.visual_positions(i)
            kv = torch.as_tensor(selection.keep_visual[i], device=hidden.device).long()
            keep = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
            keep[vis_pos] = False
            keep[vis_pos[kv]] = True
            keep_rows.append(keep.nonzero().squeeze(1))
        lengths = [len(r) for r in keep_rows]
        s_new = max(lengths)
        # left-pad shorter samples (index 0, masked out) so the batch stays rectangular
        index = torch.stack([torch.cat([r.new_zeros(s_new - len(r)), r]) for r in keep_rows])  # (b, s')
        pad = torch.stack([torch.arange(s_new, device=hidden.device) < (s_new - n) for n in lengths])  # (b, s')

        new_hidden = _gather_seq(hidden, index, 1)
        cos, sin = seq.position_embeddings
        seq.position_embeddings = (_gather_seq(cos, index, -2), _gather_seq(sin, index, -2))
        seq.attention_mask_2d = torch.gather(seq.attention_mask_2d, 1, index).masked_fill(pad, 0)
        seq.visual_mask = torch.gather(seq.visual_mask, 1, index) & ~pad
        seq.visual_index = torch.gather(seq.visual_index, 1, index).masked_fill(pad, -1)
        seq.cache_position = torch.arange(s_new, device=hidden.device)
        seq.mask = create_causal_mask(
            config=self.backbone.text_config, input_embeds=new_hidden, attention_mask=seq.attention_mask_2d,
            cache_position=seq.cache_position, past_key_values=None, position_ids=None)
        seq.pruned = True
        for layer in range(idx, self.num_layers):
            self.kv_masks[layer] = seq.attention_mask_2d
        kept = []
        for i in range(b):
            v = seq.visual_index[i]
            kept.append(v[v >= 0].clone())
        self.trace.kept.append(kept)
        self.trace.add_time("select", time.perf_counter() - t0)
        return new_hidden

    def _custom_mask(self, idx: int, extra: torch.Tensor, seq: _SeqState, hidden: torch.Tensor):
        """Causal + padding mask AND the method's restriction, in the layer's attention format."""
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

    def _switch_layer_attn(self, idx: int, impl: str) -> None:
        import copy

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
        if idx not in self.kv_masks:
            return None
        state = self.state
        hidden = args[0] if args else kwargs["hidden_states"]
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
        mask2d, mask, cache_position = state.decode_masks[key]
        new_kwargs = dict(kwargs, attention_mask=mask, cache_position=cache_position, position_ids=None)
        return args, new_kwargs

    def _advance_kv_masks(self) -> None:
        """After a decode step, the layers' key masks grow by the step's columns."""
        state = self.state
        if state.phase != "decode":
            return
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

    _last_cache = None
    _last_mask2d = None

    # -- probe -----------------------------------------------------------------------------
    def probe(self, inputs: dict, stage_layer: int, fn: Callable) -> Any:
        """Run the model on ``inputs`` (no cache, no pruning) and return fn(ctx) at ``stage_layer``."""
        self._states.append(_CallState(phase="probe-pending", probe_stage=stage_layer, probe_fn=fn))
        inner = self.backbone.model.model
        saved_rope_deltas = getattr(inner, "rope_deltas", None)  # Qwen2-VL caches it per prefill
        try:
            with torch.no_grad():
                self.backbone.model(**{k: v for k, v in inputs.items() if k not in ("past_key_values", "use_cache",
                                                                                     "cache_position")},
                                    use_cache=False)
        except _ProbeDone as done:
            return done.result
        finally:
            self._states.pop()
            if hasattr(inner, "rope_deltas"):
                inner.rope_deltas = saved_rope_deltas
        raise RuntimeError(f"probe never reached layer {stage_layer}")


@contextlib.contextmanager
def prune(backbone: Backbone, method: str | PruningMethod = "vanilla", retention: float = 1.0, **method_kwargs):
    """Prune visual tokens of ``backbone.model`` inside the block; yields the :class:`Trace`.

    ``method`` is a registered name (see ``sharp.methods.method_names()``) or a method instance;
    ``retention`` in (0, 1] is the kept share of visual tokens; ``method_kwargs`` override the
    method's defaults (e.g. ``layer=3``). Leaving the block (also by an exception) removes every hook.
    """
    if isinstance(method, PruningMethod):
        if method_kwargs:
            raise TypeError("pass method kwargs to the method instance, not to prune()")
        m = method
    else:
        m = make_method(method, retention, **method_kwargs)
    session = PruningSession(backbone, m)
    try:
        session.install()
        yield session.trace
    finally:
        session.remove()
