"""The multi-scene benchmark as lmms-eval tasks (``sharp_scenes``, ``sharp_scenes_default``) and every toy
backbone's default task: the benchmark it is trained and scored on.

* config composition: ``backbone=toy_scenes_*`` alone selects ``tasks=scenes_test`` (``sharp_scenes``), the
  other backbones keep ``synthetic_test``; an explicit ``tasks=...`` wins;
* the task through lmms-eval with a fake model: the prompt is the doc's, an oracle scores 100 on every
  question type, a constant answer scores chance;
* ``run.py backbone=<scenes toy>`` on a few docs answers exactly what ``sharp.toy.evaluate`` (what
  ``scripts/retention_curve.py`` reports) answers on the same docs: same frames, prompt and parser.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sharp.harness import cells as C
from sharp.harness.config import CONFIG_DIR, compose
from sharp.synthetic import TASK_DIR
from sharp.synthetic import scenes
from sharp.toy import TOY_BACKBONES, TOY_BENCHMARKS

from lmms_helpers import fake_video_model, synthetic_task_manager, task_results, use_offline_synthetic

BENCHMARK_TASK = {"benchmark": "sharp_synthetic", "scenes": "sharp_scenes"}  # sharp.synthetic module -> test-split task
N_DOCS = 6


@pytest.mark.parametrize("backbone", sorted(TOY_BACKBONES))
def test_each_toy_defaults_to_its_own_benchmark(backbone):
    cfg = compose([f"backbone={backbone}"])
    assert list(cfg.tasks.names) == [BENCHMARK_TASK[TOY_BENCHMARKS[backbone]]]
    assert "defaults" not in cfg.backbone  # the override shapes the composition, not the backbone's keys


def test_explicit_tasks_win_and_other_backbones_keep_the_synthetic_default():
    assert list(compose().tasks.names) == ["sharp_synthetic"]  # python run.py: toy_llava_onevision
    for ov in (["backbone=toy_scenes_llava_onevision", "tasks=synthetic_test"],
               ["tasks=synthetic_test", "backbone=toy_scenes_qwen2_vl"]):  # order on the command line: irrelevant
        assert list(compose(ov).tasks.names) == ["sharp_synthetic"]
    assert list(compose(["backbone=toy_scenes_qwen2_vl", "tasks=paper"]).tasks.names)[0] == "mvbench"
    assert list(compose(["backbone=toy_llava_onevision", "tasks=scenes"]).tasks.names) == ["sharp_scenes_default"]
    assert compose(["backbone=toy_scenes_qwen2_vl", "limit=3"]).limit == 3
    for path in sorted((CONFIG_DIR / "backbone").glob("*.yaml")):
        if path.stem not in TOY_BACKBONES:
            assert list(compose([f"backbone={path.stem}"]).tasks.names) == ["sharp_synthetic"], path.stem


def test_task_configs_name_the_scenes_splits():
    for name, task, split, n in (("scenes_test", "sharp_scenes", "test", 200),
                                 ("scenes", "sharp_scenes_default", "default", 24)):
        cfg = yaml.safe_load((CONFIG_DIR / "tasks" / f"{name}.yaml").read_text())
        assert cfg["names"] == [task]
        task_yaml = yaml.safe_load((Path(TASK_DIR) / f"{task}.yaml").read_text())
        stub_file = task_yaml["dataset_kwargs"]["data_files"]["test"]
        stub = json.loads((Path(TASK_DIR) / stub_file).read_text())
        assert stub == {"benchmark": "scenes", "split": split, "n": n, "seed": 0}
        assert n == scenes.DEFAULT_N[split]


# -- through lmms-eval with a fake model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_manager():
    return synthetic_task_manager()


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    return use_offline_synthetic(monkeypatch, tmp_path, N_DOCS)


def test_tasks_registered(task_manager):
    tasks = {"sharp_scenes", "sharp_scenes_default", "sharp_synthetic", "sharp_synthetic_default"}
    assert tasks <= set(task_manager.all_tasks)


def test_oracle_scores_100_and_the_prompt_is_the_docs(task_manager, offline_env):
    model = fake_video_model(lambda doc: f"{doc['answer']}. {doc['answer_text']}")
    r = task_results(model, "sharp_scenes", task_manager)  # SHARP_SYNTHETIC_N docs of the test split
    assert r["accuracy,none"] == 100.0
    for q in scenes.QTYPES:
        assert r[f"accuracy_{q},none"] == 100.0
    assert len(model.requests) == N_DOCS
    docs = scenes.generate_docs("test", N_DOCS)
    for (ctx, gen_kwargs, doc), expected in zip(model.requests, docs):
        assert doc["id"] == expected["id"] and ctx == expected["prompt"]
        assert Path(doc["video"]).is_relative_to((offline_env / "cache").resolve())
    assert gen_kwargs["max_new_tokens"] == 16 and gen_kwargs["do_sample"] is False


def test_constant_answer_is_chance(task_manager, offline_env):
    r = task_results(fake_video_model(lambda doc: "The answer is (C)"), "sharp_scenes_default", task_manager)  # 24 docs
    assert r["accuracy,none"] == 25.0  # letters balanced per 12 docs and question type
    assert all(r[f"accuracy_{q},none"] == 25.0 for q in scenes.QTYPES)


# -- run.py on the scenes toys ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["toy_scenes_llava_onevision", "toy_scenes_qwen2_vl"])
def test_run_py_on_a_scenes_toy_answers_as_the_toy_evaluation(backbone, tmp_path, monkeypatch):
    import sharp
    from run import run_in_process
    from sharp import toy

    monkeypatch.setenv("SHARP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SHARP_SYNTHETIC_N", str(N_DOCS))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_in_process([f"backbone={backbone}", f"results_dir={tmp_path / 'results'}"])  # no tasks=: its benchmark
    d = C.Cell(backbone, "vanilla", 1.0, ["sharp_scenes"]).dir(tmp_path / "results")
    summary = json.loads((d / C.SUMMARY).read_text())
    assert summary["requests"] == N_DOCS and summary["failed_requests"] == 0
    samples = [json.loads(line) for line in (d / "samples_sharp_scenes.jsonl").read_text().splitlines()]
    harness = {s["accuracy"]["id"]: s["accuracy"]["pred"] for s in samples}

    docs = scenes.ensure_split("test", n=N_DOCS)
    bb = sharp.load_backbone(backbone, device="cpu")
    direct = toy.evaluate(bb, docs, "vanilla", 1.0, cache_dir=tmp_path / "pixels")
    assert harness == {doc["id"]: pred for doc, pred in zip(docs, direct.preds)}
    assert summary["scores"]["sharp_scenes"] == pytest.approx(direct.accuracy)
    assert direct.accuracy >= 100.0 * (N_DOCS - 1) / N_DOCS  # the toys score 98.5 / 99.0 on the 200 docs
