"""Vision-tower maps for pre-LLM methods (VisionZip, HoliTom): what one vision layer computed, per
LLM visual token.

A method asks for a vision layer; the engine hooks that one layer module during prefill and keeps
``captured = {"args": args, "kwargs": kwargs, "output": output}`` of its call; the backbone's
:meth:`~sharp.backbones.Backbone.vision_maps` then turns it into :class:`VisionMaps`. Only that
layer's queries and keys are recomputed (its own norm and projections, in the model's dtype); the
attention is computed here in float32, a few frames at a time (:func:`chunk_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

# Most float32 attention logits one chunk group may hold (heads x queries x keys x frames): 2**25
# elements = 128 MiB, i.e. 3 frames of LLaVA-OV-7B's SigLIP (16 heads x 729 x 729).
ATTENTION_BUDGET = 2 ** 25

# rope(q, k, start, end) -> (q, k): rotary embedding of rows start:end, (rows, heads, head_dim) each
RopeFn = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class VisionMaps:
    """One vision layer's maps, in the LLM's original visual-token order (frame-major, row-major inside
    a frame), per sample. ``n_visual`` is :attr:`VisualLayout.n_visual`.

    hidden: (b, n_visual, d_vis) the layer's OUTPUT hidden states, mapped; the model's dtype.
    keys: (b, n_visual, head_dim) keys ``k_proj(norm(input))`` of the layer, mean over heads, before
        any rotary embedding, mapped; the model's dtype.
    attention: (b, n_visual) float32: ``softmax(q k^T * scale)`` inside each frame (Qwen2-VL: inside
        each ``cu_seqlens`` chunk, i.e. one temporal patch), mean over heads and over all queries (the
        attention each patch receives; before the mapping it sums to 1 over a frame's patches), mapped.
    """

    hidden: torch.Tensor
    keys: torch.Tensor
    attention: torch.Tensor


def captured_input(captured: dict) -> torch.Tensor:
    """The hidden-states input of a captured layer call (first positional argument or keyword)."""
    args, kwargs = captured.get("args") or (), captured.get("kwargs") or {}
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError("captured vision-layer call has no hidden_states input (args[0] or kwargs['hidden_states'])")


def captured_output(captured: dict) -> torch.Tensor:
    """The hidden-states output of a captured layer call (a tensor, or the first item of a tuple)."""
    out = captured.get("output")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError("captured vision-layer call has no output tensor")
    return out


def chunk_groups(lengths: Sequence[int], heads: int, budget: int = ATTENTION_BUDGET) -> Iterator[tuple[int, int, int]]:
    """Groups of consecutive equal-length chunks whose attention maps fit ``budget`` elements.

    Yields ``(start_row, chunks, length)``: rows ``start_row : start_row + chunks * length`` are
    ``chunks`` chunks of ``length`` rows; ``chunks * heads * length**2 <= budget`` unless one chunk
    alone is larger (then ``chunks == 1``).
    """
    start, i = 0, 0
    lengths = [int(n) for n in lengths]
    while i < len(lengths):
        length = lengths[i]
        most = max(1, budget // max(1, heads * length * length))
        count = 1
        while count < most and i + count < len(lengths) and lengths[i + count] == length:
            count += 1
        yield start, count, length
        start += count * length
        i += count


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, lengths: Sequence[int],
                       rope: Optional[RopeFn] = None, budget: int = ATTENTION_BUDGET) -> torch.Tensor:
    """Attention each row receives inside its chunk, mean over heads and queries.

    Args:
        q, k: (N, heads, head_dim) queries and keys (pre-rotary) of N rows made of consecutive chunks.
        scale: the logits' scale (``head_dim ** -0.5``).
        lengths: rows per chunk (sum N); attention never crosses a chunk.
        rope: applied to each group's float32 rows before the logits (Qwen2-VL's vision RoPE).

    Returns:
        (N,) float32; a chunk's entries sum to 1.
    """
    n, heads, head_dim = q.shape
    if sum(int(x) for x in lengths) != n:
        raise ValueError(f"chunk lengths sum to {sum(int(x) for x in lengths)}, not the {n} rows")
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    for start, count, length in chunk_groups(lengths, heads, budget):
        end = start + count * length
        qs, ks = q[start:end].float(), k[start:end].float()  # (rows, heads, head_dim)
        if rope is not None:
            qs, ks = rope(qs, ks, start, end)
        qs = qs.reshape(count, length, heads, head_dim).transpose(1, 2)  # (g, heads, L, head_dim)
        ks = ks.reshape(count, length, heads, head_dim).transpose(1, 2)
        probs = torch.softmax(torch.matmul(qs, ks.transpose(-1, -2)) * scale, dim=-1)  # (g, heads, L, L)
        out[start:end] = probs.mean(dim=(1, 2)).reshape(-1)
        del probs
    return out
