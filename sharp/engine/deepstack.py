"""Per-token visual features added to the residual stream after early decoder layers (DeepStack).

Qwen3-VL (transformers ``Qwen3VLTextModel.forward``) adds ``deepstack_visual_embeds[i]`` (one row per
visual token, in input order) to the visual rows (``visual_pos_masks``) of the output of decoder
layer i, for i < len(deepstack_visual_embeds) (3 for the 8B: features of vision blocks 8, 16, 24).
That code indexes the FULL-length sequence, so once the engine has shortened the sequence it
cannot run. :class:`VisualInjection` takes the injection over for the duration of a session: the
backbone's hook removes ``deepstack_visual_embeds`` from the text model's call and hands them
here, and a forward hook on each of those layers adds row ``visual_index`` of the features to every
visual row the CURRENT sequence still holds. A pruned visual token thus loses its DeepStack
features with it; a merged row (its ORIGINAL index is the kept token's) gets the kept token's.
With nothing pruned the result is bit-identical to the model's own ``_deepstack_process``
(the same elementwise add on the same rows).
"""
from __future__ import annotations

from typing import Optional

import torch


class VisualInjection:
    """Adds ``features[i][b, visual_index]`` to the visual rows of decoder layer i's output."""

    def __init__(self, session):
        self.session = session
        # id(call state) -> per layer (b, n_visual, d): a probe forward inside a prefill (PosC's black
        # video) has its own features and must not replace the prefill's
        self._features: dict[int, list[torch.Tensor]] = {}

    def set(self, features: Optional[list[torch.Tensor]]) -> None:
        """The features of the model call now starting (``session.state``); None: no injection."""
        runner = self.session.prefill
        live = {id(f) for f in runner.forwards}
        self._features = {k: v for k, v in self._features.items() if k in live}
        if runner.active:
            if features is None:
                self._features.pop(id(runner.state), None)
            else:
                self._features[id(runner.state)] = features

    @property
    def features(self) -> Optional[list[torch.Tensor]]:
        runner = self.session.prefill
        return self._features.get(id(runner.state)) if runner.active else None

    def install(self, layers) -> None:
        for i, layer in enumerate(layers):
            self.session.add_hook(layer, self._make_hook(i), pre=False)

    def _make_hook(self, i: int):
        def hook(module, args, kwargs, output):
            session = self.session
            features = self.features
            if features is None or i >= len(features) or session.phase not in ("prefill", "probe"):
                return None
            hidden = output[0] if isinstance(output, (tuple, list)) else output  # (b, s_cur, d)
            hidden = self.add(hidden, session.prefill.state.seq.visual_index, features[i])
            return (hidden,) + tuple(output[1:]) if isinstance(output, (tuple, list)) else hidden

        return hook

    @staticmethod
    def add(hidden: torch.Tensor, visual_index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """hidden (b, s, d) + features (b, n_visual, d) gathered at visual_index (b, s) (-1: text, no add)."""
        rows = visual_index >= 0  # (b, s)
        batch = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(visual_index)
        add = features.to(hidden.device, hidden.dtype)[batch[rows], visual_index[rows]]  # (n_rows, d)
        hidden[rows, :] = hidden[rows, :].clone() + add  # in place, as _deepstack_process
        return hidden
