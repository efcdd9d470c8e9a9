"""The cells of configs/sweep/table1.yaml, table2.yaml and field.yaml end to end on a tiny backbone (``--limit 2``).

Each cell is planned by the sweep runner (``sharp.harness.sweep.plan``, the same overrides
``scripts/sweep.py`` passes to run.py) with three substitutions that make it run offline on CPU:

* the backbone: table1 (LLaVA-OneVision-7B) -> ``tiny_llava_onevision``, table2 (Qwen2-VL-7B) ->
  ``tiny_qwen2_vl`` (same families, so the same lmms-eval wrappers and preprocessing);
* the tasks: ``synthetic`` (the embedded synthetic benchmark) instead of the paper's benchmarks;
* the 7B layer kwargs that do not fit 4 layers (``TINY_LAYER_KWARGS``: only PyramidDrop's stages
  (4, 16, 24) -> (1, 2, 3), as tests/default_methods.py and scripts/retention_curve.py; FastV,
  FEATHER, ShaRP and FrameFusion defaults fit), added as ``++method_kwargs.<k>=<v>`` where the cell
  sets no value of its own. The cells' own kwargs (table2's ``positions: original``) and retentions
  are kept as they are.

Then the cell runs in this process through ``sharp.harness.runner.run_cell`` (what run.py calls):
lmms-eval's ``simple_evaluate`` with our model wrapper, results written and read back.

Which cells: a cell costs about 2 s here, after ~30 s paid once (lmms-eval's import and task index),
so by default one representative cell per (table, method) runs (12 of 32), the method's LOWEST retention of the
table (the smallest budgets: PyramidDrop 1.5% keeps R^3 = 0.0003% of the tokens, clamped to one);
the other cells of a method differ from it only by the retention. ``SHARP_SMOKE_ALL=1`` runs all
32 cells (about 40 s more). Cells whose method is not registered yet are skipped ("not registered")
and run by themselves once it is.

Speed: lmms-eval's ``TaskManager`` re-indexes its ~3000 task YAML files for every cell (~8 s), and
its model cleanup calls ``gc.collect()`` twice per cell (seconds on a large heap). The index only
depends on the include paths, so this module memoises ``TaskManager.initialize_tasks`` (the same,
read-only index) and freezes the heap after building it (``gc.freeze``, undone at the end); no task,
model or harness function is stubbed.
"""
from __future__ import annotations

import functools
import gc
import itertools
import json
import os

import pytest

import sharp
from sharp.harness import cells as C
from sharp.harness.config import compose, load_sweep
from sharp.harness.sweep import plan
from sharp.lmms.args import flatten_kwargs
from sharp.methods import budget
import lmms_helpers

TINY = {"table1": "tiny_llava_onevision", "table2": "tiny_qwen2_vl", "field": "tiny_llava_onevision"}
LIMIT = 2
# per method of the two sweeps: the 7B layer kwargs that do not fit the 4-layer tiny backbones
TINY_LAYER_KWARGS = {"pdrop": {"layers": [1, 2, 3]}}
SINGLE_STAGE = ("fastv", "feather", "sharp")


def representative(cells: list[dict]) -> set[int]:
    """Index of each method's lowest-retention cell (the first of equals)."""
    best: dict[str, int] = {}
    for i, raw in enumerate(cells):
        j = best.get(raw["method"])
        if j is None or float(raw["retention"]) < float(cells[j]["retention"]):
            best[raw["method"]] = i
    return set(best.values())


def _cases():
    run_all = os.environ.get("SHARP_SMOKE_ALL", "") not in ("", "0")
    seen = set()  # a cell an earlier sweep already ran on the same tiny backbone (the field sweep's vanilla)
    for sweep in TINY:
        cells = load_sweep(sweep)["cells"]
        chosen = set(range(len(cells))) if run_all else representative(cells)
        for i, raw in enumerate(cells):
            key = (TINY[sweep], raw["method"], float(raw["retention"]), json.dumps(raw.get("method_kwargs"), sort_keys=True))
            if i in chosen and key not in seen:
                seen.add(key)
                yield pytest.param(sweep, i, id=f"{sweep}-{i}-{raw['method']}-r{raw['retention']:g}")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep_smoke")


