"""The figures (sharp.figures, scripts/show_selection.py, show_attention.py, report.py, make_tables --plot).

* Fig. 5: every registered method (and a '+'-composition) on the tiny and toy backbones, one
  retention: the drawn kept-token outlines of each row equal the visual tokens the method leaves to
  the last decoder layer, measured by an independent ``sharp.prune`` forward; the scripts write a
  non-empty PNG and exit 0.
* Fig. 2: the recorder's attention equals eager attention maps (``output_attentions``) of the video
  and of the all-black video; the calibrated score is Eq. 5 and its top-k is what ShaRP with PosC
  alone keeps.
* Report and table figures on the fixture results.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sharp
from sharp.figures import attention, curves, selection, video

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from default_methods import COMPOSITIONS, TINY_KWARGS  # noqa: E402
from conftest import shared_backbone

FIXTURES = REPO / "tests" / "fixtures" / "results"
RETENTION = 0.25
DOC = "synth-test-s0-00004"  # a long video: one 4-frame event (frames 6-7 of 32 sampled)
TINY = ("tiny_llava_onevision", "tiny_qwen2_vl")
TOYS = ("toy_llava_onevision", "toy_qwen2_vl")


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_method() -> list[str]:
    return [m for m in sharp.method_names() if not m.startswith("_")] + ["fastv+sharp"]


def kwargs_of(backbone: str) -> dict:
    """The tests' kwargs on top of each method's resolved defaults (``sharp.prune`` resolves them for the
    backbone), PosC cache off."""
    out = {m: dict(TINY_KWARGS.get(m, {})) for m in every_method()}
    out["fastv+sharp"] = COMPOSITIONS["fastv+sharp"]
    out["sharp"] = {**out["sharp"], "cache_dir": ""}
    return out




def backbone(name: str):
    return shared_backbone(name)


def small_video(bb, frames: int = 8) -> video.FigureVideo:
    """Random frames through the backbone's own preprocessing (8 frames: Qwen2-VL 4 temporal patches)."""
    h, w = bb.synthetic_frame_size()
    pixels = np.random.default_rng(0).integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
    return video.from_inputs(bb, bb.pixels_to_inputs(pixels, "What happens?"), pixels, question="What happens?")


def last_layer_tokens(bb, inputs: dict, method: str, kwargs: dict) -> int:
    """Visual tokens the last decoder layer processes (independent forward, no generation)."""
    with torch.no_grad(), sharp.prune(bb, method, RETENTION, **kwargs) as trace:
        bb.model(**inputs)
    return trace.visual_tokens_per_layer[-1]


# -- Fig. 5 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY + TOYS)
def test_selection_counts_every_method(name, tmp_path):
    bb = backbone(name)
    vid = small_video(bb) if name in TINY else video.load_video(bb, doc_id=DOC)
    kwargs = kwargs_of(name)
    rows = selection.run_selections(bb, vid, every_method(), RETENTION, kwargs)
    assert [r.error for r in rows] == [""] * len(rows)
    out = tmp_path / "selection.png"
    counts = selection.draw_selections(vid, rows, out, dpi=60)
    assert out.stat().st_size > 5_000
    for row in rows:
        expected = last_layer_tokens(bb, vid.inputs, row.method, kwargs[row.method])
        assert counts[row.label] == row.kept_count == expected, row.label
        assert row.kept.unique().numel() == row.kept_count and int(row.kept.max()) < vid.layout.n_visual


def test_selection_pre_llm_and_in_llm_stages():
    """VisionZip acts before the LLM (stage 0), FastV before layer 2; ShaRP's segments tile its frames."""
    bb = backbone("tiny_llava_onevision")
    vid = small_video(bb)
    kw = kwargs_of(bb.name)
    rows = {r.label: r for r in selection.run_selections(bb, vid, ["visionzip", "fastv", "sharp"], RETENTION, kw)}
    assert rows["visionzip"].stage_layers == [0] and rows["fastv"].stage_layers == [2]
    segments = rows["sharp"].segments
    assert segments[0][0] == 0 and segments[-1][1] == vid.layout.frames - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(segments, segments[1:]))
    assert rows["fastv"].segments is None


def test_synthetic_doc_event_frames():
    """The event band marks the visual frames whose sampled video frames show the asked event."""
    from sharp.synthetic.benchmark import sampled_frame_indices

    bb = backbone("toy_llava_onevision")
    vid = video.load_video(bb, doc_id=DOC)
    doc = vid.doc
    sampled = sampled_frame_indices(doc["num_frames"], vid.layout.frames)  # LLaVA-OV: uniform 32 frames
    expected = [f for f, i in enumerate(sampled) if i in doc["event_frames"]]
    assert vid.event_frames == expected and len(expected) >= 2
    assert vid.display.shape[0] == vid.layout.frames and vid.frames_per_visual == 1
    qwen = video.load_video(backbone("toy_qwen2_vl"), doc_id=DOC)
    assert qwen.frames_per_visual == 2 and qwen.display.shape[0] == qwen.layout.frames


