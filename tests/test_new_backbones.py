"""The newer backbone families (issue 21): LLaVA-Video, Qwen2.5-VL, Qwen3-VL.

- Engine invariants for every registered method on each new tiny backbone (the functions of
  tests/test_methods.py: trace = schedule, R = 1 bit-identical, decode = masked no-cache reference at
  batch 2 with left padding; bad kwargs are refused before any model exists, which does not depend on
  the backbone and stays in tests/test_methods.py).
- Qwen2.5-VL: the vision maps undo the window order (checked against the tower's own per-row RoPE
  angles in preprocessing order, not against ``get_window_index``).
- Qwen3-VL: DeepStack features land on the kept visual tokens only, and the injection equals the
  model's own when nothing is pruned.
- Layout: the family code, given the 7B/8B config and a real-size video, produces what the HF
  processors (built from the shipped preprocessor json of the hub repos) produce, and the tiny
  config shares every vision setting the layout depends on.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sharp
from sharp.backbones import backbone_config_path, family_class

import compat_helpers
import test_methods as TM
from default_methods import TINY_KWARGS

NEW = ["tiny_llava_video", "tiny_qwen2_5_vl", "tiny_qwen3_vl"]
NAMES = [n for n in sharp.method_names() if not n.startswith("_")]
CASES = [(n, TINY_KWARGS.get(n, {})) for n in NAMES]
PROCESSORS = Path(__file__).parent / "fixtures" / "processors"


# -- invariants (every registered method x every new family) --------------------------------------
# tiny_llava_video is tiny_llava_onevision's model (same config json, class and seed): identity and
# decode of a method that does not look at the family are that backbone's cases in tests/test_methods.py,
# so here they run for the methods whose behaviour depends on the family (port defaults, newline
# handling, query rows) plus one stage method and ShaRP; the trace runs for every method.
LLAVA_VIDEO_RUNS = {"fastv", "sharp", "visionzip", "visionzip_sharp", "holitom", "holitom_sharp", "framefusion"}
HEAVY = [(bb, name, kw) for bb in NEW for name, kw in CASES if bb != "tiny_llava_video" or name in LLAVA_VIDEO_RUNS]
HEAVY_IDS = [f"{name}-{bb}" for bb, name, _ in HEAVY]
_REFERENCE: dict = {}


@pytest.mark.parametrize("bb_name", NEW)
@pytest.mark.parametrize("name,kwargs", CASES, ids=NAMES)
def test_trace_follows_token_schedule(bb_name, name, kwargs):
    TM.test_trace_follows_token_schedule(bb_name, name, kwargs)


@pytest.mark.parametrize("bb_name,name,kwargs", HEAVY, ids=HEAVY_IDS)
def test_full_retention_is_identity(bb_name, name, kwargs):
    """tests/test_methods.py's test, with the unpruned generate computed once per backbone."""
    method = TM.make(name, kwargs, 1.0, bb_name)
    leaves = method.flat_children() if isinstance(method, TM.ComposedMethod) else [method]
    if not all(type(m).identity_at_full_retention for m in leaves):
        pytest.skip(f"{name}: R = 1 is not the identity (e.g. SegM masks layer 0)")
    if any(getattr(m, "retention", 1.0) != 1.0 for m in leaves):
        pytest.skip(f"{name}: a child has its own retention below 1")
    bb = TM.backbone(bb_name, "sdpa")
    if bb_name not in _REFERENCE:
        inputs = bb.synthetic_inputs(frames=8, seed=12, batch_size=2)
        _REFERENCE[bb_name] = (inputs, *TM.generate_with_logits(bb, inputs))
    inputs, ref_seq, ref_logits = _REFERENCE[bb_name]
    with sharp.prune(bb, method):
        seq, logits = TM.generate_with_logits(bb, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("bb_name,name,kwargs", HEAVY, ids=HEAVY_IDS)
def test_decode_equals_masked_no_cache_reference(bb_name, name, kwargs):
    TM.test_decode_equals_masked_no_cache_reference(bb_name, 2, name, kwargs)  # batch 2: left padding


def test_families_and_lmms_ids():
    from sharp.lmms.manifest import FAMILIES, model_ids

    for name, family in [("tiny_llava_video", "llava_video"), ("llava_video_7b", "llava_video"),
                         ("tiny_qwen2_5_vl", "qwen2_5_vl"), ("qwen2_5_vl_7b", "qwen2_5_vl"),
                         ("tiny_qwen3_vl", "qwen3_vl"), ("qwen3_vl_8b", "qwen3_vl")]:
        assert sharp.backbones.backbone_family(name) == family
    ids = model_ids()
    for family in ("llava_video", "qwen2_5_vl", "qwen3_vl"):
        assert family in FAMILIES and f"{family}_fastv" in ids and f"{family}_sharp" in ids
    assert sharp.load_backbone("tiny_llava_video").num_frames == 8
    from sharp.backbones.base import _BACKBONES
    assert _BACKBONES["llava_video_7b"]["num_frames"] == 64


# -- Qwen2.5-VL: window order ---------------------------------------------------------------------
def test_qwen2_5_vl_vision_maps_undo_the_window_order():
    bb = TM.backbone("tiny_qwen2_5_vl", "eager")
    inputs = bb.synthetic_inputs(frames=4, seed=3, batch_size=2, size=(84, 112))  # 3 x 4 tokens: partial windows
    visual = bb.model.model.visual
    captured = {}
    blocks = bb.vision_layers
    hooks = [blk.register_forward_pre_hook(
        lambda m, a, k, i=i: captured.__setitem__(i, {"args": a, "kwargs": k}), with_kwargs=True)
        for i, blk in enumerate(blocks)]
    hooks += [blk.register_forward_hook(lambda m, a, o, i=i: captured[i].__setitem__("output", o))
              for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    grid = inputs["video_grid_thw"]
    assert bb.full_attention_layers == [1]
    # block 0 attends inside 2 x 2-token windows, block 1 over each temporal patch
    lens0 = (captured[0]["kwargs"]["cu_seqlens"].diff()).tolist()
    lens1 = (captured[1]["kwargs"]["cu_seqlens"].diff()).tolist()
    t, h, w = grid[0].tolist()
    assert (t, h // 2, w // 2) == (2, 3, 4)  # 3 x 4 tokens per temporal patch: the last window row is half
    assert lens1 == [h * w] * (2 * t)
    assert lens0 == [16, 16, 8, 8] * (2 * t)  # windows of 2 x 2 tokens (4 patch rows each), row-major
    # reference: the tower's RoPE angles per patch row in PREPROCESSING order, grouped per token
    emb, _ = compat_helpers.vision_rope(visual, grid)  # (N, head_dim) cos (4.57 rot_pos_emb; 5.x rotary module)
    expected = emb.reshape(2, -1, 4, emb.shape[-1]).mean(dim=2)  # (b, n_visual, head_dim)
    cos_window_order = captured[1]["kwargs"]["position_embeddings"][0]  # rows as the blocks see them
    assert not torch.equal(cos_window_order, emb)  # the order really differs
    got = bb.visual_features_to_tokens(cos_window_order, 2, grid)
    torch.testing.assert_close(got, expected)
    # and vision_maps maps with it (hidden of the last block = the merger's input)
    for layer in (0, 1):
        maps = bb.vision_maps(layer, dict(captured[layer], grid_thw=grid), 2)
        assert maps.hidden.shape == (2, bb.layout(inputs).n_visual, 32)
        assert torch.allclose(maps.attention.sum(dim=1), maps.attention.sum(dim=1)[0])  # one sum per sample
    with pytest.raises(ValueError, match="grid_thw"):
        bb.vision_maps(1, captured[1], 2)


# -- Qwen3-VL: DeepStack --------------------------------------------------------------------------
def test_qwen3_vl_deepstack_lands_on_kept_tokens_only():
    bb = TM.backbone("tiny_qwen3_vl", "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=21, batch_size=2)
    layout = bb.layout(inputs)
    with torch.no_grad():  # the features, from the model's own vision call: list of (b * n_visual, d)
        _, deepstack = compat_helpers.qwen3vl_video_features(bb.model.model, inputs["pixel_values_videos"],
                                                             inputs["video_grid_thw"])
    assert len(deepstack) == 2 and deepstack[1].shape[0] == 2 * layout.n_visual
    feats = [d.reshape(2, layout.n_visual, -1) for d in deepstack]
    raw, seen = {}, {}
    # registered before the session's hooks: sees layer 1's raw output and layer 2's actual input
    h1 = bb.layers[1].register_forward_hook(lambda m, a, k, o: raw.__setitem__(1, o.clone()), with_kwargs=True)
    h2 = bb.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__(2, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    try:
        with sharp.prune(bb, "fastv", 0.25, layer=1) as trace, torch.no_grad():  # prune BEFORE layer 1
            bb.model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    assert trace.stage_layers == [1]
    kept = trace.kept[0]  # ORIGINAL visual indices kept per sample
    added = seen[2] - raw[1]  # (b, s_pruned, d): what was injected after layer 1
    assert added.shape[1] == inputs["input_ids"].shape[1] - (layout.n_visual - len(kept[0]))
    for b in range(2):
        is_vis = torch.zeros(added.shape[1], dtype=torch.bool)
        rows = (added[b].abs().sum(-1) > 0).nonzero().squeeze(1)
        is_vis[rows] = True
        assert len(rows) == len(kept[b])  # only the kept visual rows got something
        torch.testing.assert_close(added[b, rows], feats[1][b, kept[b].sort().values], atol=1e-5, rtol=1e-5)
    # with nothing pruned the session's injection equals the model's own, bit for bit
    with torch.no_grad():
        ref = bb.model(**inputs).logits
        with sharp.prune(bb, "fastv", 1.0):
            out = bb.model(**inputs).logits
    assert torch.equal(ref, out)


def test_qwen3_vl_prompt_has_timestamps_per_temporal_patch():
    from sharp.backbones.qwen3_vl import TimedFrames
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    bb = TM.backbone("tiny_qwen3_vl", "eager")
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    seconds = np.array([0, 1, 2, 3, 4, 5, 6, 7]) * 2.0
    px = bb.video_pixels(TimedFrames(frames, seconds))
    n = bb.n_placeholders(**px)
    # the processor's own timestamps of frame indices [0, 2, ...] at 0.5 fps
    ref = Qwen3VLProcessor._calculate_timestamps(None, list(range(0, 16, 2)), 1.0, 2)
    assert list(n.timestamps) == ref == [1.0, 5.0, 9.0, 13.0]
    prompt = bb.build_prompt("Q?", n)
    assert prompt.count("<|vision_start|>") == 4 and "<9.0 seconds><|vision_start|>" in prompt
    assert prompt.count("<|video_pad|>") == int(n) == 4 * 4


# -- layout vs the HF processors -----------------------------------------------------------------
def _family_of_config(name: str):
    """The family class with the named backbone's config (no model is built: the layout needs only the config)."""
    cls = family_class(sharp.backbones.backbone_family(name))
    config = cls.build_config(backbone_config_path(name))
    return cls(name=name, model=SimpleNamespace(config=config), tokenizer=None)


def _vision_json(name):
    return json.loads(backbone_config_path(name).read_text())["vision_config"]


@pytest.mark.parametrize("big,tiny,keys", [
    ("qwen2_5_vl_7b", "tiny_qwen2_5_vl", ("patch_size", "spatial_merge_size", "temporal_patch_size")),
    ("qwen3_vl_8b", "tiny_qwen3_vl", ("patch_size", "spatial_merge_size", "temporal_patch_size")),
])
def test_tiny_configs_share_the_layout_settings(big, tiny, keys):
    a, b = _vision_json(big), _vision_json(tiny)
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def _real_video(t=4, h=360, w=640, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_qwen2_5_vl_layout_matches_hf_processor():
    try:  # the PIL processor (5.x: the default class is torchvision's where torchvision is installed)
        from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
    except ImportError:  # 4.57: the default is the PIL one
        from transformers import Qwen2VLImageProcessor

    cfg = json.loads((PROCESSORS / "Qwen2.5-VL-7B-Instruct" / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessor(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
    frames = _real_video()
    # lmms-eval builds the processor with min/max pixels 200704 / 1605632 (qwen2_5_vl wrapper)
    # (5.x has no video path in the image processor: compat interleaves its per-frame patches)
    ref = compat_helpers.qwen_video_patches(proc, frames, min_pixels=256 * 28 * 28, max_pixels=1605632)
    for name in ("qwen2_5_vl_7b", "tiny_qwen2_5_vl"):
        bb = _family_of_config(name)
        bb.video_kwargs = {}
        px = bb.video_pixels(frames)
        assert torch.equal(px["video_grid_thw"], ref["video_grid_thw"])  # [[2, 26, 46]]
        torch.testing.assert_close(px["pixel_values_videos"], ref["pixel_values_videos"].float(), atol=1e-4, rtol=0)
        inputs = {"input_ids": torch.tensor([[bb.video_token_id] * bb.n_placeholders(**px)]), **px}
        layout = bb.layout(inputs)
        assert (layout.frames, layout.grid, layout.tokens_per_frame) == (2, (13, 23), 13 * 23)
        assert float(px["second_per_grid_ts"]) == 2 / 2.0  # the processor's default fps


def test_qwen3_vl_layout_and_positions_match_hf():
    try:  # the PIL processor (5.x: the default class is torchvision's where torchvision is installed)
        from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
    except ImportError:  # 4.57: the default is the PIL one
        from transformers import Qwen2VLImageProcessor

    cfg = json.loads((PROCESSORS / "Qwen3-VL-8B-Instruct" / "video_preprocessor_config.json").read_text())
    # Qwen3VLVideoProcessor needs torchvision; its patch layout is Qwen2-VL's with the Qwen3 sizes
    proc = Qwen2VLImageProcessor(patch_size=cfg["patch_size"], temporal_patch_size=cfg["temporal_patch_size"],
                                 merge_size=cfg["merge_size"], image_mean=cfg["image_mean"], image_std=cfg["image_std"],
                                 min_pixels=cfg["size"]["shortest_edge"], max_pixels=cfg["size"]["longest_edge"])
    frames = _real_video(h=352, w=640)  # multiples of 32, as qwen-vl-utils resizes for patch 16
    ref = compat_helpers.qwen_video_patches(proc, frames, do_resize=False)
    bb8 = _family_of_config("qwen3_vl_8b")
    bb8.video_kwargs = {"min_pixels": 0, "max_pixels": 10 ** 9}
    px = bb8.video_pixels(frames)
    assert torch.equal(px["video_grid_thw"], ref["video_grid_thw"])  # [[2, 22, 40]]
    torch.testing.assert_close(px["pixel_values_videos"], ref["pixel_values_videos"].float(), atol=1e-4, rtol=0)
    # positions: the tiny model's own get_rope_index on the family's prompt vs. the Qwen3-VL rule
    # written out here (text continues after each temporal patch's max position; t index 0 per patch)
    bb = TM.backbone("tiny_qwen3_vl", "eager")
    inputs = bb.synthetic_inputs(frames=4, seed=0)
    ids = inputs["input_ids"][0]
    pos, _ = compat_helpers.rope_index(bb.model, inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"],
                                       attention_mask=inputs["attention_mask"])  # 5.x: + mm_token_type_ids
    gh, gw = bb.layout(inputs).grid
    expected, nxt, i = [], 0, 0
    while i < len(ids):
        if ids[i] == bb.video_token_id:
            for r in range(gh):
                for c in range(gw):
                    expected.append((nxt, nxt + r, nxt + c))
            nxt = nxt + max(gh, gw)
            i += gh * gw
        else:
            expected.append((nxt, nxt, nxt))
            nxt += 1
            i += 1
    assert pos[:, 0].T.tolist() == [list(e) for e in expected]


def test_llava_video_layout_matches_hf_processor():
    from transformers import LlavaOnevisionImageProcessor

    cfg = json.loads((PROCESSORS / "LLaVA-Video-7B-Qwen2-hf" / "preprocessor_config.json").read_text())
    proc = LlavaOnevisionImageProcessor(**{k: v for k, v in cfg.items()
                                           if k not in ("image_processor_type", "processor_class")})
    frames = _real_video(t=3, h=360, w=640)
    # the video path of the HF processor = each frame resized to 384 x 384, no anyres tiling
    ref = torch.stack([torch.as_tensor(proc.preprocess(f, do_pad=False, image_grid_pinpoints=[[384, 384]],
                                                       return_tensors="np")["pixel_values"][0][0]) for f in frames])
    bb = _family_of_config("llava_video_7b")
    px = bb.video_pixels(frames)["pixel_values_videos"]
    assert px.shape == ref.shape == (3, 3, 384, 384)
    torch.testing.assert_close(px, ref.float(), atol=2e-2, rtol=0)  # PIL vs numpy resize rounding
    n = bb.n_placeholders(px)
    assert n == 3 * 196 + 1  # HF class: ceil(27 / 2)^2 per frame + one image_newline per video
    layout = bb.layout({"input_ids": torch.tensor([[bb.video_token_id] * n]), "pixel_values_videos": px[None]})
    assert (layout.frames, layout.tokens_per_frame, layout.grid) == (3, 196, (14, 14))


def test_qwen2_5_vl_positions_use_absolute_time():
    """The tiny model's own get_rope_index on the family's inputs vs. Qwen2.5-VL's rule written out:
    a visual token of temporal patch i sits at time i x second_per_grid_ts (1.0) x tokens_per_second (2)."""
    bb = TM.backbone("tiny_qwen2_5_vl", "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=0)
    ids = inputs["input_ids"][0]
    pos, _ = compat_helpers.rope_index(bb.model, inputs["input_ids"], image_grid_thw=None,
                                       video_grid_thw=inputs["video_grid_thw"],
                                       second_per_grid_ts=inputs["second_per_grid_ts"],
                                       attention_mask=inputs["attention_mask"])  # 5.x: + mm_token_type_ids
    layout = bb.layout(inputs)
    gh, gw = layout.grid
    step = float(inputs["second_per_grid_ts"][0]) * bb.config.vision_config.tokens_per_second
    assert step == 2.0
    expected, nxt, i = [], 0, 0
    while i < len(ids):
        if ids[i] == bb.video_token_id:
            for t in range(layout.frames):
                for r in range(gh):
                    for c in range(gw):
                        expected.append((nxt + int(t * step), nxt + r, nxt + c))
            nxt = max(max(e) for e in expected) + 1
            i += layout.n_visual
        else:
            expected.append((nxt, nxt, nxt))
            nxt += 1
            i += 1
    assert pos[:, 0].T.tolist() == [list(e) for e in expected]


@pytest.mark.parametrize("backbone,sweep", [("llava_video_7b", "table1_llava_video"),
                                            ("qwen2_5_vl_7b", "table1_qwen2_5_vl"), ("qwen3_vl_8b", "table1_qwen3_vl")])
def test_table1_grid_on_each_new_backbone(backbone, sweep, tmp_path, capsys):
    """`python scripts/sweep.py table1 backbone=<B> --dry-run` lists Table 1's 21 cells on B, the same
    cells as the shipped table1_<family> sweep."""
    from sharp.harness.sweep import main, plan

    over = plan("table1", str(tmp_path), extra=[f"backbone={backbone}"])
    own = plan(sweep, str(tmp_path))
    table1 = plan("table1", str(tmp_path))
    assert len(over) == len(own) == len(table1) == 21
    assert {r["cell"].backbone for r in over} == {r["cell"].backbone for r in own} == {backbone}
    assert [(r["cell"].method, r["cell"].retention) for r in over] == \
        [(r["cell"].method, r["cell"].retention) for r in own] == [(r["cell"].method, r["cell"].retention) for r in table1]
    assert main(["table1", f"backbone={backbone}", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"backbone={backbone}") == 21 and "backbone=llava_onevision_7b" not in out


@pytest.mark.parametrize("name", ["tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_fastv_keeps_topk_of_eager_attentions(name):
    """The engine's cheap last-token score (q/k norm of Qwen3-VL, (interleaved) M-RoPE) ranks as the
    model's own eager attention weights of layer 1 (DeepStack added after layer 0 included)."""
    from sharp.methods import budget

    bb = TM.backbone(name, "eager")
    inputs = bb.synthetic_inputs(frames=8, seed=3, batch_size=2)
    with torch.no_grad():
        att = bb.model(**inputs, output_attentions=True).attentions[1]  # (b, H, s, s) of layer 1
    scores = att[:, :, -1, :].mean(dim=1)  # last row, head mean
    vis = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))
    with sharp.prune(bb, "fastv", 0.25, layer=2) as trace, torch.no_grad():
        bb.model(**inputs)
    for i in range(2):
        s = scores[i, vis[i]]
        assert torch.equal(trace.kept[0][i], torch.topk(s, budget(len(s), 0.25)).indices.sort().values)
