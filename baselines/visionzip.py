"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025; official code dvlab-research/VisionZip ``visionzip/clip_encoder.py``). Its combination with
ShaRP (``visionzip_sharp``, the ShaRP paper's Table 3) is a composition declared in
``configs/method/visionzip_sharp.yaml``.

Before the LLM (a stage at decoder layer 0, i.e. on the input embeddings), per group of visual
tokens G (a frame on LLaVA-OV, the whole video on Qwen2-VL: ``scope``) with budget k_G:

1. Dominant tokens (Sec. 3.2): the d_G = floor(k_G x ``dominant_ratio``) tokens of G that receive
   the most attention in one vision-encoder layer,

       a_j = mean_h mean_i softmax_j( q_i^h k_j^h^T / sqrt(d_h) )        (i, j in the same frame)

   read from ``ctx.vision(layer).attention`` (mapped onto the LLM tokens as the model maps its
   features: LLaVA-OV's bilinear 27 -> 14 pooling, Qwen2-VL's 2 x 2 merger groups).
2. Contextual tokens (Sec. 3.3): of the m = |G| - d_G remaining tokens R (in sequence order),
   c_G = k_G - d_G targets at the stride max(1, floor(m / c_G)): R[0], R[s], R[2s], ... (the first
   c_G); every other token of R joins the target with the highest cosine similarity of the
   head-averaged keys k-bar_j = mean_h k_j^h (``ctx.vision(layer).keys``); the contextual token is

       x_t <- x_t + mean_{j assigned to t} x_j          (x_t unchanged when nothing is assigned)

   in the stage's input space (the projected LLM embeddings, as both video ports do).

The dominant and target tokens stay in the sequence at their own positions; the merged rows replace
the targets' embeddings (``Selection.hidden_states``). Every choice against the official code and
its ports (HoliTom's LLaVA-OV port ``visionzip/llava_arch.py``, EffiVLM-Bench's Qwen2-VL port
``kv_cache_compression/qwen2vl_model.py``) is in docs/methods/visionzip.md. Results go to
``trace.method("visionzip")``: budget, vision_layer, scope, dominant, contextual, absorbed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from sharp import PruningMethod, Selection, split_budget

SCOPES = ("auto", "frame", "video")
# the official 54 dominant : 10 contextual split (README, HoliTom's DOMINANT_RATIO default 54/64)
DOMINANT_RATIO = 54 / 64
# each port's layer and grouping, by backbone family: HoliTom's LLaVA-OV port scores with the last
# SigLIP layer OV keeps (its feature layer) per frame; EffiVLM-Bench's Qwen2-VL port with vision
# block 30 of 32 (-2) and one global top-k over the whole visual input
PORT_VISION_LAYER = {"llava_onevision": "feature", "qwen2_vl": -2}
PORT_SCOPE = {"llava_onevision": "frame", "qwen2_vl": "video"}


# -- budgets ------------------------------------------------------------------------------------


def dominant_split(k: int, dominant_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) of a group's budget k: d = floor(k x ratio) as the official
    ``int(spatial_tokens * dominant_ratio)``, c = k - d (so exactly k tokens are kept)."""
    d = int(k * dominant_ratio)
    return d, k - d


# -- one group ----------------------------------------------------------------------------------


@dataclass
class GroupResult:
    """VisionZip on one group of n tokens (indices into the group, 0..n-1; ``zip_sample``: into the
    sample's current visual tokens).

    dominant: (d,) the top-d by attention, ascending; targets: (c,) the contextual targets, ascending;
    absorbed: (m - c, 2) rows (token, its target) for every merged token; rows: (c, D) the contextual
    tokens' new embeddings (float32), in the order of ``targets``; ``zip_sample``: (t, D) the new rows
    of the ``merged`` (t,) targets, those of the groups where tokens were absorbed.
    """

    dominant: torch.Tensor
    targets: torch.Tensor
    absorbed: torch.Tensor
    rows: torch.Tensor
    merged: Optional[torch.Tensor] = None


def dominant_tokens(attention: torch.Tensor, d: int) -> torch.Tensor:
    """(..., n) attention received -> (..., d) indices of the d largest, ascending (per group)."""
    return torch.topk(attention.float(), d, dim=-1).indices.sort(dim=-1).values


def contextual_targets(m: int, c: int, device=None) -> torch.Tensor:
    """Positions (in the remaining tokens' order, 0..m-1) of the c targets: stride max(1, m // c)
    from 0, the first c (official ``arange(0, m, step)[:c]``)."""
    if c == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    step = max(1, m // c)
    return torch.arange(0, m, step, device=device)[:c]


def assign_to_targets(keys: torch.Tensor, targets: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """For each token of ``others``, the position in ``targets`` of its most similar target by the
    cosine of the keys (keys: (..., m, h) of the remaining tokens; targets, others: positions into
    them). Ties go to the first target (``argmax``)."""
    unit = F.normalize(keys.float(), dim=-1)
    # one (m - c, c) product per group: a batched product may round near-ties differently
    choice = [(u[others] @ u[targets].T).argmax(dim=1) for u in unit.reshape(-1, *unit.shape[-2:])]
    return torch.stack(choice).view(*unit.shape[:-2], len(others))


def merge_contextual(rows: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, others: torch.Tensor,
                     choice: torch.Tensor) -> torch.Tensor:
    """Contextual tokens (G, c, D) float32: x_t + mean of the tokens assigned to t (+ 0 when none),
    per group. rows (N, D): the embeddings; index (G, n): each group's rows, ascending; targets (G, c),
    others (G, m - c): positions 0..n-1 in the groups; choice (G, m - c): the position in ``targets``
    of each token of ``others``.

    One index_add_ over the rows themselves (no gathered copy): every row of a group's others goes to
    its target's slot, every other row to a discarded last slot; each slot adds its rows in row order,
    the order of ``others``."""
    g, c, width = targets.shape[0], targets.shape[1], rows.shape[-1]
    slot = choice + c * torch.arange(g, device=rows.device)[:, None]  # (G, m - c): group g's targets: g c .. g c + c - 1
    counts = torch.bincount(slot.reshape(-1), minlength=g * c).clamp(min=1).to(torch.float32)[:, None]
    row_slot = torch.full((rows.shape[0],), g * c, dtype=torch.long, device=rows.device)
    row_slot[index.gather(1, others)] = slot
    sums = rows.new_zeros(g * c + 1, width, dtype=torch.float32).index_add_(0, row_slot, rows.float())[:-1]
    return rows[index.gather(1, targets)].float() + (sums / counts).view(g, c, width)


def visionzip_group(attention: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, k: int,
                    dominant_ratio: float = DOMINANT_RATIO) -> GroupResult:
    """VisionZip on one group: attention (n,), keys (n, h), hidden (n, D), budget k <= n."""
    res = visionzip_groups(attention[None], keys[None], hidden[None], k, dominant_ratio)
    return GroupResult(res.dominant[0], res.targets[0], res.absorbed[0], res.rows[0])


def visionzip_groups(attention: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, k: int,
                     dominant_ratio: float = DOMINANT_RATIO, index: Optional[torch.Tensor] = None) -> GroupResult:
    """VisionZip on G groups of n tokens with the same budget k <= n, at once: attention (G, n),
    keys (G, n, h), hidden (G, n, D) (or, with ``index`` (G, n), ascending in each group, the rows
    (N, D) it points into: no gathered copy); each group as :func:`visionzip_group` alone. Returns the
    :class:`GroupResult` fields with a leading group dimension (G, ...)."""
    g, n = attention.shape
    if not 0 <= k <= n:
        raise ValueError(f"visionzip: a group's budget must be in 0..{n}, got {k}")
    if index is None:  # the groups' own rows, one after the other
        index = torch.arange(g * n, device=hidden.device).view(g, n)
        hidden = hidden.reshape(g * n, hidden.shape[-1])
    device = attention.device
    d, c = dominant_split(k, dominant_ratio)
    dominant = dominant_tokens(attention, d)  # (G, d)
    is_rest = torch.ones(g, n, dtype=torch.bool, device=device)
    is_rest.scatter_(1, dominant, False)
    rest = is_rest.nonzero()[:, 1].reshape(g, n - d)  # (G, m) in sequence order
    local_targets = contextual_targets(n - d, c, device)
    targets = rest[:, local_targets]
    if c == 0:  # dominant_ratio 1: the rest is dropped, nothing merges
        empty = torch.zeros(g, 0, 2, dtype=torch.long, device=device)
        return GroupResult(dominant, targets, empty, hidden[index.gather(1, targets)].float())
    is_other = torch.ones(n - d, dtype=torch.bool, device=device)
    is_other[local_targets] = False
    local_others = is_other.nonzero().squeeze(1)
    choice = assign_to_targets(gather_rows(keys, rest), local_targets, local_others)  # (G, m - c)
    others = rest[:, local_others]  # (G, m - c)
    rows = merge_contextual(hidden, index, targets, others, choice)
    absorbed = torch.stack([others, targets.gather(1, choice)], dim=2)
    return GroupResult(dominant=dominant, targets=targets, absorbed=absorbed, rows=rows)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, n, C), index (G, m) -> (G, m, C): each group's rows ``x[g, index[g]]``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


# -- the method ---------------------------------------------------------------------------------


@dataclass
class VisionZip(PruningMethod):
    """VisionZip before the LLM; ``retention`` = the kept share of the ORIGINAL visual tokens
    (Table 3: 12.8%, about 25 of 196 per frame). See docs/methods/visionzip.md."""

    name = "visionzip"
    # HoliTom's LLaVA-OV port numbers the reduced sequence 0..len-1 (auto: on 1-D RoPE); on Qwen2-VL
    # (M-RoPE) auto keeps the kept tokens' own positions, as EffiVLM-Bench's port
    official_positions = "compact"
    dominant_ratio: float = DOMINANT_RATIO  # dominant share of each group's budget (54 / 64)
    # "auto": each port's grouping (LLaVA-OV per frame, Qwen2-VL the whole video) | "frame" | "video"
    scope: str = "auto"
    # vision layer of the scores and keys: None = each port's (LLaVA-OV "feature", Qwen2-VL -2),
    # an int (negative from the end) or "feature" (typing.Union: the base's type check reads it)
    vision_layer: Optional[Union[int, str]] = None  # noqa: UP007, UP045

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dominant_ratio <= 1.0:
            raise ValueError(f"visionzip: dominant_ratio must be in [0, 1] (the dominant share of each "
                             f"group's budget; official 54/64), got {self.dominant_ratio!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"visionzip: scope must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}")
        if isinstance(self.vision_layer, str) and self.vision_layer != "feature":
            raise ValueError(f"visionzip: vision_layer must be None (each port's layer), an int or 'feature', "
                             f"got {self.vision_layer!r}")

    # -- where ---------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0]  # before the LLM: on the input embeddings

    def vision_layers(self) -> list[int | str]:
        if self.vision_layer is None:
            raise ValueError("visionzip: vision_layer=None is each port's layer for the backbone's family: "
                             "resolve the method for a backbone (sharp.resolve_method; sharp.prune does)")
        return [self.vision_layer]

    def backbone_settings(self, backbone) -> dict:
        """The port's choices on the backbone's family for ``vision_layer=None`` and ``scope="auto"``
        (LLaVA-OV: "feature" per frame; Qwen2-VL: block -2 over the video; a port layer beyond a
        smaller tower becomes its nearest layer, :meth:`sharp.BackboneFacts.fit_vision_layer`)."""
        out = super().backbone_settings(backbone)
        if self.vision_layer is None:
            port = PORT_VISION_LAYER[self._family(backbone, "vision_layer")]
            out["vision_layer"] = backbone.fit_vision_layer(port)
        if self.scope == "auto":
            out["scope"] = PORT_SCOPE[self._family(backbone, "scope")]
        return out

    @staticmethod
    def _family(backbone, what: str) -> str:
        family = backbone.family
        if family not in PORT_SCOPE:
            raise ValueError(f"visionzip: no port default for backbone family {family!r} (known: "
                             f"{', '.join(sorted(PORT_SCOPE))}); set {what} explicitly")
        return family

    # -- what ------------------------------------------------------------------------------------
    def groups(self, tokens, scope: str) -> list[torch.Tensor]:
        """Indices (into the sample's current visual tokens) of each group, in sequence order."""
        if scope == "video":
            return [torch.arange(len(tokens), device=tokens.index.device)]
        counts = torch.unique(tokens.frame, return_counts=True)[1]  # tokens per frame, frames ascending
        return list(torch.argsort(tokens.frame, stable=True).split(counts.tolist()))  # each in sequence order

    def select(self, ctx) -> Selection:
        budgets = ctx.budget(self.retention)
        if budgets == ctx.visual_counts:
            return Selection.unchanged()
        layer, scope = self.vision_layers()[0], self.scope  # resolved for the backbone (backbone_settings)
        maps = ctx.vision(layer)
        results = [self.zip_sample(ctx, maps, b, k, scope) for b, k in enumerate(budgets)]
        self.record(ctx, budgets, layer, scope, results)
        # the contextual tokens' merged rows replace their embeddings (the others are unchanged)
        new_rows = [(ctx.visual_tokens(b).positions[r.merged], r.rows) for b, r in enumerate(results)]
        return Selection([torch.cat([r.dominant, r.targets]) for r in results], new_rows=new_rows)

    def zip_sample(self, ctx, maps, b: int, k: int, scope: str) -> GroupResult:
        """VisionZip on sample b's current visual tokens with budget k, group by group. Returns the
        dominant, target and absorbed indices into the sample's current visual tokens, group after
        group, and the new rows of the targets that absorbed tokens (``merged``). Groups of the same size and budget (LLaVA-OV's frames) run together
        (:func:`visionzip_groups`)."""
        tokens = ctx.visual_tokens(b)
        index = tokens.index  # (n_b,) ORIGINAL indices of the current tokens
        att = maps.attention[b, index.to(maps.attention.device)].to(index.device)  # (n_b,)
        keys = maps.keys[b, index.to(maps.keys.device)].to(index.device)  # (n_b, head_dim)
        visual_rows = ctx.rows(b, tokens.positions)  # (n_b, D), read-only
        groups = self.groups(tokens, scope)
        budgets = split_budget(k, [len(g) for g in groups])
        batches: dict = {}  # (n, k_g) -> the groups (in order) that share them
        for i, (g, k_g) in enumerate(zip(groups, budgets)):
            batches.setdefault((len(g), k_g), []).append(i)
        per_group: list = [None] * len(groups)  # (dominant, targets, absorbed) of each group
        merged, merged_rows = [], []  # targets that absorbed tokens, and their new rows
        for (n, k_g), members in batches.items():
            g = torch.stack([groups[i] for i in members])  # (G, n) indices into the current tokens
            res = visionzip_groups(att[g], keys[g], visual_rows, k_g, self.dominant_ratio, index=g)
            dominant, targets = g.gather(1, res.dominant), g.gather(1, res.targets)
            absorbed = g.gather(1, res.absorbed.flatten(1)).view(res.absorbed.shape)
            if res.absorbed.shape[1]:  # only targets that absorbed tokens change
                merged.append(targets.flatten())
                merged_rows.append(res.rows.flatten(0, 1))
            for j, i in enumerate(members):
                per_group[i] = (dominant[j], targets[j], absorbed[j])
        flat = {key: torch.cat([p[f] for p in per_group]) for f, key in enumerate(("dominant", "targets", "absorbed"))}
        rows = torch.cat(merged_rows) if merged_rows else visual_rows[:0].float()
        return GroupResult(flat["dominant"], flat["targets"], flat["absorbed"], rows,
                           merged=torch.cat(merged) if merged else index[:0])

    @staticmethod
    def record(ctx, budgets, layer, scope, results: list[GroupResult]) -> None:
        """``trace.method("visionzip")``: per sample, ORIGINAL indices of the dominant tokens, the
        contextual targets, and (token, target) rows of the absorbed tokens."""
        t = ctx.trace
        t.budget, t.vision_layer, t.scope = budgets, layer, scope
        index = [ctx.visual_tokens(b).index for b in range(len(results))]
        t.dominant = [i[r.dominant].sort().values.cpu() for i, r in zip(index, results)]
        t.contextual = [i[r.targets].sort().values.cpu() for i, r in zip(index, results)]
        t.absorbed = [i[r.absorbed].cpu() for i, r in zip(index, results)]