def test_show_selection_script(tmp_path, capsys):
    """The CLI on a synthetic doc: FastV, ShaRP and ShaRP's Table 5 variants (--ablation), exit 0."""
    out = tmp_path / "fig5.png"
    kw = kwargs_of("toy_qwen2_vl")
    rc = script("show_selection").main(["--backbone", "toy_qwen2_vl", "--doc", DOC, "--retention", str(RETENTION),
                                        "--methods", "fastv", "sharp", "--ablation", "--kwargs", json.dumps(kw),
                                        "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "sharp: posc+segm" in printed and "ERROR" not in printed


def test_show_selection_bad_input(tmp_path):
    main = script("show_selection").main
    with pytest.raises(SystemExit) as err:
        main(["--doc", DOC, "--methods", "nope", "--out", str(tmp_path / "x.png")])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["--doc", DOC, "--retention", "1.5", "--out", str(tmp_path / "x.png")])
    assert err.value.code == 2
    with pytest.raises(ValueError, match="synth-<train|test>"):
        video.find_doc("synth-val-00001")


def test_failing_method_is_an_error_row(tmp_path):
    """A kwarg that does not fit the model becomes an error row (nothing highlighted), not a crash."""
    bb = backbone("tiny_llava_onevision")
    vid = small_video(bb)
    row = selection.run_selection(bb, vid, "fastv", RETENTION, layer=99)
    assert row.error.startswith("ValueError") and row.kept_count == 0
    counts = selection.draw_selections(vid, [row], tmp_path / "err.png")
    assert counts == {"fastv": 0}


# -- Fig. 2 -----------------------------------------------------------------------------------------


def eager_last_token_attention(bb, inputs: dict, layers) -> dict:
    """{layer: (n_visual,)} head-mean attention of the last token from the model's own eager maps."""
    with torch.no_grad():
        out = bb.model(**inputs, output_attentions=True, use_cache=False)
    visual = bb.visual_mask(inputs["input_ids"], bb.layout(inputs))[0]
    return {k: out.attentions[k][0, :, -1, visual].float().mean(dim=0) for k in layers}


@pytest.mark.parametrize("name", TINY)
def test_attention_matches_eager_maps(name):
    bb = sharp.load_backbone(name, device="cpu", attn_implementation="eager")
    inputs = bb.synthetic_inputs(frames=4, seed=1)
    layers = (1, 3)
    lam = 0.6
    got = attention.measure_attention(bb, inputs, layers, lam=lam)
    real = eager_last_token_attention(bb, inputs, layers)
    black = eager_last_token_attention(bb, bb.black_inputs(inputs), layers)
    for k in layers:
        torch.testing.assert_close(got[k]["real"], real[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[k]["black"], black[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[k]["calibrated"], real[k] - lam * black[k], atol=1e-5, rtol=1e-4)


def test_calibrated_top_k_is_posc_selection():
    """Top-k of Fig. 2's calibrated shallow-layer score = ShaRP with PosC alone (no SegM, no RegD)."""
    bb = backbone("toy_llava_onevision")
    vid = video.load_video(bb, doc_id=DOC)
    maps = attention.measure_attention(bb, vid.inputs, (1, 3))
    k = sharp.methods.budget(vid.layout.n_visual, RETENTION)
    top = torch.topk(maps[1]["calibrated"], k).indices.sort().values
    with torch.no_grad(), sharp.prune(bb, "sharp", RETENTION, posc=True, segm=False, regd=False, cache_dir="") as trace:
        bb.model(**vid.inputs)
    assert torch.equal(top, trace.kept[-1][0].sort().values)
    stats = attention.top_share(maps[1]["calibrated"].numpy(), vid, RETENTION)
    assert stats["k"] == k and stats["event_total"] == 4 * len(vid.event_frames)


def test_show_attention_script(tmp_path, capsys):
    out = tmp_path / "fig2.png"
    rc = script("show_attention").main(["--backbone", "toy_llava_onevision", "--doc", DOC, "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 10_000
    assert "calibrated" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        script("show_attention").main(["--backbone", "toy_llava_onevision", "--doc", DOC, "--layers", "3", "1"])
    assert err.value.code == 2


def test_recorder_refuses_layers_outside_the_model():
    bb = backbone("tiny_qwen2_vl")
    with pytest.raises(ValueError, match="outside the model"):
        attention.measure_attention(bb, bb.synthetic_inputs(frames=2), (1, 9))


# -- tables, curves, report -------------------------------------------------------------------------


def test_retention_curve_figure(tmp_path):
    rows = [{"method": "vanilla", "retention": 1.0, "accuracy": 95.0, "tflops": 8e-5, "error": ""}]
    for m, acc in (("fastv", 70.0), ("sharp", 85.0)):
        rows += [{"method": m, "retention": r, "accuracy": acc + 10 * r, "tflops": 8e-5 * (0.3 + r), "error": ""}
                 for r in (0.1, 0.5)]
    rows.append({"method": "pdrop", "retention": 0.1, "error": "ValueError: x"})
    info = {"backbone": "toy_x", "split": "test", "n": 3, "n_visual": 128}
    folder = tmp_path / "retention_curve" / "toy_x"
    folder.mkdir(parents=True)
    (folder / "retention_curve.json").write_text(json.dumps({"rows": rows, "info": info}))
    written = curves.plot_retention_curves(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["retention_curve_toy_x.png"] and written[0].stat().st_size > 5_000


def test_report_on_fixture_results(tmp_path):
    """Tables 1-5 (Markdown + figure each: plot_table, what make_tables --plot draws) from the fixtures."""
    out = tmp_path / "report" / "report.md"
    rc = script("report").main(["--results-dir", str(FIXTURES), "--out", str(out), "--figures", str(tmp_path)])
    assert rc == 0
    text = out.read_text()
    for n in range(1, 6):
        assert f"### Table {n}:" in text and f"![Table {n}" in text
        assert (out.parent / "figures" / f"table{n}.png").stat().st_size > 5_000
    assert "| fastv | 0.25 |" in text and "finished" in text  # the fixture's finished fastv cell
    assert "No `retention_curve/" in text
    assert script("report").main(["--results-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
