"""Config composition: groups, defaults, sweep files, the SLURM launcher config, cell naming."""
import csv
from pathlib import Path

import pytest
import yaml

import sharp
from sharp.harness import catalog
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
    # only what the user set: the config's kwargs repeat the method's (7B) defaults, resolved per backbone
    assert cfg.retention == 0.25 and method_kwargs(cfg) == {}
    assert method_kwargs(compose(["method=fastv", "method.kwargs.layer=3"])) == {"layer": 3}
    cfg = compose(["method=fastv", "retention=0.1", "+method_kwargs.layer=3", "results_dir=/tmp/x"])
    cell = cell_from_cfg(cfg)
    assert cell.retention == 0.1 and cell.method_kwargs == {"layer": 3}
    assert cell.dir(cfg.results_dir) == Path("/tmp/x/toy_llava_onevision/fastv/r0.1")


@pytest.mark.parametrize("group,names", [
    ("backbone", {"llava_onevision_7b", "qwen2_vl_7b", "tiny_llava_onevision", "tiny_qwen2_vl",
                  "toy_llava_onevision", "toy_qwen2_vl"}),
    ("tasks", {"paper", "synthetic", "synthetic_test"}),
    ("method", {"vanilla", "fastv", "sharp", "pdrop", "feather", "framefusion", "visionzip", "holitom",
                "sharpv", "visionzip_sharp", "holitom_sharp", "compose"}),
])
def test_groups_have_the_issue_options(group, names):
    have = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    assert names <= have


