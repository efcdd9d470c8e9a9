"""Training-only per-visual-token targets of the toys' visual probe (:mod:`sharp.toy.probes`)."""
from __future__ import annotations

import numpy as np
import torch

COLOR_IDS = {"red": 1, "green": 2, "blue": 3, "yellow": 4}  # 0: no object


def sampled_frames(bb, doc: dict) -> np.ndarray:
    """Indices (into the video file) of the frames the backbone samples, per visual-token frame.

    LLaVA-OV: one frame per visual frame; Qwen2-VL: (t, 2) pairs of each temporal patch.
    """
    return bb.visual_frame_indices(int(doc["num_frames"]), doc.get("fps"))


def _cell_cover(event: dict, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
    """(gh, gw) bool: the image cells at least a quarter covered by the event's object."""
    gh, gw = grid
    ys = np.arange(gh + 1) * height / gh
    xs = np.arange(gw + 1) * width / gw
    half = event["size"] / 2
    oy = np.clip(np.minimum(ys[1:], event["cy"] + half) - np.maximum(ys[:-1], event["cy"] - half), 0, None)
    ox = np.clip(np.minimum(xs[1:], event["cx"] + half) - np.maximum(xs[:-1], event["cx"] - half), 0, None)
    return (oy[:, None] * ox[None, :]) / ((height / gh) * (width / gw)) >= 0.25


def visual_token_labels(bb, doc: dict, grid: tuple[int, int]) -> dict:
    """Per visual token (layout order: frame, row, column): the colour of the object covering at least
    a quarter of its image cell (``color``, 0 = none), its frame index (``frame``) and the same for
    object tokens only (``oframe``: frame + 1, 0 = no object). Multi-scene docs add the scene index
    (``scene``), the colour its scene has shown so far (``scene_color``) and its scene's background
    (``background``). Training-only targets."""
    frames = sampled_frames(bb, doc)  # (F, k)
    gh, gw = grid
    color = np.zeros((len(frames), gh, gw), np.int64)
    for e in doc["events"]:
        cover = _cell_cover(e, grid, doc["height"], doc["width"])  # (gh, gw)
        present = ((frames >= e["start"]) & (frames < e["end"])).any(axis=1)  # (F,)
        color[present[:, None, None] & cover[None]] = COLOR_IDS[e["color"]]
    frame = np.repeat(np.arange(len(frames)), gh * gw)
    color = color.reshape(-1)
    oframe = np.where(color > 0, frame + 1, 0)  # the frame of object tokens, 0 elsewhere
    out = {"color": torch.from_numpy(color), "frame": torch.from_numpy(frame), "oframe": torch.from_numpy(oframe)}
    if "scenes" in doc:  # multi-scene benchmark: the scene (0..3) of each token's first frame
        from sharp.synthetic.scenes import scene_of_frame

        scene = scene_of_frame(doc)[frames[:, 0]]  # (F,) scene of each visual frame
        out["scene"] = torch.from_numpy(np.repeat(scene, gh * gw))
        out["scene_color"] = torch.from_numpy(np.repeat(_scene_color_so_far(doc, frames, scene), gh * gw))
        out["background"] = torch.from_numpy(np.repeat(_background_of(doc, scene), gh * gw))
    return out


def _background_of(doc: dict, scene: np.ndarray) -> np.ndarray:
    """(F,) int: per visual frame, the index of its scene's background colour in ``scenes.BACKGROUNDS``
    (the word a ``scene`` question names: "the object in the purple scene")."""
    from sharp.synthetic.scenes import BACKGROUNDS

    names = list(BACKGROUNDS)
    return np.array([names.index(doc["scenes"][k]["background"]) for k in scene], np.int64)


def _scene_color_so_far(doc: dict, frames: np.ndarray, scene: np.ndarray) -> np.ndarray:
    """(F,) int: per visual frame, the colour (``COLOR_IDS``) of an object already shown in the frame's
    scene up to and including that frame, 0 if none yet (causal: what a token can have seen). Every scene
    of the multi-scene benchmark holds one object, so this is the scene's object once it has appeared."""
    out = np.zeros(len(frames), np.int64)
    for e in doc["events"]:
        for j in range(len(frames)):
            sc = doc["scenes"][scene[j]]
            lo = max(e["start"], sc["start"])  # the event's first frame inside this scene
            if lo < min(e["end"], sc["end"]) and lo <= frames[j].max() and out[j] == 0:
                out[j] = COLOR_IDS[e["color"]]
    return out
