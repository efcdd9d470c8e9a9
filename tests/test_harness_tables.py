"""Table builder (fixture results -> the paper's layouts) and the sweep runner (dry run, skipping)."""
import csv
import io
import sys
from pathlib import Path

import pytest

from sharp.harness import catalog
from sharp.harness import tables as T
from sharp.harness.config import REPO_ROOT
from sharp.harness.io import atomic_write_json

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "results"
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "fixtures"))


def test_fixture_results_match_the_current_sweep(tmp_path):
    import make_results

    make_results.main(tmp_path)
    for path in tmp_path.rglob("*.json"):
        rel = path.relative_to(tmp_path)
        assert (FIXTURE / rel).read_text() == path.read_text(), \
            f"{rel} is stale: run `python tests/fixtures/make_results.py`"


def test_table1_from_fixture_results(tmp_path, capsys):
    import make_tables

    assert make_tables.main(["--table", "1", "--results-dir", str(FIXTURE), "--out", str(tmp_path), "--plot"]) == 0
    md = (tmp_path / "table1.md").read_text()
    assert md.strip() in capsys.readouterr().out
    # the paper's columns, ours beside the paper's numbers with the difference
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[2:12] == ["tflops", "mvbench", "longvideobench", "mlvu", "videomme", "videomme_short",
                                         "videomme_medium", "videomme_long", "avg_score", "avg_pct"]
    assert "| vanilla | 1 | 40.8 / 40.8 (+0.0) | 57.5 / 57.9 (-0.4) |" in md
    assert "| fastv | 0.25 | 11 / 11 (+0.0) | 55.0 / 55.3 (-0.3) |" in md
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| method", "| *"))]
    assert len(body) == 21  # missing cells are marked, not dropped
    planned = {m for m in ("pdrop", "feather", "framefusion") if not catalog.is_implemented(m)}
    n_planned = sum(4 - (m == "feather") for m in planned)  # feather 0.25 finished: its results count
    assert sum(line.endswith("| not implemented |") for line in body) == n_planned
    assert all(line.endswith(("| not implemented |", "| finished |")) for line in body
               if line.split(" | ")[0][2:] in planned)
    assert sum(line.endswith("| missing |") for line in body) == 4 + (11 - n_planned) - ("pdrop" not in planned)
    assert body[10].endswith("| partial |") and body[6].endswith("| differs: limit |")
    assert "| feather | 0.25 | 11 / 11 (+0.0) | 54.0 / 54.8 (-0.8) |" in md and body[3].endswith("| finished |")
    assert f"4/21 cells finished{f', {n_planned} not implemented' if n_planned else ''}" in md

    rows = list(csv.DictReader(io.StringIO((tmp_path / "table1.csv").read_text())))
    assert len(rows) == 21
    van = rows[0]
    assert (van["method"], van["status"], float(van["mvbench"]), float(van["mvbench_paper"])) == \
        ("vanilla", "finished", 57.5, 57.9)
    assert float(van["mvbench_diff"]) == pytest.approx(-0.4)
    assert float(van["avg_pct"]) == pytest.approx(100.0)
    fastv = rows[1]
    assert float(fastv["avg_pct"]) == pytest.approx(100 * (55.0 + 55.5 + 60.0 + 56.9) / (57.5 + 56.0 + 63.0 + 58.0))
    missing = rows[-1]
    assert missing["status"] == "missing" and missing["mvbench"] == "" and float(missing["mvbench_paper"]) == 55.9
    png = (tmp_path / "table1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("table,n", [(1, 21), (2, 11), (3, 4), (4, 3), (5, 6)])
def test_every_table_renders_without_results(tmp_path, table, n):
    sweep, rows = T.build(table, tmp_path)
    assert len(rows) == n
    for r in rows:  # a cell whose method is only planned is marked, not listed as runnable
        assert r.status == ("missing" if catalog.is_implemented(r.cell.method) else "not implemented"), r.cell
    assert all(r.paper is not None for r in rows), "every cell has its paper row"
    md = T.to_markdown(table, sweep, rows, tmp_path)
    assert md.count("| missing |") + md.count("| not implemented |") == n
    recs = list(csv.DictReader(io.StringIO(T.to_csv(table, rows))))
    assert len(recs) == n and all(k + "_paper" in recs[0] for k in T.LAYOUTS[table]["metrics"])


def test_table4_latency_columns(tmp_path):
    sweep, rows = T.build(4, tmp_path)
    for r, total, stages in ((rows[0], 1000.0, {}), (rows[1], 500.0, {"attn": 20.0, "dedup": 200.0, "fill": 50.0, "forward": 228.0})):
        atomic_write_json(r.cell.dir(tmp_path) / "summary.json", {
            "cell": r.cell.key(), "scores": {"mvbench": 50, "longvideobench": 50, "mlvu": 50, "videomme": 50},
            "tflops": {"prefill_mean": 40.8 if r is rows[0] else 9.31},
            "per_task": {"videomme": {"latency_ms": {"prefill_mean": total}, "stage_ms": {**stages, "select": 999.0}}}})
    sweep, rows = T.build(4, tmp_path)
    sharp_row = rows[1].ours
    assert sharp_row["attn_ms"] == 20.0 and sharp_row["dedup_ms"] == 200.0 and sharp_row["filter_ms"] is None
    assert sharp_row["llm_forward_ms"] == 228.0 and rows[0].ours["llm_forward_ms"] == 1000.0 and sharp_row["speedup"] == pytest.approx(2.0)
    assert sharp_row["tflops_pct"] == pytest.approx(100 * 9.31 / 40.8)


def test_bad_table_number(capsys):
    import make_tables

    assert make_tables.main(["--table", "7"]) == 2
    assert "accepted values: 1, 2, 3, 4, 5" in capsys.readouterr().err


def test_sweep_dry_run_lists_21_cells_of_table1(tmp_path, capsys):
    from sharp.harness.sweep import main

    assert main(["table1", "--dry-run", "--results-dir", str(FIXTURE)]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if not line.startswith("#")]
    assert len(lines) == 21
    assert lines[0].startswith("[ 0] finished  python run.py backbone=llava_onevision_7b method=vanilla retention=1 tasks=paper")
    assert lines[3].startswith("[ 3] finished  python run.py backbone=llava_onevision_7b method=feather")
    assert lines[6].startswith("[ 6] mismatch  python run.py backbone=llava_onevision_7b method=fastv retention=0.2")
    assert lines[10].startswith("[10] partial   python run.py backbone=llava_onevision_7b method=sharp retention=0.235")
    assert lines[20].startswith("[20] todo      python run.py backbone=llava_onevision_7b method=sharp retention=0.14")
    planned = [i for i, line in enumerate(lines) if " not implemented " in line]
    if not catalog.is_implemented("pdrop"):
        assert lines[2] == ("[ 2] not implemented  llava_onevision_7b/pdrop/r0.285  # planned: "
                            + catalog.planned_methods()["pdrop"])
    assert all("run.py" not in lines[i] for i in planned)  # never listed as runnable
    assert out[-1] == f"# table1: 21 cells, 4 finished, {17 - len(planned)} to run" + (
        f", {len(planned)} not implemented (method planned, skipped)" if planned else "")


def test_sweep_slurm_submits_only_implemented_unfinished_cells(capsys):
    from sharp.harness.sweep import main

    assert main(["table1", "--slurm", "--dry-run", "--results-dir", str(FIXTURE), "hydra.launcher.partition=gpu"]) == 0
    cmd = capsys.readouterr().out.strip().splitlines()[-1]
    if not any(catalog.is_implemented(m) for m in ("pdrop", "feather", "framefusion")):
        assert "run.py --multirun hydra/launcher=slurm sweep=table1 cell=6,10,11,15,16,20 " in cmd
    assert "cell=0," not in cmd and ",5," not in cmd and cmd.endswith("hydra.launcher.partition=gpu")


@pytest.fixture
def mini_sweep(tmp_path, monkeypatch):
    """configs/sweep/mini.yaml in a temporary sweep folder: a finished, a planned and a composed cell."""
    from sharp.harness import config

    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "mini.yaml").write_text(
        "name: mini\nbackbone: tiny_llava_onevision\ntasks: synthetic\nlimit: 2\ncells:\n"
        "  - {method: vanilla, retention: 1.0}\n"
        "  - {method: pdrop, retention: 0.285}\n"
        "  - {method: fastv+sharp, retention: 0.25, method_kwargs: {sharp: {retention: 0.1}}}\n")
    monkeypatch.setattr(config, "SWEEP_DIR", sweeps)
    if catalog.is_implemented("pdrop"):
        pytest.skip("pdrop is registered: no planned method left in the mini sweep")
    return tmp_path / "results"


