"""Videos stored as frame folders (MVBench's TVQA clips: ``<clip>/00001.jpg``, ...).

lmms-eval 0.7.3's ``mvbench_doc_to_visual`` returns the clip's path whatever it is; for a frame folder
that is a directory, which no video reader opens (the built-in wrappers then answer text-only). The
wrapper reads such a folder as a video of its frames in name order at :data:`FRAME_FOLDER_FPS`: MVBench
extracted the TVQA frames at 3 fps (its folder ``tvqa/frames_fps3_hq``; its loader reads them with
``fps=3``), and each clip of the video revision's ``tvqa/video_fps3_hq_segment`` is a folder of those
frames (lmms-eval's ``mvbench_episodic_reasoning.yaml``: "it stores the frame images in folder").
The frames are encoded once, with the project's writer (:func:`sharp.backbones.video.write_video`,
H.264 crf 18, yuv420p as the benchmark's mp4 files), into a temporary file that the backbone's own
reader then samples exactly as any other video of the benchmark (frame indices, fps rules, resizing).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

FRAME_FOLDER_FPS = 3.0
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def _natural_key(name: str) -> list:
    """'img_10.jpg' after 'img_9.jpg' (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """The folder's frames (``.jpg``/``.jpeg``/``.png``, any case) in natural name order."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_frame_folder(folder: Union[str, os.PathLike]) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of ``folder``; ValueError when it has none or their sizes differ."""
    from PIL import Image

    files = frame_files(folder)
    if not files:
        raise ValueError(f"frame folder {folder} has no {'/'.join(FRAME_SUFFIXES)} frames")
    frames = []
    for f in files:
        with Image.open(f) as im:
            frames.append(np.asarray(im.convert("RGB")))
    sizes = {fr.shape for fr in frames}
    if len(sizes) > 1:
        raise ValueError(f"frame folder {folder} mixes frame sizes {sorted(sizes)}")
    return np.stack(frames)


def _even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row / column where H or W is odd (yuv420p needs even sizes)."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class FrameFolderVideos:
    """Encodes frame folders as temporary mp4 files (one per folder, reused), removed by :meth:`close`."""

    def __init__(self, fps: float = FRAME_FOLDER_FPS):
        self.fps = float(fps)
        self._dir: Optional[Path] = None
        self._made: dict[str, str] = {}

    def video(self, folder: Union[str, os.PathLike]) -> str:
        """The mp4 of ``folder``'s frames at :attr:`fps` (encoded on first use)."""
        from sharp.backbones.video import write_video

        key = os.path.realpath(folder)
        if key not in self._made:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="sharp_frame_folders_"))
            path = self._dir / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".mp4")
            write_video(path, _even(read_frame_folder(folder)), fps=self.fps)
            self._made[key] = str(path)
        return self._made[key]

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self._made = None, {}

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
