"""scripts/bench_prefill.py: several methods in one table on the tiny LLaVA-OV backbone (1 repeat, no
warm-up, 8 frames), FLOPs ratios against sharp.flops.prefill_tflops computed here, the depth defaults,
per-method kwargs, the files it writes, the single-method options and the one-line errors."""
from __future__ import annotations

import csv
import json
import sys

import pytest

import sharp
from sharp.flops import prefill_tflops
from sharp.harness.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_prefill  # noqa: E402

BACKBONE = "tiny_llava_onevision"
FRAMES = 8
FAST = ["--backbone", BACKBONE, "--frames", str(FRAMES), "--repeats", "1", "--warmup", "0"]
METHODS = ["fastv", "pdrop", "feather", "sharp"] + (["framefusion"] if "framefusion" in sharp.method_names() else [])
# resolved for 4 layers (sharp.resolve_method): PyramidDrop's 7B stages (4, 16, 24) -> (1, 2, 3), compact
# positions on 1-D RoPE; the other methods' layers are kept
EXPECTED_CHANGES = {"pdrop": ["layers [4, 16, 24] -> [1, 2, 3] (relative, depth 28 -> 4)"],
                    "feather": ["layers [8, 16] -> [1, 2] (relative, depth 28 -> 4)"]}  # schedule="official"'s


@pytest.fixture(scope="module")
def backbone():
    return sharp.load_backbone(BACKBONE)


@pytest.fixture(scope="module")
def n_visual(backbone):
    return backbone.layout(backbone.synthetic_inputs(frames=FRAMES, seed=0)).n_visual


def _ratio(bb, n, method, retention, **kwargs):
    return prefill_tflops(bb, "vanilla", 1.0, visual_tokens=n) / prefill_tflops(bb, method, retention,
                                                                               visual_tokens=n, **kwargs)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    res = bench_prefill.main([*FAST, "--methods", *METHODS, "--retention", "0.25", "--json", str(out)])
    return res, out


def test_every_method_in_one_table_with_its_flops_ratio(table, backbone, n_visual):
    res, _ = table
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == METHODS
    assert res["info"]["n_visual"] == n_visual and res["info"]["repeats"] == 1
    for m in METHODS:
        r = rows[m]
        assert r["kwargs"] == {}, m
        assert r["settings"] == EXPECTED_CHANGES.get(m, []), m
        assert r["flops_ratio"] == pytest.approx(_ratio(backbone, n_visual, m, 0.25), rel=1e-9), m
        assert r["flops_ratio"] > 1
        assert r["llm_ms"] > 0 and r["total_ms"] >= r["llm_ms"] and r["selection_ms"] > 0
        assert r["speedup_llm"] == pytest.approx(res["vanilla"]["llm_ms"] / r["llm_ms"])
        assert r["selection_pct_of_llm"] == pytest.approx(100 * r["selection_ms"] / r["llm_ms"])
        assert len(r["visual_tokens_per_layer"]) == backbone.num_layers
        assert r["kept_last_layer"] == r["visual_tokens_per_layer"][-1] < n_visual
    # pdrop's stages 1, 2, 3 keep R, R^2, R^3 of the original: the trace shows the depth default took
    assert rows["pdrop"]["visual_tokens_per_layer"] == [n_visual] + [sharp.methods.budget(n_visual, 0.25 ** i)
                                                                      for i in (1, 2, 3)]