def test_local_sweep_skips_not_implemented_cells_with_a_count(mini_sweep, capsys):
    from sharp.harness.sweep import main, plan

    rows = plan("mini", str(mini_sweep))
    assert [r["status"] for r in rows] == ["missing", "not implemented", "missing"]
    assert rows[2]["cell"].relpath() == Path("tiny_llava_onevision/fastv+sharp/r0.25")
    assert rows[2]["cell"].method_kwargs == {"sharp": {"retention": 0.1}}
    for r in (rows[0], rows[2]):
        atomic_write_json(r["cell"].dir(mini_sweep) / "summary.json", {"cell": r["cell"].key()})
    assert main(["mini", "--results-dir", str(mini_sweep)]) == 0
    out = capsys.readouterr().out
    assert out.count("skip (finished)") == 2 and " run " not in out
    assert "[ 1] skip (not implemented) tiny_llava_onevision/pdrop/r0.285  # planned: baselines/pdrop.py" in out
    assert out.strip().splitlines()[-1] == ("# mini: 3 cells: 0 ran, 0 failed, 2 skipped (finished), "
                                            "1 skipped (not implemented)")
    assert main(["mini", "--slurm", "--results-dir", str(mini_sweep)]) == 0
    assert "nothing to submit (3 cells, 2 finished, 0 to run, 1 not implemented" in capsys.readouterr().out


def test_local_sweep_skips_finished_cells(tmp_path, capsys):
    from sharp.harness.sweep import main, plan

    for row in plan("smoke", str(tmp_path)):
        atomic_write_json(row["cell"].dir(tmp_path) / "summary.json", {"cell": row["cell"].key()})
    assert main(["smoke", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skip (finished)") == 2 and " run " not in out
