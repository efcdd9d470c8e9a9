"""The video of a figure: model inputs, the frame shown for each visual-token frame, the event frames.

A figure's video is a video file (plus a question) or a synthetic-benchmark doc id
(``synth-test-s0-00003``: its mp4, its prompt as the lmms-eval task asks it, and the frames where
the asked event happens). Pixels go through the backbone's own pipeline (``Backbone.prepare``),
so the tokens drawn are the tokens the model sees.

Pixels -> token grid (both families resize the whole frame, no crop, so a token covers a fixed
rectangle of the frame):

* LLaVA-OneVision: every sampled frame is one visual frame; SigLIP's patch grid is pooled to
  ``layout.grid`` (toy 2 x 2, 7B 14 x 14) per frame, token (row, col) covers that cell of the frame.
* Qwen2-VL: 2 x 2 patches merge into one token and 2 consecutive frames form one temporal patch,
  so a visual frame is a PAIR of frames; the figure shows its first frame (:attr:`FigureVideo.frames_per_visual`
  is 2 and the caption says so).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DOC_ID = re.compile(r"^(?P<bench>synth|scenes)-(?P<split>train|test)-s(?P<seed>\d+)-(?P<index>\d+)$")


@dataclass
class FigureVideo:
    """One video as a figure needs it.

    inputs: model inputs (batch 1) from ``bb.prepare``; layout: their :class:`~sharp.VisualLayout`.
    display: (F, H, W, 3) uint8, the frame shown for each of the layout's F visual frames.
    frames_per_visual: video frames behind one visual frame (Qwen2-VL: 2, a temporal patch).
    event_frames / distractor_frames: visual frames where the asked event / another object shows
    (synthetic docs only; empty otherwise). doc: the synthetic doc (None for a file).
    """

    name: str
    question: str
    inputs: dict
    layout: object
    display: np.ndarray
    frames_per_visual: int
    event_frames: list = field(default_factory=list)
    distractor_frames: list = field(default_factory=list)
    doc: Optional[dict] = None

    @property
    def answer(self) -> Optional[str]:
        """The correct option letter of a synthetic doc (None for a file)."""
        return None if self.doc is None else self.doc["answer"]


def find_doc(doc_id: str, cache_dir=None) -> dict:
    """The synthetic doc ``synth-<split>-s<seed>-<index>`` (or ``scenes-...``, the multi-scene benchmark)
    with its mp4: from the smallest cached split that holds it, else from a new split of ``index + 1``
    docs (a split of n docs is a prefix of any larger one, so the doc is the same either way)."""
    from sharp.synthetic import benchmark, scenes

    m = DOC_ID.match(doc_id)
    if m is None:
        raise ValueError(f"synthetic doc id {doc_id!r}: expected synth-<train|test>-s<seed>-<index> "
                         f"or scenes-<train|test>-s<seed>-<index>, e.g. synth-test-s0-00003")
    bench = scenes if m["bench"] == "scenes" else benchmark
    split, seed, index = m["split"], int(m["seed"]), int(m["index"])
    folder = bench.split_dir(split, 0, seed, cache_dir).parent
    cached = sorted(int(d.name.rsplit("_n", 1)[1]) for d in folder.glob(f"{split}_seed{seed}_n*")
                    if d.name.rsplit("_n", 1)[1].isdigit() and (d / "manifest.json").is_file())
    n = next((k for k in cached if k > index), index + 1)
    doc = bench.ensure_split(split, n=n, seed=seed, cache_dir=cache_dir)[index]
    assert doc["id"] == doc_id, (doc["id"], doc_id)
    return doc


def _display_frames(frames: np.ndarray, n_visual_frames: int) -> tuple[np.ndarray, int]:
    """The first video frame of each visual frame, and how many video frames one visual frame holds."""
    per = -(-len(frames) // n_visual_frames)  # ceil: Qwen2-VL pads an odd count with the last frame
    picked = [frames[min(f * per, len(frames) - 1)] for f in range(n_visual_frames)]
    return np.stack(picked), per


def _visual_frames_of(bb, doc: dict, file_frames: Sequence[int]) -> list[int]:
    """Visual frames (columns) holding at least one of the video-file frames ``file_frames``."""
    from sharp.toy.labels import sampled_frames

    behind = sampled_frames(bb, doc)  # (F, k) file frames behind each visual frame
    wanted = np.asarray(sorted(file_frames))
    return [f for f in range(len(behind)) if np.isin(behind[f], wanted).any()]


def load_video(bb, video: Optional[str] = None, question: Optional[str] = None, doc_id: Optional[str] = None,
               cache_dir=None) -> FigureVideo:
    """A :class:`FigureVideo` from a video file and question, or from a synthetic doc id."""
    if (video is None) == (doc_id is None):
        raise ValueError("give either a video file (with a question) or a synthetic doc id, not both / neither")
    doc = None
    if doc_id is not None:
        from sharp.toy.prompts import question_text

        doc = find_doc(doc_id, cache_dir)
        video, question = doc["video"], question or question_text(doc)
        name = doc_id
    else:
        if not question:
            raise ValueError("a video file needs a question (--question)")
        if not Path(video).is_file():
            raise FileNotFoundError(f"video {video!r} does not exist")
        name = Path(video).name
    frames = bb.sample_frames(video)
    inputs = bb.pixels_to_inputs(frames, question)  # = bb.prepare(video, question), frames decoded once
    layout = bb.layout(inputs)
    display, per = _display_frames(frames, layout.frames)
    events = distractors = []
    if doc is not None:
        events = _visual_frames_of(bb, doc, doc["event_frames"])
        others = set(doc["all_event_frames"]) - set(doc["event_frames"])
        distractors = [f for f in _visual_frames_of(bb, doc, others) if f not in events] if others else []
    return FigureVideo(name=name, question=question, inputs=inputs, layout=layout, display=display,
                       frames_per_visual=per, event_frames=events, distractor_frames=distractors, doc=doc)


def from_inputs(bb, inputs: dict, frames: np.ndarray, name: str = "synthetic", question: str = "") -> FigureVideo:
    """A :class:`FigureVideo` of already prepared inputs and the frames they were made from (tests)."""
    layout = bb.layout(inputs)
    display, per = _display_frames(frames, layout.frames)
    return FigureVideo(name=name, question=question, inputs=inputs, layout=layout, display=display,
                       frames_per_visual=per)
