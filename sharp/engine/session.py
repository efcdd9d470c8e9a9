"""The pruning session: hooks one method into one unmodified HF video LLM (see docs/engine.md).

It is three parts wired to the model's hooks:

* a :class:`~sharp.engine.plan.PruningPlan` (which method acts before / after which decoder layer);
* a :class:`~sharp.engine.prefill.PrefillRunner` (stages, masks and probes inside a prefill);
* a :class:`~sharp.engine.decode.DecodePatcher` (per-layer cache lengths and positions in decode).

A forward pre-hook on the top-level model tells a prefill (empty cache), a decode step and a probe
apart; a pre-hook on every decoder layer hands the layer to the runner (prefill, probe) or the patcher
(decode); vision-layer hooks keep the calls a method reads maps of; a pre-hook on a layer's
``post_attention_layernorm`` runs the after-attention selections. Methods see the session only through
:class:`~sharp.engine.context.StageContext` (a layer) and :class:`~sharp.engine.context.SessionContext`
(``install`` and ``after_prefill``). Leaving the ``sharp.prune`` block removes every hook; the model is
untouched.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sharp.engine import compat
from sharp.engine.context import DecodeContext, LayerRows, SessionContext
from sharp.engine.decode import DecodePatcher
from sharp.engine.method import PruningMethod
from sharp.engine.plan import PruningPlan
from sharp.engine.prefill import PrefillRunner
from sharp.engine.trace import Trace


class PruningSession:
    """One (possibly composed) method hooked into one backbone; created by :func:`sharp.prune`."""

    def __init__(self, backbone, method: PruningMethod):
        self.backbone = backbone
        self.method = method
        self.plan = PruningPlan.of(backbone, method)
        self.trace = Trace()
        self.kv = DecodePatcher(backbone)
        self.prefill = PrefillRunner(backbone, self.plan, self.trace, self.kv)
        self.kv.decode_stage = self._decode_stage
        self.kv.decode_stage_layers = frozenset(self.plan.decode_stage_owners)
        self._call: Optional[str] = None  # the top-level call in progress or last: prefill | decode
        self._handles: list = []

    @property
    def phase(self) -> Optional[str]:
        """prefill | probe | decode (None before the first call)."""
        if self._call == "prefill" and self.prefill.active:
            return self.prefill.phase
        return self._call

    def context(self, owner: int) -> SessionContext:
        return SessionContext(self, owner)

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
            self.add_hook(layer, self._layer_hook(i))
        for i in self.plan.after_attention_owners:
            self.add_hook(self.backbone.layers[i].post_attention_layernorm, self._after_attention_hook(i))
        for i in self.plan.vision_layers:
            pre, post = self.prefill.vision_capture_hooks(i)
            self.add_hook(self.backbone.vision_layers[i], pre)
            self.add_hook(self.backbone.vision_layers[i], post, pre=False)
        self.backbone.install_session_hooks(self)  # family hooks (Qwen2.5-VL grid, Qwen3-VL DeepStack)
        for owner, m in enumerate(self.plan.methods):
            m.install(self.context(owner))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.prefill.reset()
        self._call = None

    # -- hooks -------------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.prefill.probe_pending:  # the model called again by a stage: its probe
            self.prefill.start(input_ids, kwargs)
            return None
        pkv = compat.cache_of(kwargs)
        self.kv.last_mask2d = kwargs.get("attention_mask")
        if pkv is None or pkv.get_seq_length() == 0:
            self._call = "prefill"
            self.prefill.start(input_ids, kwargs)
        else:
            self._call = "decode"
            self.kv.start_step(kwargs.get("attention_mask"), pkv)
        return None

    def _model_post_hook(self, module, args, kwargs, output):
        if self.phase == "prefill":
            self.kv.finish_call(output)
            self.prefill.finish()
            self.kv.record_cache_rows({i: self.prefill.layer_sequence(i).visual_index
                                      for i in range(self.plan.num_layers)})
            for owner, m in enumerate(self.plan.methods):
                m.after_prefill(self.context(owner))
        elif self.phase == "decode":
            self.kv.finish_call(output)
            self.kv.finish_step()
        return None

    def _layer_hook(self, idx: int):
        def hook(module, args, kwargs):
            phase = self.phase
            if phase == "decode":
                return self.kv.layer_kwargs(idx, args, kwargs)
            if phase in ("prefill", "probe"):
                return self.prefill.layer_kwargs(idx, args, kwargs)
            return None

        return hook

    # -- decode stages (DyCoke) ---------------------------------------------------------------------
    def _decode_stage(self, idx: int, hidden: torch.Tensor) -> list:
        """Every decode stage at layer ``idx`` in this step, in composition order: per owner, the
        visual cache entries (ORIGINAL ids per sample) its query may see from ``idx`` on, or None (all)."""
        chosen = []
        for owner in self.plan.decode_stage_owners[idx]:
            ctx = DecodeContext(self, idx, owner)
            with self.trace.timed("decode_select", self.backbone.device):
                selection = self.plan.methods[owner].decode_select(ctx)
            if selection.hidden_states is not None or selection.new_rows is not None:
                raise ValueError(f"{self.plan.keys[owner]}: a decode selection cannot replace hidden states")
            kept = None
            if selection.keep_visual is not None:
                kept = []
                for b, k in enumerate(selection.keep_visual):
                    index = ctx.visual_index(b)  # (n_b,) ORIGINAL ids of the layer's cached visual entries
                    kept.append(index[torch.as_tensor(k, device=index.device).long()].sort().values)
            self.trace.record_decode_selection(self.kv.step_index, idx, self.plan.keys[owner], kept)
            chosen.append(kept)
        return chosen

    # -- layer watchers (SessionContext.watch_layers) ----------------------------------------------
    def watch_layers(self, fn: Callable, where: str = "input") -> None:
        """Call ``fn(LayerRows)`` with every decoder layer's prefill input (after the stages before it) or
        output, during the prefill only (not in probes or decode)."""
        if where not in ("input", "output"):
            raise ValueError(f"watch_layers: where must be 'input' or 'output', got {where!r}")
        for idx, layer in enumerate(self.backbone.layers):
            if where == "input":
                self.add_hook(layer, self._input_watcher(idx, fn))  # runs after the engine's pre-hook
            else:
                self.add_hook(layer, self._output_watcher(idx, fn), pre=False)

    def _input_watcher(self, idx: int, fn: Callable):
        def hook(module, args, kwargs):
            if self.phase == "prefill":
                fn(LayerRows(idx, args[0] if args else kwargs["hidden_states"], self.prefill.state.seq))
            return None

        return hook

    def _output_watcher(self, idx: int, fn: Callable):
        def hook(module, args, kwargs, output):
            if self.phase == "prefill":
                fn(LayerRows(idx, output[0] if isinstance(output, tuple) else output, self.prefill.layer_sequence(idx)))
            return None

        return hook

    def _after_attention_hook(self, idx: int):
        """Pre-hook of layer ``idx``'s post_attention_layernorm: its input IS the residual stream after
        the attention (the decoder layer adds the MLP output to this same tensor)."""

        def hook(module, args, kwargs):
            if self.phase == "prefill":
                self.prefill.after_attention(idx, args[0] if args else kwargs["hidden_states"])
            return None

        return hook
