"""Independent references for engine tests: masked no-cache forwards of the unpruned model."""
from __future__ import annotations

import contextlib

import torch


def generate_with_logits(bb, inputs, max_new_tokens=5):
    out = bb.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, min_new_tokens=max_new_tokens)
    return out.sequences, torch.stack(out.logits, dim=1)  # (b, s_total), (b, steps, vocab)


@contextlib.contextmanager
def layer_masks(bb, allowed_by_layer):
    """Replace each listed decoder layer's mask by an eager additive mask from a bool (b, 1, q, k)."""
    handles = []

    def make(idx):
        def hook(module, args, kwargs):
            allowed = allowed_by_layer[idx]
            dtype = args[0].dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            return args, dict(kwargs, attention_mask=mask)

        return hook

    for idx in allowed_by_layer:
        handles.append(bb.layers[idx].register_forward_pre_hook(make(idx), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_reference_logits(bb, inputs, sequences, key_allowed, query_from=None):
    """Logits of a no-cache forward over ``sequences`` (prompt + generated) of the UNPRUNED model.

    key_allowed: {layer: (b, s_total) bool} keys visible in that layer (all layers not listed see
    every key); query_from: {layer: first query row the restriction applies to} (default 0).
    The model must use eager attention. Returns (b, s_total, vocab).
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
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kwargs["input_ids"] = sequences
    kwargs["attention_mask"] = mask2d
    if bb.kind == "llava_onevision":  # generate's positions for left padding
        pos = mask2d.long().cumsum(-1) - 1
        kwargs["position_ids"] = pos.masked_fill(mask2d == 0, 1)
    with torch.no_grad(), layer_masks(bb, allowed):
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
