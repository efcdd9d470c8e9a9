"""Vision-tower maps for pre-LLM methods (VisionZip, HoliTom): what one vision layer computed, per
LLM visual token.

A method asks for a vision layer; the engine hooks that one layer module during prefill and keeps
``captured = {"args": args, "kwargs": kwargs, "output": output}`` of its call; the backbone's
:meth:`~sharp.backbones.Backbone.vision_maps` then turns it into :class:`VisionMaps`, whose fields are
computed when a method first reads them (inside its timed stage). Only that layer's queries and keys
are needed: kept from the layer's own projections where the family names them
(``Backbone.vision_qk_capture``: LLaVA-OV's SigLIP), else recomputed (its own norm and projections, in
the model's dtype); the attention is computed here in float32, a few frames at a time
(:func:`chunk_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

# Most float32 attention logits one chunk group may hold (heads x queries x keys x frames): 2**25
# elements = 128 MiB, i.e. 3 frames of LLaVA-OV-7B's SigLIP (16 heads x 729 x 729).
ATTENTION_BUDGET = 2 ** 25
# On a CPU a group's logits should stay in the core's cache instead: 2**19 elements = 2 MiB float32
# (the L2 of one core of the 2-core bench machine); the mid-size LLaVA-OV's 32 frames of 2 heads x
# 196 x 196 then run in groups of 6 frames, about twice as fast as in one group of 9.8 MB. Chunking
# never changes a value (each chunk's attention is its own).
CPU_ATTENTION_BUDGET = 2 ** 19

# rope(q, k, start, end) -> (q, k): rotary embedding of rows start:end, (rows, heads, head_dim) each
RopeFn = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


class VisionMaps:
    """One vision layer's maps, in the LLM's original visual-token order (frame-major, row-major inside
    a frame), per sample. ``n_visual`` is :attr:`VisualLayout.n_visual`.

    hidden: (b, n_visual, d_vis) the layer's OUTPUT hidden states, mapped; the model's dtype.
    keys: (b, n_visual, head_dim) keys ``k_proj(norm(input))`` of the layer, mean over heads, before
        any rotary embedding, mapped; the model's dtype.
    attention: (b, n_visual) float32: ``softmax(q k^T * scale)`` inside each frame (Qwen2-VL: inside
        each ``cu_seqlens`` chunk, i.e. one temporal patch), mean over heads and over all queries (the
        attention each patch receives; before the mapping it sums to 1 over a frame's patches), mapped.

    ``VisionMaps(hidden, keys, attention)`` holds given tensors. The engine's maps are lazy
    (``lazy={field: fn}``): a field is computed by ``fn()`` when a method first reads it (inside its
    timed stage) and kept, so a method pays only for the fields it reads (HoliTom: the attention).
    """

    FIELDS = ("hidden", "keys", "attention")

    def __init__(self, hidden: Optional[torch.Tensor] = None, keys: Optional[torch.Tensor] = None,
                 attention: Optional[torch.Tensor] = None, *, lazy: Optional[dict] = None):
        self._values = {"hidden": hidden, "keys": keys, "attention": attention}
        self._lazy = dict(lazy or {})
        unknown = set(self._lazy) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"VisionMaps: unknown lazy field(s) {sorted(unknown)}; fields: {self.FIELDS}")

    def _field(self, name: str) -> torch.Tensor:
        value = self._values[name]
        if value is None and name in self._lazy:
            value = self._values[name] = self._lazy.pop(name)()
        return value

    hidden = property(lambda self: self._field("hidden"))
    keys = property(lambda self: self._field("keys"))
    attention = property(lambda self: self._field("attention"))

    def computed(self) -> tuple[str, ...]:
        """The fields computed (or given) so far."""
        return tuple(f for f in self.FIELDS if self._values[f] is not None)

    def __repr__(self) -> str:
        shapes = {f: (tuple(self._values[f].shape) if self._values[f] is not None else "lazy") for f in self.FIELDS}
        return f"VisionMaps({', '.join(f'{k}={v}' for k, v in shapes.items())})"


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
    groups = list(chunk_groups(lengths, heads, budget))
    # one logits buffer for every group, softmax'd in place: a fresh (g, heads, L, L) tensor per group
    # costs as much again as the arithmetic on a CPU (new pages; the values are the same)
    most = max(count * length * length for _, count, length in groups) if groups else 0
    buffer = torch.empty(most * heads, dtype=torch.float32, device=q.device)
    for start, count, length in groups:
        end = start + count * length
        qs, ks = q[start:end].float(), k[start:end].float()  # (rows, heads, head_dim)
        if rope is not None:
            qs, ks = rope(qs, ks, start, end)
        # contiguous (g, heads, L, head_dim) operands: one dense batched GEMM (a strided one is about
        # twice as slow on a CPU); the logits are scaled in place (the same values as ``* scale``)
        qs = qs.reshape(count, length, heads, head_dim).transpose(1, 2).contiguous()  # (g, heads, L, head_dim)
        ks = ks.reshape(count, length, heads, head_dim).transpose(1, 2).contiguous()
        logits = buffer[: count * heads * length * length].view(count, heads, length, length)
        torch.matmul(qs, ks.transpose(-1, -2), out=logits).mul_(scale)  # (g, heads, L, L)
        probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # torch.softmax's kernel, in place
        torch.mean(probs, dim=(1, 2), out=out[start:end].view(count, length))
    return out


# -- per-frame pooling (FastVID's global feature and probe attention) ---------------------------

# SigLIP checkpoint whose attention-pooling head (and post_layernorm) FastVID reloads, because
# LLaVA-OneVision / LLaVA-Video drop the head of their tower (FastVID siglip_encoder.py SigLipVisionAbstract)
SIGLIP_HEAD_HUB = "google/siglip-so400m-patch14-384"
SIGLIP_HEAD_FILE = "model.safetensors"  # the head and post_layernorm tensors are read from it
# seed of the random head built for towers without a hub checkpoint (tiny / toy / mid / random_weights)
RANDOM_HEAD_SEED = 0


@dataclass
class FramePooling:
    """Per-frame summaries of one vision layer, per sample (:meth:`Backbone.frame_pooling`).

    global_features: (b, frames, d_vis) float32, the pooled output of SigLIP's multihead attention
        pooling (MAP) head on each frame's patches; None where the tower has no such head (Qwen
        families: a method takes the mean of the frame's LLM embeddings, as FastVID's Qwen path does).
    attention: (b, n_visual) float32, the probe attention each patch receives (mean over heads; sums to
        1 over a frame's patches before the mapping), mapped onto the LLM's visual tokens as the model
        maps its features.
    source: where the head came from ("google/siglip-so400m-patch14-384", "random (seed 0)", ...).
    """

    global_features: Optional[torch.Tensor]
    attention: torch.Tensor
    source: str


class SiglipPoolingHead(torch.nn.Module):
    """SigLIP's post_layernorm + multihead attention pooling head, with the parameter names of the HF
    checkpoint (``vision_model.post_layernorm.*``, ``vision_model.head.*``): a learned probe attends to
    the frame's patches (``torch.nn.MultiheadAttention``, as HF's ``SiglipMultiheadAttentionPoolingHead``,
    which does not return the weights FastVID needs), then a pre-norm MLP with a residual."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float = 1e-6, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.post_layernorm = torch.nn.LayerNorm(hidden, eps=eps)
        self.probe = torch.nn.Parameter(torch.randn(1, 1, hidden))
        self.attention = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.layernorm = torch.nn.LayerNorm(hidden, eps=eps)
        self.fc1 = torch.nn.Linear(hidden, intermediate)
        self.fc2 = torch.nn.Linear(intermediate, hidden)
        self.approximate = "tanh" if "tanh" in act else "none"

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (frames, patches, d) -> pooled (frames, d), attention (frames, patches) (head mean)."""
        x = self.post_layernorm(hidden)
        probe = self.probe.expand(x.shape[0], -1, -1)  # (frames, 1, d)
        out, weights = self.attention(probe, x, x)  # (frames, 1, d), (frames, 1, patches) averaged over heads
        out = out[:, 0]
        mlp = self.fc2(torch.nn.functional.gelu(self.fc1(self.layernorm(out)), approximate=self.approximate))
        return out + mlp, weights[:, 0]

    def load_checkpoint_tensors(self, tensors: dict) -> None:
        """Load ``vision_model.post_layernorm.*`` and ``vision_model.head.*`` tensors of a SigLIP checkpoint."""
        renamed = {}
        for key, value in tensors.items():
            key = key.replace("vision_model.", "", 1)
            key = key.replace("head.mlp.", "").replace("head.", "")
            renamed[key] = value
        self.load_state_dict(renamed, strict=True)


def random_pooling_head(vision_config, seed: int = RANDOM_HEAD_SEED) -> SiglipPoolingHead:
    """A SigLIP pooling head of the tower's width with seeded random weights (float32, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SiglipPoolingHead(vision_config.hidden_size, vision_config.num_attention_heads,
                                 vision_config.intermediate_size, getattr(vision_config, "layer_norm_eps", 1e-6),
                                 getattr(vision_config, "hidden_act", "gelu_pytorch_tanh"))