def test_table_is_printed_and_written_as_markdown_csv_json(table):
    res, out = table
    md = out.with_suffix(".md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    for col in ("speedup (LLM)", "FLOPs ratio", "selection ms", "selection %"):
        assert col in header
    for m in ["vanilla", *METHODS]:
        assert any(line.startswith(f"| {m} |") for line in md.splitlines()), m
    with open(out.with_suffix(".csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["method"] for r in csv_rows] == ["vanilla", *METHODS]
    for r, row in zip(csv_rows[1:], res["rows"]):
        assert float(r["flops_ratio"]) == pytest.approx(row["flops_ratio"], rel=1e-5)
        assert float(r["selection_ms"]) == pytest.approx(row["selection_ms"], rel=1e-5)
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == METHODS and data["vanilla"]["llm_ms"] > 0


def test_per_method_kwargs_and_retention(tmp_path, backbone, n_visual):
    res = bench_prefill.main([*FAST, "--methods", "fastv", "pdrop", "--method-kwargs", '{"fastv": {"layer": 3}}',
                              "--kwargs", "pdrop.layers=[2,3]", "pdrop.retention=0.5", "--json", str(tmp_path / "b.json")])
    fastv, pdrop = res["rows"]
    assert fastv["kwargs"] == {"layer": 3} and fastv["retention"] == 0.25
    assert fastv["visual_tokens_per_layer"] == [n_visual] * 3 + [sharp.methods.budget(n_visual, 0.25)]
    assert pdrop["kwargs"] == {"layers": [2, 3]} and pdrop["retention"] == 0.5
    assert pdrop["flops_ratio"] == pytest.approx(_ratio(backbone, n_visual, "pdrop", 0.5, layers=[2, 3]), rel=1e-9)
    assert pdrop["visual_tokens_per_layer"] == [n_visual] * 2 + [sharp.methods.budget(n_visual, 0.5),
                                                                  sharp.methods.budget(n_visual, 0.25)]


def test_single_method_options_still_work(tmp_path, backbone, n_visual, capsys):
    out = tmp_path / "one.json"
    res = bench_prefill.main([*FAST, "--method", "fastv", "--retention", "0.5", "--method-kwargs", '{"layer": 1}',
                              "--json", str(out)])
    text = capsys.readouterr().out
    assert "selection overhead" in text and "speedup (LLM prefill)" in text  # the single-method breakdown
    (row,) = res["rows"]
    assert row["method"] == "fastv" and row["kwargs"] == {"layer": 1}
    assert row["flops_ratio"] == pytest.approx(_ratio(backbone, n_visual, "fastv", 0.5, layer=1), rel=1e-9)
    assert out.is_file() and out.with_suffix(".csv").is_file() and out.with_suffix(".md").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "fastv", "nosuch"], "unknown method(s) 'nosuch'; registered methods: "),
    (["--methods", "fastv", "--kwargs", "pdrop.layers=[1]"], "method 'pdrop' is not benchmarked"),
    (["--methods", "pdrop", "--kwargs", "pdrop.layers=[4,16,24]"], "every stage layer must be in 1..3"),
    (["--methods", "fastv", "--method-kwargs", '{"layer": 3}'], "keyed by the listed methods"),
    (["--method", "fastv", "--method-kwargs", "{layer: 3}"], "is not JSON"),
])
def test_bad_arguments_are_one_error_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_prefill.main(["--backbone", BACKBONE, "--frames", "2", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    if "registered methods" in needle:
        registered = [m for m in sharp.method_names() if not m.startswith("_")]
        assert err[0].split("registered methods: ")[1].startswith(", ".join(registered))


def test_speed_per_flops_sequence_flops_and_peak_memory(table, backbone, n_visual):
    """The efficiency columns follow their definitions; every row and vanilla carry a peak memory."""
    from sharp.flops import lm_dims, schedule_tflops

    res, out = table
    van = res["vanilla"]
    seq = res["info"]["sequence"]
    assert van["tflops_sequence"] == pytest.approx(schedule_tflops([seq] * backbone.num_layers, lm_dims(backbone),
                                                                   "exact"))
    assert res["info"]["clock"] == "wall"  # the test runs with the default threads (auto -> cpu only at 1)
    for r in res["rows"]:
        text = seq - n_visual
        exact = schedule_tflops([v + text for v in r["visual_tokens_per_layer"]], lm_dims(backbone), "exact")
        assert r["flops_ratio_sequence"] == pytest.approx(van["tflops_sequence"] / exact)
        assert r["speed_per_flops"] == pytest.approx(r["speedup_llm"] / r["flops_ratio"])
        assert r["speed_per_flops_sequence"] == pytest.approx(r["speedup_llm"] / r["flops_ratio_sequence"])
        assert r["peak_mib"] is not None and r["peak_mib"] > 0, r["method"]  # Linux: /proc/self/clear_refs
    assert van["peak_mib"] > 0
    assert "peak MiB" in out.with_suffix(".md").read_text()


def test_clock_choice():
    assert bench_prefill.set_clock("auto", "cpu", 1) == "cpu"
    assert bench_prefill.set_clock("auto", "cpu", 2) == "wall"
    with pytest.raises(bench_prefill.BenchError):
        bench_prefill.set_clock("cpu", "cuda", 1)
    bench_prefill.set_clock("wall", "cpu", 1)


@pytest.mark.parametrize("method", ["sharp", "holitom", "sharpv"])
def test_every_stage_timer_reads_the_trace_clock(backbone, method):
    """The engine's and the methods' stage timers (select, mask, PosC probe, SegM / scoring, RegD's
    phases, HoliTom's, SharpV's memory stage) all read ``Trace.clock``: under a frozen clock every
    recorded time is 0, under the default clock some are not (so the first assertion can fail)."""
    import torch

    inputs = backbone.synthetic_inputs(frames=FRAMES, seed=0)
    with sharp.prune(backbone, method, 0.5) as trace, torch.no_grad():
        backbone.model(**inputs, use_cache=True)
        real = dict(trace.stage_times)
        trace.clock = lambda: 42.0
        backbone.model(**inputs, use_cache=True)
        frozen = dict(trace.stage_times)
    assert any(v > 0 for v in real.values()), real
    assert frozen.keys() >= {"select"} and set(frozen.values()) == {0.0}, frozen
