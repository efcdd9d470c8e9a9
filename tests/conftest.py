"""Session-wide test resources: each backbone is loaded once for the whole run (not once per test file),
and lmms-eval's task index is built once.

Test modules call :func:`shared_backbone` directly (parametrized tests pick the backbone by name); the
``backbone_loader`` fixture gives the same objects to tests that prefer
fixtures. A test that changes a model must undo it (``sharp.prune`` removes its hooks on exit).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.lru_cache(maxsize=None)
def shared_backbone(name: str, impl: str = "sdpa", device: str = "cpu"):
    """``sharp.load_backbone(name, attn_implementation=impl)``, loaded once per test session."""
    import sharp

    return sharp.load_backbone(name, attn_implementation=impl, device=device)


@pytest.fixture(scope="session")
def backbone_loader():
    return shared_backbone


@pytest.fixture(scope="session")
def task_index_memo() -> dict:
    """lmms-eval's task indexes by include path, built once per session (each build parses ~3000 task
    YAML files, 8-11 s); ``lmms_helpers.memoised_task_index(memo=task_index_memo)`` fills and reads it."""
    return {}


def random_video_inputs(bb, seeds=(1,), frames: int = 8, question: str = "What happens?") -> dict:
    """Model inputs of one distinct random video per seed (uint8 noise of the backbone's synthetic frame
    size), the same prompt for every sample, so one layout and no padding."""
    h, w = bb.synthetic_frame_size()
    pixels = [bb.video_pixels(np.random.default_rng(s).integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
              for s in seeds]
    out = bb._tokenize([bb.build_prompt(question, bb.n_placeholders(**pixels[0]))] * len(seeds))
    out.update(bb.collate_pixels(pixels))
    return bb._to_model(out)