def hub_pooling_head(vision_config, repo: str = SIGLIP_HEAD_HUB) -> SiglipPoolingHead:
    """The pretrained pooling head of ``repo`` (its ``model.safetensors`` through the HF cache; only the
    head and post_layernorm tensors are read). Raises RuntimeError when it is neither cached nor reachable."""
    try:
        from huggingface_hub import hf_hub_download
        from safetensors import safe_open

        path = hf_hub_download(repo, SIGLIP_HEAD_FILE)
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()
                       if k.startswith("vision_model.head.") or k.startswith("vision_model.post_layernorm.")}
    except Exception as err:  # offline and not cached, or no access
        raise RuntimeError(
            f"FastVID's SigLIP attention-pooling head: could not load {repo}/{SIGLIP_HEAD_FILE} ({err}). It is "
            f"a weight of the 7B path like the backbone's own: download it once with network access "
            f"(`hf download {repo} {SIGLIP_HEAD_FILE}`) into $HF_HOME, then run offline") from err
    head = random_pooling_head(vision_config)
    head.load_checkpoint_tensors(tensors)
    return head


def mean_query_attention(q: torch.Tensor, k: torch.Tensor, scale: float, lengths: Sequence[int], group: int,
                         rope: Optional[RopeFn] = None) -> torch.Tensor:
    """Attention of each chunk's MEAN query to its merge groups' MEAN keys (FastVID's Qwen2.5-VL
    saliency, from the last vision block): per chunk c and head h,

        a_g = softmax_g( mean_i q_i^h . mean_{j in g} k_j^h * scale ),   mean over heads,

    q, k: (N, heads, head_dim) pre-rotary (``rope`` is applied first, float32); lengths: rows per chunk
    (a temporal patch); group: rows per merge group (consecutive). Returns (N / group,) float32."""
    n, heads, head_dim = q.shape
    out = torch.empty(n // group, dtype=torch.float32, device=q.device)
    start = 0
    for length in (int(x) for x in lengths):
        end = start + length
        qs, ks = q[start:end].float(), k[start:end].float()
        if rope is not None:
            qs, ks = rope(qs, ks, start, end)
        q_mean = qs.mean(dim=0)  # (heads, head_dim)
        k_group = ks.reshape(length // group, group, heads, head_dim).mean(dim=1)  # (G, heads, head_dim)
        logits = torch.einsum("hd,ghd->hg", q_mean, k_group) * scale
        out[start // group:end // group] = torch.softmax(logits, dim=-1).mean(dim=0)
        start = end
    return out
