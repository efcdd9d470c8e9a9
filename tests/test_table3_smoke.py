"""Table 3 as a smoke: the four cells of configs/sweep/table3.yaml (VisionZip, VisionZip + ShaRP, HoliTom,
HoliTom + ShaRP) run end to end through the harness (run_cell -> lmms-eval -> summary.json) on the tiny
LLaVA-OV backbone, 2 docs of the synthetic task, and ``scripts/make_tables.py --table 3`` renders them
beside the paper's row.

The smoke sweep is the real one with only the smoke axes changed (backbone, tasks, limit) and the
7B layer kwargs scaled to the 4-layer tiny backbone (HoliTom's and ShaRP's stage before layer 18 of 28
-> 2 of 4); it is written to a temporary sweep folder (as tests/test_harness_tables.py's mini sweep),
so the same cells are run by ``sharp.harness.sweep.plan`` and read back by the table builder.
A cell whose method is not registered yet is skipped with the reason (its row is still rendered,
marked "not implemented").

Speed: lmms-eval's ``TaskManager`` re-indexes its ~3000 task YAML files for every cell (the bulk of a
cell); the index depends only on the include paths, so it is memoised here as in
tests/test_sweep_smoke.py (a copy of the same index; no task or model is stubbed).
"""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from sharp.harness import catalog
from sharp.harness import config as harness_config
from sharp.harness.catalog import NOT_IMPLEMENTED
from sharp.harness.config import REPO_ROOT, compose, load_sweep
from sharp.harness.runner import run_cell
from sharp.harness.sweep import plan
from sharp.methods import budget
import lmms_helpers

sys.path.insert(0, str(REPO_ROOT / "scripts"))

SMOKE = {"backbone": "tiny_llava_onevision", "tasks": "synthetic", "limit": 2}
# the 7B stage layers that do not fit 4 layers, per method of the sweep (and no PosC disk cache)
TINY_CELL_KWARGS = {"holitom": {"llm_layer": 2}, "holitom_sharp": {"sharp": {"layer": 2, "cache_dir": ""}},
                    "visionzip_sharp": {"sharp": {"cache_dir": ""}}}
METHODS = ["visionzip", "visionzip_sharp", "holitom", "holitom_sharp"]  # the paper's row order


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def memoised_task_index():
    """lmms-eval's task index built once per include path (see the module docstring)."""
    with lmms_helpers.memoised_task_index():
        yield


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, memoised_task_index):
    real = load_sweep("table3")
    assert [c["method"] for c in real["cells"]] == METHODS
    sweep = {**real, **SMOKE, "cells": [
        _merge(c, {"method_kwargs": TINY_CELL_KWARGS[c["method"]]}) if c["method"] in TINY_CELL_KWARGS else c
        for c in real["cells"]]}
    root = tmp_path_factory.mktemp("table3")
    (root / "sweeps").mkdir()
    (root / "sweeps" / "table3.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    results = root / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness_config, "SWEEP_DIR", root / "sweeps")
        rows = plan("table3", str(results))
        summaries = {}
        for row in rows:
            if row["status"] == "missing":
                summaries[row["index"]] = run_cell(compose(row["overrides"]))
        yield {"rows": rows, "summaries": summaries, "results": results, "paper": real}


@pytest.mark.parametrize("index", range(4), ids=METHODS)
def test_table3_cell_runs_end_to_end(smoke, index):
    row = smoke["rows"][index]
    method = row["cell"].method
    assert method == METHODS[index] and row["cell"].backbone == "tiny_llava_onevision"
    if row["status"] == NOT_IMPLEMENTED:
        pytest.skip(f"{method} is not registered yet ({catalog.planned_methods().get(method)}): its cell cannot run")
    s = smoke["summaries"][index]
    assert s["status"] == "finished" and s["requests"] == 2 and s["failed_requests"] == 0
    before, after = s["tokens"]["visual_before"], s["tokens"]["visual_after"]
    assert 0 < after < before
    assert s["tflops"]["prefill_mean"] > 0
    cell_dir = row["cell"].dir(smoke["results"])
    for line in cell_dir.joinpath("requests.jsonl").read_text().splitlines():
        req = json.loads(line)
        n, layers = req["visual_tokens_before"], req["visual_tokens_per_layer"]
        assert len(layers) == 4 and layers[0] < n  # pre-LLM methods: layer 0 already sees the reduced count
        if method == "holitom":  # round(0.15 n) before the LLM (fewer if static merging left fewer), then half
            # rounding=official (the table's): ceil per frame, so at most n; the in-LLM span on LLaVA-OV is the
            # visual tokens plus the trailing newline (the official count), one visual fewer if the newline stays
            assert layers[:2] == [layers[0]] * 2 and layers[0] <= n
            k = round(0.5 * (layers[0] + 1))
            assert layers[2:] in ([k] * 2, [k - 1] * 2)
        if method == "holitom_sharp":  # then ShaRP from layer 2: 7.5 % of the ORIGINAL count (at most all)
            assert layers[:2] == [layers[0]] * 2 and layers[0] <= budget(n, 0.15)
            assert layers[2:] == [min(budget(n, 0.075), layers[0])] * 2


def test_make_tables_renders_the_four_cells_beside_the_paper(smoke, tmp_path, capsys, monkeypatch):
    import make_tables

    monkeypatch.setattr(harness_config, "SWEEP_DIR", smoke["results"].parent / "sweeps")
    assert make_tables.main(["--table", "3", "--results-dir", str(smoke["results"]), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "table3.md").read_text()
    assert md.strip() in capsys.readouterr().out
    assert md.startswith("## Table 3: ShaRP inside VisionZip and HoliTom")
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == 4
    cells = [line.strip("| ").split(" | ") for line in body]
    # the paper's labels: method and the retention as the paper prints it (before / inside the LLM)
    assert [(c[0], c[1]) for c in cells] == [("visionzip", "0.128"), ("visionzip_sharp", "0.20/0.124"),
                                             ("holitom", "0.15/0.075"), ("holitom_sharp", "0.15/0.075")]
    assert all(c[2].endswith(" / 4.3") or " / 4.3 (" in c[2] for c in cells)  # the paper's TFLOPs beside ours
    for c, row in zip(cells, smoke["rows"]):
        assert c[-1] == ("finished" if row["status"] != NOT_IMPLEMENTED else NOT_IMPLEMENTED)
        if c[-1] == "finished":
            assert not c[2].startswith("—")  # our TFLOPs (of the tiny backbone) are filled in
    assert "/ 58.4" in cells[2][-2] and "/ 58.7" in cells[3][-2]  # the paper's average scores
