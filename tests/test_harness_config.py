"""Config composition: groups, defaults, sweep files, the SLURM launcher config, cell naming."""
import csv
from pathlib import Path

import pytest
import yaml

from sharp.harness import cells as C
from sharp.harness.config import (CONFIG_DIR, REPO_ROOT, cell_from_cfg, cell_overrides, compose, list_sweeps,
                                  load_sweep, method_kwargs)
from sharp.harness.resources import HarnessError

PAPER = REPO_ROOT / "results" / "paper"


def test_default_config_is_the_offline_cell():
    cfg = compose()
    assert cfg.backbone.name == "toy_llava_onevision"  # trained toy: scores mean something
    assert cfg.method.name == "vanilla"
    assert cfg.retention == 1.0
    assert list(cfg.tasks.names) == ["sharp_synthetic"]  # the held-out test split
    include = cfg.tasks.include_path[0]
    assert Path(include).is_dir() and (Path(include) / "sharp_synthetic.yaml").is_file()
    cell = cell_from_cfg(cfg)
    assert cell.relpath() == Path("toy_llava_onevision/vanilla/r1")


def test_method_override_takes_method_defaults_and_retention():
    cfg = compose(["method=fastv"])
    assert cfg.retention == 0.25 and method_kwargs(cfg) == {"layer": 2}
    cfg = compose(["method=fastv", "retention=0.1", "+method_kwargs.layer=3", "results_dir=/tmp/x"])
    cell = cell_from_cfg(cfg)
    assert cell.retention == 0.1 and cell.method_kwargs == {"layer": 3}
    assert cell.dir(cfg.results_dir) == Path("/tmp/x/toy_llava_onevision/fastv/r0.1")


@pytest.mark.parametrize("group,names", [
    ("backbone", {"llava_onevision_7b", "qwen2_vl_7b", "tiny_llava_onevision", "tiny_qwen2_vl",
                  "toy_llava_onevision", "toy_qwen2_vl"}),
    ("tasks", {"paper", "synthetic", "synthetic_test"}),
    ("method", {"vanilla", "fastv", "sharp", "pdrop", "feather", "framefusion", "visionzip", "holitom",
                "sharpv", "visionzip_sharp", "holitom_sharp"}),
])
def test_groups_have_the_issue_options(group, names):
    have = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    assert names <= have


def test_paper_tasks_are_the_four_benchmarks():
    cfg = compose(["tasks=paper", "backbone=llava_onevision_7b"])
    assert list(cfg.tasks.names) == ["mvbench", "longvideobench_val_v", "mlvu_dev", "videomme"]
    assert cfg.backbone.hub_id == "llava-hf/llava-onevision-qwen2-7b-ov-hf"


def test_every_method_file_composes_and_registered_ones_validate():
    """Each method yaml: name == file, retention in (0, 1]; a registered method accepts its kwargs,
    an unregistered one fails with the engine's 'unknown pruning method' error."""
    from sharp.methods import make_method, method_names

    registered = set(method_names())
    for path in sorted((CONFIG_DIR / "method").glob("*.yaml")):
        cfg = compose([f"method={path.stem}"])
        assert cfg.method.name == path.stem
        assert 0 < cfg.retention <= 1
        if path.stem in registered:
            make_method(path.stem, cfg.retention, **method_kwargs(cfg))
        else:
            with pytest.raises(ValueError, match="unknown pruning method"):
                make_method(path.stem, cfg.retention, **method_kwargs(cfg))


def _paper_rows(name):
    with open(PAPER / name, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("table,csv_name,n", [(1, "table1_llava_ov.csv", 21), (2, "table2_qwen2_vl.csv", 11)])
def test_sweeps_use_the_papers_flops_matched_retentions(table, csv_name, n):
    sweep = load_sweep(f"table{table}")
    rows = _paper_rows(csv_name)
    assert len(sweep["cells"]) == n == len(rows)
    for cell, row in zip(sweep["cells"], rows):  # same order as the paper
        assert cell["method"] == row["method"]
        assert float(cell["retention"]) == pytest.approx(float(row["retention"]))
        if row["tflops"]:
            assert float(cell["group"]) == pytest.approx(float(row["tflops"]))


def test_all_table_sweeps_compose():
    assert {"table1", "table2", "table3", "table4", "table5", "smoke"} <= set(list_sweeps())
    for name in ("table1", "table2", "table3", "table4", "table5", "smoke"):
        sweep = load_sweep(name)
        dirs = set()
        for i in range(len(sweep["cells"])):
            cell = cell_from_cfg(compose(cell_overrides(sweep, i)))
            assert cell.backbone == sweep["backbone"]
            dirs.add(cell.relpath())
        assert len(dirs) == len(sweep["cells"]), f"{name}: two cells share a results folder"


def test_table5_variants_get_their_own_folders():
    sweep = load_sweep("table5")
    cell = cell_from_cfg(compose(cell_overrides(sweep, 2)))
    assert cell.relpath() == Path("llava_onevision_7b/sharp-posc+segm/r0.235")
    assert {k: cell.method_kwargs[k] for k in ("posc", "segm", "regd")} == {"posc": True, "segm": True, "regd": False}
    assert cell.method_kwargs["lam"] == 0.6  # the paper defaults of configs/method/sharp.yaml stay


def test_sweep_cell_resolution_inside_hydra(tmp_path):
    from hydra import compose as hcompose, initialize_config_dir

    from sharp.harness.config import resolve_sweep_cell

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hcompose("config", overrides=["sweep=table1", "cell=6", f"results_dir={tmp_path}"])
        assert cfg.sweep.name == "table1"
        resolved = resolve_sweep_cell(cfg)
    cell = cell_from_cfg(resolved)
    assert (cell.backbone, cell.method, cell.retention, cell.tasks[0]) == ("llava_onevision_7b", "fastv", 0.2, "mvbench")
    assert resolved.sweep_cell == {"sweep": "table1", "cell": 6}
    with pytest.raises(HarnessError, match="accepted values: 0..20"):
        cell_overrides(load_sweep("table1"), 21)
    with pytest.raises(HarnessError, match="unknown sweep"):
        load_sweep("table9")


def test_slurm_launcher_config():
    from hydra import compose as hcompose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hcompose("config", overrides=["hydra/launcher=slurm", "sweep=table1", "hydra.launcher.partition=gpu"],
                       return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.timeout_min > 0 and launcher.array_parallelism > 0
    raw = yaml.safe_load((CONFIG_DIR / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert {"partition", "gpus_per_node", "timeout_min", "array_parallelism"} <= set(raw)


def test_retention_folder_names():
    assert C.format_retention(0.25) == "0.25"
    assert C.format_retention(1.0) == "1"
    assert C.format_retention(0.2820) == "0.282"
    assert C.format_retention(0.015) == "0.015"
    assert C.method_dirname("sharp", "posc+segm") == "sharp-posc+segm"
