"""Decode after a pruned prefill: each decoder layer's KV cache has its own length and positions.

Layers before a method's first stage keep the model's full cache; the layers from a stage on cache
only the kept tokens (DynamicCache layers have independent lengths). ``get_seq_length()`` reads
layer 0, so generate's positions and Qwen2-VL's ``rope_deltas`` stay in the original frame. In every
decode step a layer whose cache was shortened gets a causal mask built for ITS cache length (from the
key mask the prefill recorded for it), and, after a compacting stage (``positions="compact"``), RoPE
angles shifted back by the real tokens the compaction removed before that layer.

Decode stages (``PruningMethod.decode_stages``, DyCoke's dynamic KV selection): before such a layer, in
every decode step, the owner chooses which visual cache entries the step's query may see there and in
every later layer; the patcher masks the others out of that step's attention (the cache keeps them:
a later step may choose them again).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from sharp.engine import compat
from sharp.engine.attention import attention_of_query_over_cache


@dataclass
class _DecodeStep:
    """What one decode step computes once and shares between the layers with the same cache."""

    attention_mask: Optional[torch.Tensor]  # (b, kv_total) the model call's 2-D mask, or None
    index: int = -1  # decode steps since the prefill (0: the first)
    cache: Any = None  # the step's KV cache (a layer that already ran holds this step's keys too)
    masks: dict = field(default_factory=dict)  # id(key mask) -> (mask2d, mask, cache_position)
    rope: dict = field(default_factory=dict)  # shift tuple -> (cos, sin)
    keep: Optional[list[torch.Tensor]] = None  # visual entries visible from the last decode stage on (ORIGINAL ids)
    keep_version: int = 0  # bumped by every decode stage that restricts
    restricted: dict = field(default_factory=dict)  # (id(key mask) or None, version) -> (mask2d, mask)
    inputs: dict = field(default_factory=dict)  # layer -> (hidden (b, q, d), position_embeddings, key mask2d)


class DecodePatcher:
    """The per-layer cache bookkeeping of a pruned prefill, and the decode-step inputs it implies."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.num_layers = backbone.num_layers
        self.kv_masks: dict[int, torch.Tensor] = {}  # layer -> (b, kv_len) key mask of its cache
        self.position_shift: dict[int, torch.Tensor] = {}  # layer -> (b,) real tokens dropped by compaction
        self.last_cache = None  # the cache of the last finished prefill or decode step
        self.last_mask2d: Optional[torch.Tensor] = None  # the last top-level call's 2-D mask
        self.cache_visual_index: dict[int, torch.Tensor] = {}  # layer -> (b, kv_prefill) ORIGINAL visual id or -1
        # decode stages: fn(layer, hidden) -> [per owner: per-sample visible visual ids (ORIGINAL) or None]
        self.decode_stage: Optional[Callable] = None
        self.decode_stage_layers: frozenset[int] = frozenset()
        self._step = _DecodeStep(None)

    # -- what the prefill records --------------------------------------------------------------
    def start_prefill(self) -> None:
        self.kv_masks, self.position_shift, self.cache_visual_index = {}, {}, {}
        self._step = _DecodeStep(None)
        self.last_cache = None  # set when this prefill returns its cache (None: it ran with use_cache=False)

    def record_pruned(self, from_layer: int, mask2d: torch.Tensor) -> None:
        """Layers ``from_layer`` .. L-1 cache the sequence whose 2-D mask is ``mask2d`` (b, s')."""
        for layer in range(from_layer, self.num_layers):
            self.kv_masks[layer] = mask2d

    def record_shift(self, from_layer: int, dropped: torch.Tensor) -> None:
        """A compaction before ``from_layer`` removed ``dropped[b]`` (b,) real tokens' positions."""
        for layer in range(from_layer, self.num_layers):
            self.position_shift[layer] = self.position_shift.get(layer, 0) + dropped

    def record_cache_rows(self, visual_index: dict[int, torch.Tensor]) -> None:
        """The prefill's rows of each layer's cache: {layer: (b, kv) ORIGINAL visual index or -1}."""
        self.cache_visual_index = dict(visual_index)

    def finish_call(self, output) -> None:
        """A prefill or decode step finished: its cache is the one ``drop_kv`` edits."""
        pkv = compat.output_cache(output)
        if pkv is not None:
            self.last_cache = pkv

    # -- a decode step -----------------------------------------------------------------------------
    def start_step(self, attention_mask: Optional[torch.Tensor], cache=None) -> None:
        self._step = _DecodeStep(attention_mask, index=self._step.index + 1, cache=cache)

    @property
    def step_index(self) -> int:
        """The decode step in progress (0: the first after the prefill)."""
        return self._step.index

    def layer_kwargs(self, idx: int, args, kwargs):
        """The forward pre-hook result for decoder layer ``idx`` in a decode step (None: unchanged)."""
        hidden = args[0] if args else kwargs["hidden_states"]  # (b, q, d)
        if idx in self.decode_stage_layers:
            for keep in self.decode_stage(idx, hidden):
                self._restrict(keep)
        restricted = self._step.keep is not None
        if idx not in self.kv_masks and idx not in self.position_shift and not restricted:
            self._step.inputs[idx] = (hidden, kwargs.get("position_embeddings"), None)
            return None
        new_kwargs = dict(kwargs, position_ids=None)
        mask2d = None
        if idx in self.kv_masks:
            mask2d, mask, cache_position = self._mask(idx, hidden)
            new_kwargs["attention_mask"] = mask
            compat.set_cache_position(self.backbone.layers[idx], new_kwargs, cache_position)
        if restricted:
            mask2d, new_kwargs["attention_mask"] = self._restricted_mask(idx, hidden, mask2d)
        if idx in self.position_shift:
            new_kwargs["position_embeddings"] = self._rope(idx, hidden, kwargs)
        self._step.inputs[idx] = (hidden, new_kwargs.get("position_embeddings"), mask2d)
        return args, new_kwargs

    # -- decode stages ------------------------------------------------------------------------------
    def _restrict(self, keep: Optional[list[torch.Tensor]]) -> None:
        """A decode stage chose the visible visual entries ``keep[b]`` (ORIGINAL ids; None: no change);
        an earlier stage's choice in the same step stays in force (intersection)."""
        if keep is None:
            return
        if self._step.keep is not None:
            keep = [k[torch.isin(k, prev.to(k.device))] for k, prev in zip(keep, self._step.keep)]
        self._step.keep = keep
        self._step.keep_version += 1

    def _restricted_mask(self, idx: int, hidden: torch.Tensor, base2d: Optional[torch.Tensor]):
        """(mask2d (b, kv + q), 4-D mask) of layer ``idx`` in this step: its key mask (the pruned
        prefill's, grown by the step, or the model call's) with the unselected visual entries off."""
        key = (id(self.kv_masks[idx]) if idx in self.kv_masks else None, self._step.keep_version)
        if key not in self._step.restricted:
            q = hidden.shape[1]
            past = self._cache_length(idx)
            if base2d is None:
                full = self._step.attention_mask
                base2d = full.long() if full is not None else torch.ones(
                    hidden.shape[0], past + q, dtype=torch.long, device=hidden.device)
            visible = self._visible_entries(idx, base2d.shape[1])  # (b, kv + q)
            mask2d = base2d * visible.to(base2d.device, base2d.dtype)
            mask = compat.causal_mask(self.backbone.text_config, hidden, mask2d, past=past)
            self._step.restricted[key] = (mask2d, mask)
        return self._step.restricted[key]

    def _visible_entries(self, idx: int, length: int) -> torch.Tensor:
        """(b, length) bool: layer ``idx``'s cache entries the step's query may see (every non-visual one
        and the chosen visual ones)."""
        rows = self.cache_rows(idx, length)  # (b, length)
        table = torch.zeros(rows.shape[0], int(rows.max().clamp_min(0)) + 1, dtype=torch.bool, device=rows.device)
        for b, kept in enumerate(self._step.keep):
            kept = kept.to(rows.device)
            table[b, kept[kept < table.shape[1]]] = True
        return (rows < 0) | torch.gather(table, 1, rows.clamp_min(0))

    def cache_rows(self, idx: int, length: int) -> torch.Tensor:
        """(b, length) ORIGINAL visual index of each entry of layer ``idx``'s cache (-1: text, padding or a
        generated token), for a cache that holds ``length`` entries."""
        rows = self.cache_visual_index[idx]
        if rows.shape[1] < length:
            rows = torch.cat([rows, rows.new_full((rows.shape[0], length - rows.shape[1]), -1)], dim=1)
        return rows[:, :length]

    def _cache_length(self, idx: int) -> int:
        """Entries layer ``idx``'s cache held before this step."""
        return int(self._step.cache.get_seq_length(idx)) if self._step.cache is not None else 0

    def query_attention(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention (b, kv) float32, visual ids (b, kv)): the step's last query over layer ``layer``'s
        cache (which already holds this step's key: the layer must have run), head mean, softmax over
        the entries its attention saw; and the ORIGINAL visual index of each entry (-1: not visual)."""
        if layer not in self._step.inputs:
            raise RuntimeError(f"layer {layer} has not run in this decode step: a decode stage reads earlier layers")
        hidden, position_embeddings, mask2d = self._step.inputs[layer]
        keys = self._step.cache.layers[layer].keys  # (b, KV, kv, hd): normed and RoPE'd
        if mask2d is None:
            full = self._step.attention_mask
            mask2d = full if full is not None and full.shape[1] == keys.shape[2] else None
        attention = attention_of_query_over_cache(self.backbone, layer, hidden, position_embeddings, keys, mask2d)
        return attention, self.cache_rows(layer, keys.shape[2])

    def finish_step(self) -> None:
        """After a decode step, the layers' key masks grow by the step's columns."""
        for layer, mask in list(self.kv_masks.items()):
            grown = self._step.masks.get(id(mask))
            if grown is not None:
                self.kv_masks[layer] = grown[0]

    def _mask(self, idx: int, hidden: torch.Tensor):
        key = id(self.kv_masks[idx])
        if key not in self._step.masks:
            past = self.kv_masks[idx]  # (b, kv_len)
            q = hidden.shape[1]
            full = self._step.attention_mask
            new_cols = full[:, -q:].long() if full is not None else past.new_ones(past.shape[0], q)
            mask2d = torch.cat([past, new_cols], dim=1)  # (b, kv_len + q)
            cache_position = torch.arange(past.shape[1], past.shape[1] + q, device=hidden.device)
            mask = compat.causal_mask(self.backbone.text_config, hidden, mask2d, past=past.shape[1])
            self._step.masks[key] = (mask2d, mask, cache_position)
        return self._step.masks[key]

    def _rope(self, idx: int, hidden: torch.Tensor, kwargs) -> tuple:
        """RoPE angles of this decode step shifted back by what compaction removed before ``idx``."""
        shift = self.position_shift[idx].to(hidden.device)  # (b,)
        key = tuple(shift.tolist())
        if key not in self._step.rope:
            pos = compat.step_positions(kwargs, hidden)
            self._step.rope[key] = self.backbone.language_model.rotary_emb(hidden, pos - shift[:, None])
        return self._step.rope[key]

    # -- cache edits after the prefill (SharpV's memory stage) ---------------------------------------
    def kv_bytes(self, layer_idx: int) -> int:
        """Bytes layer ``layer_idx``'s cache holds now, keys + values of every sample (0 without a cache)."""
        if self.last_cache is None:
            return 0
        layer = self.last_cache.layers[layer_idx]
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))

    def drop_visual_kv(self, layer_idx: int, visual_mask: torch.Tensor, attention_mask_2d: torch.Tensor
                       ) -> Optional[int]:
        """Drop the visual entries of layer ``layer_idx``'s cache, whose rows are the prefill sequence with
        ``visual_mask`` / ``attention_mask_2d`` (b, s); the text entries stay. Returns the bytes freed, or
        None when nothing was dropped because the samples cannot keep equal entry counts (see
        :func:`non_visual_entries`)."""
        keep = non_visual_entries(visual_mask, attention_mask_2d)
        if keep is None:
            return None
        before = self.kv_bytes(layer_idx)
        self.drop_kv(layer_idx, keep)
        return before - self.kv_bytes(layer_idx)

    def drop_kv(self, layer_idx: int, keep: list[torch.Tensor], cache=None) -> None:
        """Keep only entries ``keep[b]`` (indices into layer ``layer_idx``'s cache) of each sample.

        Every sample must keep the same number of entries. Positions stay those of the kept entries
        (RoPE is already applied to cached keys).
        """
        cache = cache if cache is not None else self.last_cache
        if cache is None:
            raise RuntimeError("drop_kv needs the KV cache of a finished prefill")
        layer = cache.layers[layer_idx]
        index = torch.stack([torch.as_tensor(k, device=layer.keys.device).sort().values for k in keep])  # (b, n)
        gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = torch.gather(layer.keys, 2, gather)
        layer.values = torch.gather(layer.values, 2, gather)
        if layer_idx in self.cache_visual_index:
            rows = self.cache_rows(layer_idx, int(index.max()) + 1)
            self.cache_visual_index[layer_idx] = torch.gather(rows, 1, index.to(rows.device))
        base = self.kv_masks.get(layer_idx)
        if base is None:  # this layer still had the model's own (full-length) cache
            base = self.last_mask2d
            if base is None:
                base = torch.ones(index.shape[0], cache.get_seq_length(), dtype=torch.long)
            base = base.long()
        self.kv_masks[layer_idx] = torch.gather(base.to(index.device), 1, index)


def non_visual_entries(visual_mask: torch.Tensor, attention_mask_2d: torch.Tensor) -> Optional[list[torch.Tensor]]:
    """Cache entries a layer keeps when its visual entries go: per sample, every real non-visual
    entry, plus (for samples with fewer of them) some padding entries, so that every sample keeps the
    same count (``drop_kv`` needs it; the padding mask hides them). None when a sample has too little
    padding to reach that count.

    visual_mask, attention_mask_2d: (b, s) of the layer's cache rows.
    """
    real_text = ~visual_mask & attention_mask_2d.bool()
    padding = ~visual_mask & ~attention_mask_2d.bool()
    count = int(real_text.sum(dim=1).max())
    keep = []
    for b in range(visual_mask.shape[0]):
        fill = count - int(real_text[b].sum())
        pads = padding[b].nonzero().squeeze(1)
        if fill > len(pads):
            return None
        keep.append(torch.cat([pads[:fill], real_text[b].nonzero().squeeze(1)]).sort().values)
    return keep
