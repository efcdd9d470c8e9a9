"""The training-only probes of the toys (:mod:`sharp.toy.training`): linear heads on hidden states whose
losses give the vision tower and the first decoder layers a dense signal; thrown away after training.

* :class:`TokenProbe`, on every visual token: object colour and frame; on the multi-scene toys also the
  token's scene, the colour its scene has shown so far and its scene's background;
* :func:`make_probe`, the seeded probe of a toy and its per-doc targets (:func:`sharp.toy.visual_token_labels`);
* :func:`add_question_heads` / :func:`question_probe_loss`, the question probe at the position that
  predicts the answer: the question's scene word (:func:`asked_word`) and the scene it asks about.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sharp.toy.labels import COLOR_IDS, visual_token_labels


class TokenProbe(torch.nn.Module):
    """Training-only linear probe on visual tokens: object colour (5 classes, 0 = none) and object
    frame (frames + 1 classes, 0 = no object) of each token (``sharp.toy.visual_token_labels``)."""

    def __init__(self, hidden: int, frames: int, scenes: int = 0, backgrounds: int = 0,
                 background_words: torch.nn.Parameter | None = None, background_ids: list[int] | None = None):
        super().__init__()
        self.color = torch.nn.Linear(hidden, len(COLOR_IDS) + 1)
        self.frame = torch.nn.Linear(hidden, frames + 1)
        # multi-scene benchmark: also the scene (0..scenes-1) of every token, and (read one layer later,
        # ``h2``) the colour of the object its scene has shown so far (0 = none yet)
        self.scene = torch.nn.Linear(hidden, scenes) if scenes else None
        self.scene_color = torch.nn.Linear(hidden, len(COLOR_IDS) + 1) if scenes else None
        # and the background colour of every token's scene (what a "the purple scene" question names)
        self.background = torch.nn.Linear(hidden, backgrounds) if backgrounds else None
        # ``words`` reading: no probe weights of its own, the class vectors are the LM's input embeddings of
        # the background words (" gray", " purple", ...): a token of a purple scene is pushed towards the
        # embedding of the word "purple" in the residual stream (LLaVA's stage-1 alignment in miniature)
        # (vocab, hidden) the model's own embedding matrix, or None; kept in a tuple so that it is not registered
        # as a parameter of the probe too (the optimizer gets it once, from the model)
        self._embeddings = (background_words,) if background_words is not None else None
        self._word_ids = background_ids
        # ``question`` probe: which scene the question is about (the scene asked by its background or its
        # ordinal; for ``cut``, the scene before the cut), read at the position that predicts the answer
        self.asked_scene = None
        self.asked_word = None  # and, one layer earlier, the question's scene word (text only, see asked_word)

    def loss(self, h: torch.Tensor, color: torch.Tensor, frame: torch.Tensor,
             scene: torch.Tensor | None = None, h2: torch.Tensor | None = None,
             scene_color: torch.Tensor | None = None, background: torch.Tensor | None = None) -> torch.Tensor:
        # h, h2: (b, n_visual, hidden); color, frame, scene, scene_color, background: (b, n_visual)
        out = (F.cross_entropy(self.color(h).flatten(0, 1), color.flatten())
               + F.cross_entropy(self.frame(h).flatten(0, 1), frame.flatten()))
        if self.scene is not None:
            out = out + F.cross_entropy(self.scene(h).flatten(0, 1), scene.flatten())
            out = out + F.cross_entropy(self.scene_color(h2).flatten(0, 1), scene_color.flatten())
        if self.background is not None:
            out = out + F.cross_entropy(self.background(h).flatten(0, 1), background.flatten())
        if self._embeddings is not None:
            words = self._embeddings[0][self._word_ids]  # (backgrounds, hidden)
            out = out + F.cross_entropy((h @ words.T).flatten(0, 1), background.flatten())
        return out


def make_probe(bb, settings: dict, train_docs: list, layout, seed: int):
    """The visual-token probe (seeded with ``seed + 1``) and its per-doc labels; (None, None) without the aux
    loss (``settings["aux_weight"] <= 0``). ``settings["background_probe"]``: ``off``, ``linear`` or ``words``."""
    if settings["aux_weight"] <= 0:
        return None, None
    labels = [visual_token_labels(bb, doc, layout.grid) for doc in train_docs]
    torch.manual_seed(seed + 1)
    scenes = len(train_docs[0]["scenes"]) if "scenes" in train_docs[0] else 0
    mode = settings.get("background_probe") or "off"
    if not scenes or mode == "off":
        return TokenProbe(bb.text_config.hidden_size, layout.frames, scenes), labels
    from sharp.synthetic.scenes import BACKGROUNDS

    if mode == "linear":
        return TokenProbe(bb.text_config.hidden_size, layout.frames, scenes, len(BACKGROUNDS)), labels
    ids = [word_id(bb, " " + name) for name in BACKGROUNDS]
    return TokenProbe(bb.text_config.hidden_size, layout.frames, scenes,
                      background_words=bb.model.get_input_embeddings().weight, background_ids=ids), labels


def add_question_heads(probe: TokenProbe, hidden: int, scenes: int, seed: int) -> None:
    """The question probe's two heads (seeded with ``seed + 2``): the asked scene (``scenes`` classes) and
    the question's scene word (:func:`asked_word_classes` classes)."""
    torch.manual_seed(seed + 2)
    probe.asked_scene = torch.nn.Linear(hidden, scenes)
    probe.asked_word = torch.nn.Linear(hidden, asked_word_classes())


def asked_word_classes() -> int:
    """Classes of :func:`asked_word`: the backgrounds, the ordinals, and none."""
    from sharp.synthetic.scenes import BACKGROUNDS, SCENE_ORDINALS

    return len(BACKGROUNDS) + len(SCENE_ORDINALS) + 1


def asked_word(doc: dict) -> int:
    """The word that names the scene in the question, as a class: a background (0-3), an ordinal (4-7),
    none (8: a ``cut`` question). A property of the question text alone."""
    from sharp.synthetic.scenes import BACKGROUNDS, SCENE_ORDINALS

    if doc["qtype"] == "scene":
        return list(BACKGROUNDS).index(doc["subtype"])
    if doc["qtype"] == "order":
        return len(BACKGROUNDS) + SCENE_ORDINALS.index(doc["subtype"])
    return len(BACKGROUNDS) + len(SCENE_ORDINALS)


def question_probe_loss(probe: TokenProbe, out, docs: list, idx: list, k: int, layer: int) -> torch.Tensor:
    """At the position that predicts the answer (``-(k + 1)``; ``k`` answer tokens): the question's scene
    word read after decoder layer ``layer - 2`` and the asked scene (for ``cut``: the scene before the cut)
    read after layer ``layer - 1``; (b, hidden) -> class logits."""
    word = torch.tensor([asked_word(docs[i]) for i in idx])
    scene = torch.tensor([docs[i]["target_scene"] for i in idx])
    return (F.cross_entropy(probe.asked_word(out.hidden_states[layer - 1][:, -(k + 1)]), word)
            + F.cross_entropy(probe.asked_scene(out.hidden_states[layer][:, -(k + 1)]), scene))


def word_id(bb, text: str) -> int:
    """The one token id of ``text`` in the backbone's vocabulary (ValueError if it is not one token)."""
    ids = bb.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not one token of {bb.name}'s vocabulary: {ids}")
    return ids[0]
