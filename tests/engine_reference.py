"""Independent references for engine tests: masked no-cache forwards of the unpruned model."""
from __future__ import annotations

import contextlib

import torch

from sharp.backbones import compat


def generate_with_logits(bb, inputs, max_new_tokens=5):
    out = bb.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, min_new_tokens=max_new_tokens)
    return out.sequences, torch.stack(out.logits, dim=1)  # (b, s_total), (b, steps, vocab)


@contextlib.contextmanager
def layer_masks(bb, allowed_by_layer, positions_by_layer=None):
    """Replace each listed decoder layer's mask by an eager additive mask from a bool (b, 1, q, k) and,
    for layers in ``positions_by_layer`` ((b, s) long 1-D positions), its RoPE angles."""
    handles = []
    positions_by_layer = positions_by_layer or {}

    def make(idx):
        def hook(module, args, kwargs):
            allowed = allowed_by_layer[idx]
            dtype = args[0].dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            new = dict(kwargs, attention_mask=mask)
            if idx in positions_by_layer:
                new["position_embeddings"] = bb.language_model.rotary_emb(args[0], positions_by_layer[idx])
            return args, new

        return hook

    for idx in allowed_by_layer:
        handles.append(bb.layers[idx].register_forward_pre_hook(make(idx), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_reference_logits(bb, inputs, sequences, key_allowed, query_from=None, compact=False):
    """Logits of a no-cache forward over ``sequences`` (prompt + generated) of the UNPRUNED model.

    key_allowed: {layer: (b, s_total) bool} keys visible in that layer (all layers not listed see
    every key); query_from: {layer: first query row the restriction applies to} (default 0).
    compact: the listed layers number their visible tokens 0, 1, 2, ... (PyramidDrop's compacted
    positions: position = number of visible real tokens before it). The model must use eager
    attention. Returns (b, s_total, vocab).
    """
    b, s = sequences.shape
    prompt_mask = inputs["attention_mask"]
    mask2d = torch.cat([prompt_mask, prompt_mask.new_ones(b, s - prompt_mask.shape[1])], dim=1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    base = causal[None, None] & mask2d.bool()[:, None, None, :]
    base = base | torch.eye(s, dtype=torch.bool)[None, None]
    allowed = {}
    for layer in range(bb.num_layers):
        a = base.clone()
        if layer in key_allowed:
            restrict = key_allowed[layer].bool()[:, None, None, :].expand(b, 1, s, s).clone()
            start = (query_from or {}).get(layer, 0)
            restrict[:, :, :start, :] = True
            a = a & (restrict | torch.eye(s, dtype=torch.bool)[None, None])
        allowed[layer] = a
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kwargs["input_ids"] = sequences
    kwargs.update(compat.text_inputs(bb.model, sequences))  # 5.x Qwen2-VL: token types of the longer sequence
    kwargs["attention_mask"] = mask2d
    if "mrope_section" not in (bb.text_config.rope_scaling or {}):  # 1-D RoPE: generate's positions for left padding
        pos = mask2d.long().cumsum(-1) - 1
        kwargs["position_ids"] = pos.masked_fill(mask2d == 0, 1)
    positions = {}
    if compact:
        for layer, keys in key_allowed.items():
            visible = keys.bool() & mask2d.bool()
            positions[layer] = (visible.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), layer_masks(bb, allowed, positions):
        return bb.model(**kwargs, use_cache=False).logits


def kept_key_mask(bb, inputs, sequences, kept_visual):
    """(b, s_total) bool: text + generated tokens and the kept visual tokens (original indices)."""
    layout = bb.layout(inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)
    b, s = sequences.shape
    keep = torch.ones(b, s, dtype=torch.bool)
    for i in range(b):
        pos = vis[i].nonzero().squeeze(1)
        keep[i, pos] = False
        keep[i, pos[kept_visual[i]]] = True
    return keep


class Recorder:
    """Wraps every (flattened) method of ``method`` to record, in the real prefill, what the engine
    applied: each stage's kept tokens and merged rows, and each layer's custom mask, all addressed by
    position in the UNPRUNED prompt (``ctx.seq.origin``), so a no-cache reference can replay them."""

    def __init__(self, method):
        from sharp.engine import ComposedMethod

        self.method = method
        self.leaves = method.flat_children() if isinstance(method, ComposedMethod) else [method]
        self.merges = []  # (layer, sample, origin positions (n,), rows (n, d))
        self.mid_merges = []  # the same, written after the layer's attention (after_attention)
        self.masks = {}  # layer -> list of (origin (b, s), allowed (b, 1, s, s))
        for m in self.leaves:
            self._wrap(m)

    def _wrap(self, m):
        select, after_attention, attention_mask = m.select, m.after_attention, m.attention_mask

        def recorder_of(fn, into):
            def recording(ctx):
                sel = fn(ctx)
                if sel.hidden_states is not None:
                    for b in range(ctx.batch_size):
                        pos = ctx.visual_positions(b)
                        if sel.keep_visual is not None:
                            pos = pos[torch.as_tensor(sel.keep_visual[b]).long()]
                        into.append((ctx.layer_idx, b, ctx.seq.origin[b, pos].clone(),
                                     sel.hidden_states[b, pos].detach().clone()))
                if sel.new_rows is not None:  # only the given rows change (those of dropped tokens are unused)
                    for b, (pos, rows) in enumerate(sel.new_rows):
                        pos = torch.as_tensor(pos).long()
                        into.append((ctx.layer_idx, b, ctx.seq.origin[b, pos].clone(),
                                     rows.detach().to(ctx.hidden_states.dtype).clone()))
                return sel
            return recording

        def recording_mask(ctx):
            mask = attention_mask(ctx)
            if mask is not None and ctx.phase == "prefill":
                from sharp.engine.masks import as_dense  # a structured restriction (SegM) as its dense form

                self.masks.setdefault(ctx.layer_idx, []).append((ctx.seq.origin.clone(), as_dense(mask).clone()))
            return mask

        object.__setattr__(m, "select", recorder_of(select, self.merges))
        object.__setattr__(m, "after_attention", recorder_of(after_attention, self.mid_merges))
        object.__setattr__(m, "attention_mask", recording_mask)


def trace_key_masks(bb, inputs, sequences, trace):
    """{layer: (b, s_total) bool} keys each decoder layer keeps, from the trace's applied stages."""
    out = {}
    for layer in range(bb.num_layers):
        applied = [i for i, k in enumerate(trace.stage_layers) if k <= layer]
        if applied:
            out[layer] = kept_key_mask(bb, inputs, sequences, trace.kept[applied[-1]])
    return out


def replay_reference_logits(bb, inputs, sequences, trace, recorder, compact_layers=()):
    """No-cache logits of the unpruned model over prompt + generated tokens in which every layer sees
    only the keys the engine kept for it, the merged rows the methods produced at their stages (layer
    inputs) and after their layers' attention (written into the residual stream before the MLP), and
    the methods' custom masks on the prompt rows, and each decode step's visual-key selections (the
    trace's ``decode_steps``: the step's query row sees only the chosen visual keys from the selecting
    layer on). ``compact_layers``: layers with compacted positions
    (a dict maps each to the layer whose kept set numbers it: its last compacting stage)."""
    b, s = sequences.shape
    p = inputs["input_ids"].shape[1]
    keys = trace_key_masks(bb, inputs, sequences, trace)
    prompt_mask = inputs["attention_mask"]
    mask2d = torch.cat([prompt_mask, prompt_mask.new_ones(b, s - p)], dim=1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    eye = torch.eye(s, dtype=torch.bool)[None, None]
    allowed, positions = {}, {}
    for layer in range(bb.num_layers):
        a = causal & mask2d.bool()[:, None, None, :]
        if layer in keys:
            a = a & keys[layer][:, None, None, :]
            if layer in compact_layers:
                numbering = compact_layers[layer] if isinstance(compact_layers, dict) else layer
                visible = keys[numbering] & mask2d.bool()
                positions[layer] = (visible.long().cumsum(-1) - 1).clamp_min(0)
        for origin, mask in recorder.masks.get(layer, []):
            a = a & _spread(mask, origin, s)
        for step, selections in enumerate(trace.decode_steps):  # decode step i's query is row p + i
            for from_layer, _, kept in selections:
                if kept is not None and layer >= from_layer:
                    a[:, :, p + step] &= kept_key_mask(bb, inputs, sequences, kept)[:, None, :]
        allowed[layer] = a | eye
    merged, mid = {}, {}
    for layer, i, origin, rows in recorder.merges:
        merged.setdefault(layer, []).append((i, origin, rows))
    for layer, i, origin, rows in recorder.mid_merges:
        mid.setdefault(layer, []).append((i, origin, rows))
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kwargs.update(input_ids=sequences, attention_mask=mask2d)
    kwargs.update(compat.text_inputs(bb.model, sequences))  # 5.x: token types of the longer sequence
    if "mrope_section" not in (bb.text_config.rope_scaling or {}):  # 1-D RoPE: generate's positions for left padding
        pos = mask2d.long().cumsum(-1) - 1
        kwargs["position_ids"] = pos.masked_fill(mask2d == 0, 1)

    def inject(layer):
        def hook(module, args, kw):
            h = args[0].clone()
            for i, origin, rows in merged[layer]:
                h[i, origin] = rows.to(h.dtype)
            return (h,) + tuple(args[1:]), kw
        return hook

    def inject_in_place(layer):
        def hook(module, args, kw):  # the post-attention norm's input IS the layer's residual stream
            for i, origin, rows in mid[layer]:
                args[0][i, origin] = rows.to(args[0].dtype)
        return hook

    handles = [bb.layers[k].register_forward_pre_hook(inject(k), with_kwargs=True) for k in merged]
    handles += [bb.layers[k].post_attention_layernorm.register_forward_pre_hook(inject_in_place(k), with_kwargs=True)
                for k in mid]
    try:
        with torch.no_grad(), layer_masks(bb, allowed, positions):
            return bb.model(**kwargs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _spread(mask, origin, s):
    """A (b, 1, q, k) restriction over a pruned prompt -> (b, 1, s, s) over the full sequence (rows
    and keys the mask does not cover stay allowed)."""
    b = mask.shape[0]
    out = torch.ones(b, 1, s, s, dtype=torch.bool)
    for i in range(b):
        o = origin[i]
        real = o >= 0
        idx = o[real]
        out[i, 0, idx[:, None], idx[None, :]] = mask[i, 0][real][:, real].bool()
    return out


def layer_input(bb, inputs, method=None, retention: float = 1.0, layer: int = 0, **method_kwargs):
    """(hidden (b, s, d), trace): the input of decoder layer ``layer`` in one forward of ``inputs``:
    unpruned when ``method`` is None (trace None), else after the engine's stages of
    ``sharp.prune(bb, method, retention, **method_kwargs)`` (the hook is registered inside the block,
    so it runs after the engine's own)."""
    import sharp

    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def forward():
        hook = bb.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                bb.model(**inputs)
        finally:
            hook.remove()

    if method is None:
        forward()
        return seen["x"], None
    with sharp.prune(bb, method, retention, **method_kwargs) as trace:
        forward()
    return seen["x"], trace
