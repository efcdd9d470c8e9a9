"""run.py end to end on the default (trained toy LLaVA-OV + synthetic test split): the default cell, a FastV cell killed midway
and completed by a rerun, skipping finished cells, and setup errors without stack traces."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharp.harness import cells as C
from sharp.harness.config import REPO_ROOT, compose
from sharp.harness.resources import HarnessError, MissingResourceError, explain
from sharp.harness.runner import run_cell

RUN = [sys.executable, str(REPO_ROOT / "run.py")]


def _env(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python run.py` with nothing but the results folder changed."""
    out = tmp_path_factory.mktemp("results")
    t0 = time.time()
    proc = subprocess.run([*RUN, f"results_dir={out}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=_env())
    return out, proc, time.time() - t0


def test_default_run_finishes_offline_and_writes_its_cell(default_run):
    out, proc, wall = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = out / "toy_llava_onevision" / "vanilla" / "r1"
    s = json.loads((d / C.SUMMARY).read_text())
    assert s["status"] == "finished" and s["cell"]["method"] == "vanilla"
    assert s["tokens"]["visual_after"] == s["tokens"]["visual_before"] > 0
    assert s["requests"] == 200 and s["failed_requests"] == 0
    # the trained toy answers the held-out split through lmms-eval (train_toy.py measured >= 95%)
    assert s["scores"]["sharp_synthetic"] >= 90
    assert s["latency_ms"]["prefill_mean"] > 0 and s["tflops"]["prefill_mean"] > 0 and s["peak_memory_mb"] > 0
    assert s["config"]["backbone"]["name"] == "toy_llava_onevision" and "versions" in s and "git" in s
    assert (d / C.RESULTS).is_file() and (d / "samples_sharp_synthetic.jsonl").is_file()
    assert len((d / C.REQUESTS).read_text().splitlines()) == 200
    assert not (d / C.RUN_MARKER).exists()
    # the score on the terminal: a small table from the summary, the last lines of the output
    out = proc.stdout
    assert "== toy_llava_onevision / vanilla / retention 1 ==" in out
    assert f"sharp_synthetic  {s['scores']['sharp_synthetic']:>13.1f}       200       0   (attribute " in out
    assert "visual tokens kept  128 of 128 (100.0%)" in out and "prefill TFLOPs      8.39e-05" in out
    assert "prefill ms  " in out and "failed requests     0 of 200" in out
    assert out.rstrip().splitlines()[-1] == f"summary             {d / C.SUMMARY}"
    assert wall < 240


def test_finished_cell_is_skipped_and_a_different_config_is_refused(default_run):
    out, proc, _ = default_run
    assert proc.returncode == 0
    summary_path = out / "toy_llava_onevision" / "vanilla" / "r1" / C.SUMMARY
    before = summary_path.stat().st_mtime_ns
    t0 = time.time()
    s = run_cell(compose([f"results_dir={out}"]))
    assert time.time() - t0 < 5 and s["status"] == "finished"
    assert summary_path.stat().st_mtime_ns == before
    with pytest.raises(HarnessError, match="another configuration"):
        run_cell(compose([f"results_dir={out}", "limit=2"]))


def test_fastv_run_killed_midway_then_completed(tmp_path):
    args = [*RUN, "method=fastv", "retention=0.25", "limit=4", f"results_dir={tmp_path}"]
    cell_dir = tmp_path / "toy_llava_onevision" / "fastv" / "r0.25"
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (cell_dir / C.RUN_MARKER).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (cell_dir / C.RUN_MARKER).exists(), "the run never started its cell"
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cell_dir / C.SUMMARY).exists()  # nothing counts as finished
    assert C.status(C.Cell("toy_llava_onevision", "fastv", 0.25, ["sharp_synthetic"],
                           limit=4), tmp_path)[0] == "partial"

    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((cell_dir / C.SUMMARY).read_text())
    import sharp

    before, after = s["tokens"]["visual_before"], s["tokens"]["visual_after"]
    assert after == sharp.methods.budget(int(before), 0.25)
    assert s["tokens"]["retention_measured"] == pytest.approx(0.25, abs=0.01)
    assert s["requests"] == 4 and s["cell"]["method_kwargs"] == {}  # nothing set: the resolved defaults ran
    assert s["method_settings"]["kwargs"]["layer"] == 2
    assert not (cell_dir / C.RUN_MARKER).exists()


def test_missing_weights_and_data_offline_is_a_message_not_a_traceback(tmp_path):
    proc = subprocess.run([*RUN, "backbone=llava_onevision_7b", "tasks=paper", f"results_dir={tmp_path}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME=tmp_path / "hf"))
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    for needle in ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "OpenGVLab/MVBench", "longvideobench/LongVideoBench",
                   "sy1998/MLVU_dev", "lmms-eval/Video-MME", "hf download", f"HF_HOME={tmp_path / 'hf'}",
                   "hub/models--", "mvbench_video/"):
        assert needle in err, needle
    assert not any((tmp_path / "llava_onevision_7b").rglob("summary.json"))


def test_download_errors_are_translated():
    from huggingface_hub.errors import LocalEntryNotFoundError

    err = explain(LocalEntryNotFoundError("Cannot find the requested files in the disk cache"), "qwen2_vl_7b")
    assert isinstance(err, MissingResourceError) and "Qwen/Qwen2-VL-7B-Instruct" in str(err)
    assert explain(ValueError("a bug"), "qwen2_vl_7b") is None


def test_unknown_method_fails_with_the_engine_error(tmp_path):
    with pytest.raises(HarnessError, match="unknown pruning method 'nosuch'; valid methods: .*fastv"):
        run_cell(compose(["method=fastv", "method.name=nosuch", f"results_dir={tmp_path}"]))
    assert not any(Path(tmp_path).iterdir())


def test_planned_method_is_one_line_and_exit_2(tmp_path, capsys):
    from sharp.harness import catalog

    planned = [m for m in catalog.planned_methods() if not catalog.is_implemented(m)]
    if not planned:
        pytest.skip("every planned method is registered")
    sys.path.insert(0, str(REPO_ROOT))
    import run

    with pytest.raises(SystemExit) as exc:
        run.run_in_process([f"method={planned[0]}", f"results_dir={tmp_path}"])
    assert exc.value.code == 2
    proc = capsys.readouterr()
    assert "Traceback" not in proc.err + proc.out
    lines = proc.err.strip().splitlines()
    assert len(lines) == 1, proc.err
    assert lines[0].startswith(f"error: method {planned[0]!r} is not implemented yet [planned: ")
    assert "implemented methods: " + ", ".join(catalog.registered_methods()) in lines[0]
    assert not any(Path(tmp_path).iterdir())
    with pytest.raises(HarnessError, match="method=compose needs method.name="):
        run_cell(compose(["method=compose", f"results_dir={tmp_path}"]))
    with pytest.raises(HarnessError, match="not a child|keyed by its children"):
        run_cell(compose(["method=compose", "method.name=fastv+sharp", "+method_kwargs.visionzip.layer=2",
                          f"results_dir={tmp_path}"]))
    assert not any(Path(tmp_path).iterdir())


def test_composed_method_end_to_end(tmp_path):
    """`method=compose method.name=fastv+sharp` with per-child kwargs, 4 docs of the default split
    (in-process: the command line is composed as run.py composes it)."""
    import sharp

    sys.path.insert(0, str(REPO_ROOT))
    import run

    run.run_in_process(["method=compose", "method.name=fastv+sharp", "retention=0.25", "+method_kwargs.fastv.layer=3",
                        "+method_kwargs.sharp.retention=0.1", "limit=4", f"results_dir={tmp_path}"])
    cell_dir = tmp_path / "toy_llava_onevision" / "fastv+sharp" / "r0.25"
    s = json.loads((cell_dir / C.SUMMARY).read_text())
    assert s["cell"]["method"] == "fastv+sharp"
    assert s["cell"]["method_kwargs"] == {"fastv": {"layer": 3}, "sharp": {"retention": 0.1}}
    assert s["model"]["lmms_eval_model"] == "sharp_llava_onevision"
    assert s["model"]["model_args"]["method"] == "fastv+sharp" and s["model"]["model_args"]["sharp"] == {"retention": 0.1}
    assert "method=fastv+sharp,retention=0.25," in s["model"]["model_args_string"]
    assert "fastv.layer=3,sharp.retention=0.1" in s["model"]["model_args_string"]
    before, after = s["tokens"]["visual_before"], s["tokens"]["visual_after"]
    assert after == sharp.methods.budget(int(before), 0.1)  # sharp (layer 1) at 10%, then fastv's 25% keeps them
    assert s["requests"] == 4 and s["failed_requests"] == 0


def test_fastvid_on_a_hub_llava_backbone_needs_the_siglip_head(tmp_path, monkeypatch):
    """FastVID reloads SigLIP's attention-pooling head on a pretrained LLaVA backbone: the preflight lists
    it with the weights (before any model loads); tiny backbones, Qwen and other methods need nothing."""
    from sharp.backbones.vision import SIGLIP_HEAD_FILE, SIGLIP_HEAD_HUB
    from sharp.harness.resources import check_method_weights

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    missing = check_method_weights("llava_onevision_7b", "fastvid")
    assert [m.name for m in missing] == [SIGLIP_HEAD_HUB] and SIGLIP_HEAD_FILE in missing[0].fetch[0]
    assert [m.name for m in check_method_weights("llava_video_7b", "fastv+fastvid")] == [SIGLIP_HEAD_HUB]
    for backbone, method in [("tiny_llava_onevision", "fastvid"), ("qwen2_vl_7b", "fastvid"),
                             ("llava_onevision_7b", "visionzip")]:
        assert check_method_weights(backbone, method) == []
    snapshot = tmp_path / "hf" / "hub" / f"models--{SIGLIP_HEAD_HUB.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / SIGLIP_HEAD_FILE).write_bytes(b"")
    assert check_method_weights("llava_onevision_7b", "fastvid") == []


def test_fastvid_offline_without_the_head_stops_in_the_preflight(tmp_path):
    proc = subprocess.run([*RUN, "backbone=llava_onevision_7b", "method=fastvid", "tasks=paper",
                           f"results_dir={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME=tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "google/siglip-so400m-patch14-384" in proc.stderr and "attention-pooling head" in proc.stderr


def test_offline_with_the_replica_only_the_weights_are_missing(tmp_path):
    """With the benchmarks' data in HF_HOME (scripts/make_replicas.py's layout), the offline preflight
    of a hub backbone lists the weights alone: the datasets and video folders are where lmms-eval reads them."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import make_replicas

    make_replicas.make_replicas(tmp_path / "hf", docs=1, benchmarks=["mvbench", "mlvu"])
    proc = subprocess.run([*RUN, "backbone=llava_onevision_7b", "tasks=mvbench", f"results_dir={tmp_path}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME=tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    missing = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert missing == [line for line in missing if "llava-hf/llava-onevision-qwen2-7b-ov-hf" in line] and len(missing) == 1
    assert "OpenGVLab/MVBench:" not in proc.stderr  # no dataset line: the replica's snapshot and videos are found


def test_a_task_module_that_is_not_installed_is_one_message(monkeypatch, tmp_path):
    """lmms-eval's task code imports modules at its top (videomme: cv2): a missing one is named with its
    package before anything loads, online or offline, instead of a traceback from the task loader."""
    import dataclasses

    from sharp.harness import benchmarks, resources

    patched = dataclasses.replace(benchmarks.BENCHMARKS["videomme"], imports=(("no_such_module_sharp", "no-such-pkg"),))
    monkeypatch.setitem(benchmarks.BENCHMARKS, "videomme", patched)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for flag in resources.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    with pytest.raises(HarnessError, match=r"task videomme imports no_such_module_sharp, which is not installed "
                                           r"\(pip install no-such-pkg\)"):
        resources.preflight("tiny_llava_onevision", ["videomme"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingResourceError, match=r"(?s)lmms-eval/Video-MME.*Also: lmms-eval's task videomme imports"):
        resources.preflight("tiny_llava_onevision", ["videomme"])
    assert resources.preflight("tiny_llava_onevision", ["sharp_synthetic"]) == []