def field_defaults(cls: type) -> dict:
    """{field: default} of a method class read off its dataclass fields (no instance), lists for tuples:
    what the generated ``method.kwargs`` must equal."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.init and not f.name.startswith("_") and f.name != "retention":
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def test_every_registered_method_has_a_config():
    """The registry is the source of truth: `python run.py method=<name>` works for every registered
    method, with a yaml or without one (a generated config: the dataclass's kwargs and retention)."""
    from dataclasses import dataclass

    @sharp.register_method
    @dataclass
    class _YamlLess(sharp.PruningMethod):
        name = "_yamlless"
        retention: float = 0.4
        layer: int = sharp.layer_kwarg(2, scaling="fixed")

    for name in catalog.registered_methods() + ["_yamlless"]:
        cfg = compose([f"method={name}"])
        assert cfg.method.name == name and 0 < cfg.retention <= 1, name
    cfg = compose(["method=_yamlless", "method.kwargs.layer=2"])
    assert cfg.retention == 0.4 and dict(cfg.method.kwargs) == field_defaults(_YamlLess) == {"positions": "auto",
                                                                                                 "layer": 2}
    assert cell_from_cfg(cfg).method_kwargs == {"layer": 2}  # set on the command line: explicit


def test_method_configs_carry_no_dataclass_defaults():
    """One source of defaults: a method yaml holds only what Hydra needs (name, default retention,
    per-backbone values, a composition's parts and per-child defaults), each per-backbone or per-child
    key is a kwarg of the method it names, and the composed ``method.kwargs`` IS the dataclass's."""
    from sharp.engine.compose import child_keys
    from sharp.methods.registry import composition

    allowed = {"name", "default_retention", "backbones", "parts", "child_defaults", "child_layer_rules",
               "implemented", "planned"}
    for path in sorted((CONFIG_DIR / "method").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert set(raw) <= allowed, f"{path.name}: {sorted(set(raw) - allowed)} (kwargs live in the dataclass)"
        if path.stem == "compose":
            continue
        kwargs = dict(compose([f"method={path.stem}"]).method.kwargs)
        spec = composition(path.stem)
        if spec is None:
            fields = field_defaults(sharp.get_method_class(path.stem))
            assert kwargs == fields, path.name
            for section in (raw.get("backbones") or {}).values():
                assert set(section) <= set(fields), f"{path.name}: backbones: {sorted(set(section) - set(fields))}"
            continue
        keys = child_keys(list(spec.parts))
        assert list(kwargs) == keys, path.name
        for part, key in zip(spec.parts, keys):
            fields = field_defaults(sharp.get_method_class(part))
            own = {k: v for k, v in kwargs[key].items() if k != "retention"}
            assert own == {**fields, **{k: v for k, v in spec.child_defaults.get(key, {}).items() if k != "retention"}}
            assert set(spec.child_defaults.get(key, {})) <= set(fields) | {"retention"}, f"{path.name}: {key}"
            assert set(spec.child_layer_rules.get(key, {})) <= set(fields), f"{path.name}: {key}"


def test_explicit_override_equal_to_the_default_is_explicit(capsys, tmp_path):
    """`method.kwargs.llm_layer=18` on the 36-layer Qwen3-VL runs layer 18 (it is set, whatever its value);
    left unset, 18 maps to 23. The resolved settings are printed before the missing weights stop the run."""
    from run import run_in_process

    cfg = compose(["method=holitom", "backbone=qwen3_vl_8b", "method.kwargs.llm_layer=18"])
    cell = cell_from_cfg(cfg)
    assert cell.method_kwargs == {"llm_layer": 18}
    resolved = sharp.resolve_method(cell.method, cell.backbone, cell.retention, **cell.method_kwargs)
    assert resolved.method.llm_layer == 18 and not any("llm_layer" in c for c in resolved.changes)
    unset = sharp.resolve_method("holitom", "qwen3_vl_8b", 0.15)
    assert unset.method.llm_layer == 23 and "llm_layer 18 -> 23 (relative, depth 28 -> 36)" in unset.changes
    assert method_kwargs(compose(["method=holitom", "backbone=qwen3_vl_8b", "+method_kwargs.llm_layer=18"])) == {
        "llm_layer": 18}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path / "hf-home"))
        with pytest.raises(SystemExit) as exit_:
            run_in_process(["method=holitom", "backbone=qwen3_vl_8b", "method.kwargs.llm_layer=18", "limit=1",
                            f"results_dir={tmp_path / 'results'}"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and "error: Missing weights" in out.err
    assert "[sharp] settings: holitom on qwen3_vl_8b (36 layers): positions auto -> original; " \
           "stages before layer(s) 0, 18" in out.out


def test_backbone_configs_name_registered_backbones_of_their_family():
    import sharp

    registered = set(sharp.backbone_names())
    for path in sorted((CONFIG_DIR / "backbone").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw["name"] == path.stem and raw["name"] in registered, path.name
        assert raw["family"] == catalog.backbone_family(raw["name"]), path.name
        assert catalog.check_backbone(raw["name"], raw["family"]) == raw["family"]
    with pytest.raises(HarnessError, match="not a registered backbone; registered backbones: .*toy_qwen2_vl"):
        catalog.check_backbone("nosuch_7b")
    with pytest.raises(HarnessError, match="config says family 'qwen2_vl'"):
        catalog.check_backbone("toy_llava_onevision", "qwen2_vl")


def test_method_configs_agree_with_the_registry():
    """A config naming an unregistered method must be marked planned (`implemented: false` + `planned:`),
    and a config marked planned must not name a registered method (remove the mark when it lands)."""
    assert catalog.config_problems() == []
    for path in sorted((CONFIG_DIR / "method").glob("*.yaml")):
        if path.stem == "compose":
            continue
        cfg = compose([f"method={path.stem}"])
        assert cfg.method.name == path.stem and 0 < cfg.retention <= 1
        if catalog.is_implemented(path.stem):
            sharp.make_method(path.stem, cfg.retention, **method_kwargs(cfg))  # its kwargs are valid
        else:
            assert catalog.method_status(path.stem) == ("planned", cfg.method.planned)


def test_config_problems_catches_both_directions(tmp_path):
    (tmp_path / "fastv.yaml").write_text("name: fastv\nimplemented: false\nplanned: baselines/fastv.py\n")
    (tmp_path / "nosuch.yaml").write_text("name: nosuch\ndefault_retention: 0.5\n")
    (tmp_path / "later.yaml").write_text("name: later\nimplemented: false\nplanned: sharp/methods/later.py\n")
    (tmp_path / "nonote.yaml").write_text("name: nonote\nimplemented: false\n")
    (tmp_path / "compose.yaml").write_text("name: ???\n")
    problems = catalog.config_problems(tmp_path, registered=["fastv", "vanilla"])
    assert len(problems) == 3, problems
    assert any("fastv.yaml: 'fastv' is registered now; remove `implemented: false`" in p for p in problems)
    assert any("nosuch.yaml: 'nosuch' is not a registered method" in p for p in problems)
    assert any("nonote.yaml: marked `implemented: false` without a `planned:` note" in p for p in problems)


def test_planned_methods_are_reported_not_run():
    planned = catalog.planned_methods()
    for name in ("pdrop", "feather", "framefusion", "visionzip", "holitom", "sharpv", "visionzip_sharp",
                 "holitom_sharp"):
        if name in catalog.registered_methods():
            continue
        assert name in planned and planned[name]
        with pytest.raises(HarnessError) as err:
            catalog.check_method(name)
        msg = str(err.value)
        assert "\n" not in msg and f"method {name!r} is not implemented yet [planned: {planned[name]}]" in msg
        assert "implemented methods: " + ", ".join(catalog.registered_methods()) in msg
    assert catalog.method_status("fastv+sharp") == ("implemented", None)
    if "pdrop" in planned:
        assert catalog.method_status("fastv+pdrop")[0] == "planned"
    assert catalog.method_status("nosuch") == ("unknown", None)
    catalog.check_method("nosuch")  # unknown names are left to make_method's error


def test_compose_config_gives_nested_per_child_kwargs():
    cfg = compose(["method=compose", "method.name=fastv+sharp", "+method_kwargs.sharp.layer=2",
                   "+method_kwargs.fastv.retention=0.5"])
    cell = cell_from_cfg(cfg)
    assert cell.method == "fastv+sharp" and cell.retention == 1.0
    assert cell.method_kwargs == {"sharp": {"layer": 2}, "fastv": {"retention": 0.5}}
    assert cell.relpath() == Path("toy_llava_onevision/fastv+sharp/r1")
    assert catalog.method_children(cell.method) == ["fastv", "sharp"]
    sharp.make_method(cell.method, cell.retention, **cell.method_kwargs)
    # a combination's config kwargs are per-child dicts; +method_kwargs.<child>.<kwarg> merges into them
    cfg = compose(["method=compose", "method.name=fastv+sharp", "retention=0.25",
                   "+method.kwargs.sharp={retention: 0.124, lam: 0.6}", "+method_kwargs.sharp.lam=0.5"])
    assert method_kwargs(cfg) == {"sharp": {"retention": 0.124, "lam": 0.5}}
    # a repeated child: `name@i` keys (Hydra keys cannot hold '@': give the dict whole)
    cfg = compose(["method=compose", "method.name=fastv+fastv", "++method_kwargs={fastv@2: {layer: 3}}"])
    assert method_kwargs(cfg) == {"fastv@2": {"layer": 3}}


def test_compose_without_a_name_is_a_clear_error():
    with pytest.raises(HarnessError, match=r"method=compose needs method.name=<method>\+<method>"):
        cell_from_cfg(compose(["method=compose"]))


def test_sweep_cells_with_composed_methods():
    sweep = {"name": "x", "backbone": "toy_llava_onevision", "tasks": "synthetic_test",
             "cells": [{"method": "fastv+sharp", "retention": 0.25,
                        "method_kwargs": {"sharp": {"retention": 0.1, "lam": 0.5}, "fastv": {"layer": 3}}}]}
    ov = cell_overrides(sweep, 0)
    assert "method=compose" in ov and "method.name='fastv+sharp'" in ov
    assert "+method_kwargs.sharp.retention=0.1" in ov and "+method_kwargs.fastv.layer=3" in ov
    cell = cell_from_cfg(compose(ov))
    assert cell.method == "fastv+sharp" and cell.relpath() == Path("toy_llava_onevision/fastv+sharp/r0.25")
    assert cell.method_kwargs == {"sharp": {"retention": 0.1, "lam": 0.5}, "fastv": {"layer": 3}}


def test_paper_tasks_are_the_four_benchmarks():
    cfg = compose(["tasks=paper", "backbone=llava_onevision_7b"])
    assert list(cfg.tasks.names) == ["mvbench", "longvideobench_val_v", "mlvu_dev", "videomme"]
    assert cfg.backbone.hub_id == "llava-hf/llava-onevision-qwen2-7b-ov-hf"


def _paper_rows(name):
    with open(PAPER / name, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("table,csv_name,n", [(1, "table1_llava_ov.csv", 21), (2, "table2_qwen2_vl.csv", 11)])
def test_sweeps_use_the_papers_flops_matched_retentions(table, csv_name, n):
    sweep = load_sweep(f"table{table}")
    rows = _paper_rows(csv_name)
    assert len(sweep["cells"]) == n == len(rows)
    from sharp.methods import budget

    for cell, row in zip(sweep["cells"], rows):  # same order as the paper
        assert cell["method"] == row["method"]
        assert float(cell["retention"]) == pytest.approx(float(row["retention"]), abs=5e-4)
        if row.get("tokens_kept") and row["method"] in ("vanilla", "fastv", "feather", "sharp"):
            # the paper's kept-token counts, not just its rounded percentages (Table 2: ShaRP 679 / 400)
            assert budget(int(row["tokens_in"]), float(cell["retention"])) == int(row["tokens_kept"])
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
    assert "lam" not in cell.method_kwargs  # the paper defaults of configs/method/sharp.yaml are not "set"


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
    assert C.method_dirname("fastv+sharp") == "fastv+sharp" and C.method_dirname("fastv+fastv@2") == "fastv+fastv@2"
    assert C.method_dirname("a/b c", "x/../y") == "a_b_c-x_.._y"
    assert C.safe_name("..") == "__" and C.safe_name("") == "_"