@pytest.fixture(scope="module", autouse=True)
def memoised_task_index():
    """lmms-eval's task index built once per include path (see the module docstring); the heap is
    frozen after each build so lmms-eval's per-cell gc.collect() calls stay cheap."""

    def freeze():
        gc.collect()
        gc.freeze()

    try:
        with lmms_helpers.memoised_task_index(copy_index=dict, after_build=freeze, memo={}):  # TaskManager only reads it
            yield
    finally:
        gc.unfreeze()


@functools.cache
def _num_layers(backbone: str) -> int:
    return sharp.load_backbone(backbone).num_layers


def _value(value) -> str:
    """A Hydra override value (lists as [a,b])."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return json.dumps(value)


def tiny_overrides(sweep: str, raw: dict) -> list[str]:
    """Backbone, tasks and the 4-layer kwargs the cell does not set itself."""
    own = dict(flatten_kwargs(raw.get("method_kwargs") or {}))
    extra = [f"backbone={TINY[sweep]}", "tasks=synthetic"]
    for key, value in TINY_LAYER_KWARGS.get(raw["method"], {}).items():
        if key not in own:
            extra.append(f"++method_kwargs.{key}={_value(value)}")
    return extra


@pytest.mark.parametrize("sweep,index", list(_cases()))
def test_sweep_cell_runs_end_to_end_on_the_tiny_backbone(sweep, index, results_dir):
    from sharp.harness.runner import run_cell

    raw = load_sweep(sweep)["cells"][index]
    method = raw["method"]
    if method not in sharp.method_names():
        pytest.skip(f"{method}: not registered")
    rows = plan(sweep, str(results_dir), limit=LIMIT, only=[index], extra=tiny_overrides(sweep, raw))
    assert len(rows) == 1 and rows[0]["status"] == "missing", rows
    cell = rows[0]["cell"]
    # the substitutions took, and nothing else of the cell changed
    assert cell.backbone == TINY[sweep] and cell.method == method and cell.limit == LIMIT
    assert cell.retention == pytest.approx(float(raw["retention"]))
    for key, value in flatten_kwargs(raw.get("method_kwargs") or {}):
        assert cell.method_kwargs[key] == value, key
    for key, value in TINY_LAYER_KWARGS.get(method, {}).items():
        assert cell.method_kwargs[key] == value, key

    summary = run_cell(compose(rows[0]["overrides"]))

    assert summary["status"] == "finished"
    assert summary["cell"] == cell.key()
    assert C.status(cell, results_dir)[0] == "finished"
    assert summary["requests"] == LIMIT and summary["failed_requests"] == 0
    assert "sharp_synthetic_default" in summary["scores"]
    requests = [json.loads(line) for line in (cell.dir(results_dir) / C.REQUESTS).read_text().splitlines()]
    assert len(requests) == LIMIT
    num_layers = _num_layers(TINY[sweep])
    for r in requests:
        per_layer, before = r["visual_tokens_per_layer"], r["visual_tokens_before"]
        assert len(per_layer) == num_layers and before > 0
        assert all(a >= b for a, b in itertools.pairwise(per_layer)), per_layer  # tokens only go away
        assert per_layer[-1] == r["visual_tokens_after"]
        if method == "vanilla":
            assert per_layer == [before] * num_layers
        else:
            assert 0 < r["visual_tokens_after"] < before, (method, per_layer)
        retention = float(raw["retention"])
        if method in SINGLE_STAGE:  # one stage keeping exactly round(R x N) of the original tokens
            assert r["visual_tokens_after"] == max(1, budget(before, retention)), (method, per_layer)
        if method == "pdrop":  # stages before layers 1, 2, 3 keep R, R^2, R^3 of the original (at least one)
            assert per_layer == [before] + [max(1, budget(before, retention ** i)) for i in (1, 2, 3)]
        assert r["prefill_tflops"] > 0 and r["prefill_tflops_measured"] > 0
