"""Harness robustness (issue 14): a bad video costs one answer, short videos are sampled as the reference
readers do, bad arguments fail before any work with one line, the sweep and table scripts refuse what
they cannot do, and the data-parallel sharding / gathering logic matches lmms-eval's.

The end-to-end cells run in this process (``run_cell``, what run.py calls) on the trained toy LLaVA-OV
with a copy of the synthetic task whose first video is corrupt; lmms-eval's task index is built once
per include path (as tests/test_sweep_smoke.py does; no task or model is stubbed)."""
from __future__ import annotations

import json
import logging
import sys
import textwrap

import numpy as np
import pytest

from sharp.harness import cells as C
from sharp.harness import parallel
from sharp.harness.config import PACKAGE_DIR, REPO_ROOT, compose
from sharp.harness.resources import HarnessError
from sharp.harness.runner import run_cell
import lmms_helpers

RUN = [sys.executable, str(REPO_ROOT / "run.py")]
N_DOCS = 6


@pytest.fixture(scope="module", autouse=True)
def memoised_task_index(task_index_memo):
    with lmms_helpers.memoised_task_index(memo=task_index_memo):
        yield


@pytest.fixture(scope="module")
def corrupt_task(tmp_path_factory):
    """Task ``sharp_synthetic_corrupt``: the first 20 synthetic test docs, doc 0's video replaced by random
    bytes named .mp4 (what a truncated download looks like)."""
    d = tmp_path_factory.mktemp("corrupt_task")
    bad = d / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "stub.json").write_text(json.dumps({"split": "default", "n": 20, "seed": 0, "corrupt": str(bad)}) + "\n")
    template = (PACKAGE_DIR / "synthetic" / "lmms_task" / "_sharp_synthetic_template.yaml").read_text()
    body = template.replace("!function utils.sharp_synthetic_", "!function utils.")
    (d / "sharp_synthetic_corrupt.yaml").write_text(
        "task: sharp_synthetic_corrupt\n" + body + "dataset_kwargs:\n  data_files:\n    test: stub.json\n")
    (d / "utils.py").write_text(textwrap.dedent(f"""
        import importlib.util

        _spec = importlib.util.spec_from_file_location(
            "_sharp_synthetic_utils", {str(PACKAGE_DIR / "synthetic" / "lmms_task" / "utils.py")!r})
        _base = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_base)
        doc_to_visual = _base.sharp_synthetic_doc_to_visual
        doc_to_text = _base.sharp_synthetic_doc_to_text
        process_results = _base.sharp_synthetic_process_results
        aggregate = _base.sharp_synthetic_aggregate


        def process_docs(dataset):
            import datasets
            from sharp.synthetic import ensure_split

            row = dataset[0]
            docs = ensure_split(row["split"], n=int(row["n"]), seed=int(row["seed"]))
            docs[0] = dict(docs[0], video=row["corrupt"])
            return datasets.Dataset.from_list(docs)
        """))
    return d, bad


def _overrides(task_dir, results, *extra):
    return ["tasks=synthetic_test", "tasks.names=[sharp_synthetic_corrupt]", f"tasks.include_path=[{task_dir}]",
            f"limit={N_DOCS}", f"results_dir={results}", *extra]


def test_a_corrupt_first_video_costs_one_answer(corrupt_task, tmp_path, capsys):
    task_dir, bad = corrupt_task
    summary = run_cell(compose(_overrides(task_dir, tmp_path)))
    assert summary["status"] == "finished"
    assert summary["requests"] == N_DOCS and summary["failed_requests"] == 1
    assert summary["per_task"]["sharp_synthetic_corrupt"]["failed_requests"] == 1
    (failure,) = summary["failures"]
    assert failure["task"] == "sharp_synthetic_corrupt" and failure["doc_id"] == 0 and failure["video"] == str(bad)
    assert "corrupt.mp4" in failure["reason"] and "corrupt or unsupported" in failure["reason"]
    d = C.Cell("toy_llava_onevision", "vanilla", 1.0, ["sharp_synthetic_corrupt"], limit=N_DOCS).dir(tmp_path)
    samples = [json.loads(line) for line in (d / "samples_sharp_synthetic_corrupt.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(N_DOCS))
    assert samples[0]["filtered_resps"] == "" and samples[0]["failed"] == failure["reason"]
    assert samples[0]["accuracy"]["score"] == 0.0  # the empty answer is scored, as wrong
    answered = samples[1:]
    assert all(s["filtered_resps"] and "failed" not in s for s in answered)
    correct = sum(s["accuracy"]["score"] == 100.0 for s in answered)
    assert correct >= 4  # the trained toy answers the 5 good videos (it scores >= 95% on the split)
    assert summary["scores"]["sharp_synthetic_corrupt"] == pytest.approx(100.0 * correct / N_DOCS)
    requests = [json.loads(line) for line in (d / C.REQUESTS).read_text().splitlines()]
    assert [r["doc_id"] for r in requests] == list(range(N_DOCS)) and requests[0]["failed"] == failure["reason"]
    out = capsys.readouterr().out  # the end-of-run table says so
    assert "failed requests     1 of 6 (answered '', scored as wrong)" in out
    assert f"sharp_synthetic_corrupt doc 0: {failure['reason']}" in out
    assert f"summary             {d / C.SUMMARY}" in out

    # the tables flag it
    from sharp.harness import tables as T

    row = T.Row(0, C.Cell("toy_llava_onevision", "vanilla", 1.0, ["sharp_synthetic_corrupt"]), {}, "finished",
                summary, None, {"method": "vanilla", "retention": 1.0}, {})
    md = T.to_markdown(1, {"paper_csv": "-"}, [row], tmp_path)
    assert "| finished (1 failed requests) |" in md and "see `failures` in their summary.json" in md
    assert T.to_records(1, [row])[0]["failed_requests"] == 1


def test_strict_stops_at_the_first_bad_video_with_the_reason(corrupt_task, tmp_path):
    task_dir, _ = corrupt_task
    with pytest.raises(HarnessError) as err:
        run_cell(compose(_overrides(task_dir, tmp_path, "strict=true")))
    msg = str(err.value)
    assert msg.startswith("strict=true: sharp_synthetic_corrupt doc 0: cannot open video ") and "corrupt.mp4" in msg
    assert not list(tmp_path.rglob(C.SUMMARY))


# ----------------------------------------------------------------------------- short videos
def _colour_video(path, n, h=48, w=64, fps=8):
    """n frames, frame i filled with grey level 40 * i + 20 (distinct after the codec)."""
    from sharp.backbones.video import write_video

    frames = np.stack([np.full((h, w, 3), 40 * i + 20, np.uint8) for i in range(n)])
    return write_video(path, frames, fps=fps)


def _levels(frames):
    return [int(round((float(f.mean()) - 20) / 40)) for f in frames]


def test_a_3_frame_video_through_both_backbones_prepare(tmp_path, caplog):
    import sharp

    path = _colour_video(tmp_path / "three.mp4", 3)
    llava = sharp.load_backbone("tiny_llava_onevision")
    with caplog.at_level(logging.WARNING, logger="sharp.backbones.video"):
        inputs = llava.prepare(str(path), "What happens?")
    # lmms-eval's llava_onevision reader: np.linspace(0, 3 - 1, 32, dtype=int) -> 16 x frame 0, 15 x 1, 1 x 2
    assert llava.num_frames == 32 and inputs["pixel_values_videos"].shape[1] == 32
    assert _levels(llava.sample_frames(str(path))) == [0] * 16 + [1] * 15 + [2]
    assert "short video" in caplog.text and "3 frames, 32 asked" in caplog.text
    caplog.clear()

    qwen = sharp.load_backbone("tiny_qwen2_vl")
    with caplog.at_level(logging.WARNING, logger="sharp.backbones.video"):
        inputs = qwen.prepare(str(path), "What happens?")
    # qwen-vl-utils smart_nframes at 8 fps: 3 / 8 * 2 = 0.75 -> clamp to [4, floor2(min(768, 3)) = 2] -> 2,
    # at round(linspace(0, 2, 2)) = frames 0 and 2; lmms-eval keeps unique(linspace(0, 1, 32)) = both;
    # the processor makes one temporal patch of 2 frames
    assert _levels(qwen.sample_frames(str(path))) == [0, 2]
    assert int(inputs["video_grid_thw"][0, 0]) == 1
    assert "short video" in caplog.text and "keep 2" in caplog.text

    # one frame is below qwen-vl-utils' minimum of 2: a VideoError (a failed request in the wrapper)
    from sharp.backbones.video import VideoError

    one = _colour_video(tmp_path / "one.mp4", 1)
    with pytest.raises(VideoError, match="one.mp4 has 1 frames"):
        qwen.sample_frames(str(one))
    assert llava.sample_frames(str(one)).shape[0] == 32  # LLaVA-OV repeats the one frame


# ----------------------------------------------------------------------------- errors before work
@pytest.mark.parametrize("overrides,needle", [
    (["limit=abc"], "limit='abc': accepted values: null (the whole benchmark), an integer >= 1"),
    (["limit=-3"], "limit=-3: accepted values:"),
    (["limit=0"], "limit=0: accepted values:"),
    (["method=fastv", "+method_kwargs.layer=99"],
     "method 'fastv' on toy_llava_onevision (4 decoder layers): fastv: layer must be in 1..3"),
    (["method=sharp", "+method_kwargs.layer=7"], "method 'sharp' on toy_llava_onevision (4 decoder layers): "),
    (["method=sharp", "+method_kwargs.lam=abc"], "sharp: lam must be float, got 'abc'"),
    (["method=fastv", "+method_kwargs.lyer=2"], "unknown argument(s) lyer; valid arguments: layer"),
    (["method=fastv", "retention=abc"], "retention='abc' (method fastv): accepted values: a number in (0, 1]"),
    (["method=fastv", "retention=1.5"], "retention=1.5 (method fastv): accepted values: a number in (0, 1]"),
    (["batch_size=0"], "batch_size=0: accepted values: an integer >= 1"),
    (["batch_size=auto"], "batch_size='auto': accepted values: an integer >= 1"),
    (["num_processes=0"], "num_processes=0: accepted values: an integer >= 1"),
    (["strict=yes"], "strict='yes': accepted values: true, false"),
    (["device=gpu"], "device='gpu': accepted values: null (cuda when available), cpu, cuda, cuda:<index>"),
])
def test_bad_values_fail_before_any_work_with_one_line(overrides, needle, tmp_path):
    with pytest.raises(HarnessError) as err:
        run_cell(compose([*overrides, f"results_dir={tmp_path}"]))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["foo=1"], "error: foo=1: 'foo' is not a key of the config"),
    (["method=nosuch"], "error: method=nosuch: no configs/method/nosuch.yaml; accepted values: compose, divprune, dycoke, fastv"),
    (["tasks=nosuch"], "error: tasks=nosuch: no configs/tasks/nosuch.yaml; accepted values: "),
    (["limit=["], "error: limit=[: cannot parse this override"),
])
def test_hydra_errors_are_one_line_and_exit_2(argv, needle, capsys):
    sys.path.insert(0, str(REPO_ROOT))
    import run

    with pytest.raises(SystemExit) as exc:
        run.check_command_line(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(needle) and "\n" not in err, err
    run.check_command_line(["method=fastv", "limit=3"])  # a good command line passes


@pytest.mark.parametrize("argv,needle", [
    (["limit=abc"], "error: limit='abc': accepted values:"),
    (["foo=1"], "error: foo=1: 'foo' is not a key"),
])
def test_run_py_exits_2_with_one_line_and_no_traceback(argv, needle, tmp_path, capsys):
    """In-process (run.run_in_process: run.py's own checks and error handling); the real ``python run.py``
    exit-2 case is tests/test_harness_run.py::test_missing_weights_and_data_offline_is_a_message_not_a_traceback."""
    sys.path.insert(0, str(REPO_ROOT))
    import run

    with pytest.raises(SystemExit) as exc:
        run.run_in_process([*argv, f"results_dir={tmp_path}"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), captured.err
    assert not any(tmp_path.iterdir())


def test_slurm_without_slurm_names_the_local_launcher(tmp_path, monkeypatch, capsys):
    import shutil

    from sharp.harness import sweep

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert sweep.main(["smoke", "--slurm", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --slurm: SLURM is not available here (no sbatch on PATH)") and "\n" not in err
    assert "--launcher submitit_local" in err
    assert sweep.launcher_problem("submitit_local") is None
    assert sweep.main(["smoke", "--slurm", "--dry-run", "--results-dir", str(tmp_path)]) == 0  # a dry run shows it


def test_make_tables_refuses_a_results_folder_that_does_not_exist(tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import make_tables

    missing = tmp_path / "reslts"
    assert make_tables.main(["--table", "1", "--results-dir", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --results-dir {str(missing)!r} is not a folder") and "\n" not in err
    assert not missing.exists()


def test_sweep_prints_one_status_line_per_cell(tmp_path):
    from sharp.harness import sweep

    row = {"index": 3, "cell": C.Cell("toy_llava_onevision", "fastv", 0.25, ["sharp_synthetic"])}
    d = row["cell"].dir(tmp_path)
    from sharp.harness.io import atomic_write_json

    atomic_write_json(d / C.SUMMARY, {"scores": {"sharp_synthetic": 92.5}, "requests": 200, "failed_requests": 2})
    assert sweep.cell_status_line(row, 0, 44.2, str(tmp_path)) == (
        f"[ 3] finished in 44s: sharp_synthetic 92.5, 2/200 failed requests -> {d}")
    assert sweep.cell_status_line(row, 2, 3.0, str(tmp_path)).startswith("[ 3] FAILED (exit 2) after 3s: ")


def test_the_slurm_launcher_asks_one_gpu_per_process():
    from hydra import compose as hcompose, initialize_config_dir

    from sharp.harness.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hcompose("config", overrides=["hydra/launcher=slurm", "num_processes=4"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 4


# ----------------------------------------------------------------------------- data parallel logic
def test_sharding_is_lmms_evals_document_split():
    from lmms_eval.utils import create_iterator

    docs = list(range(11))
    for size in (1, 2, 3):
        shards = [parallel.shard(docs, r, size) for r in range(size)]
        assert shards == [list(create_iterator(iter(docs), rank=r, world_size=size)) for r in range(size)]
        assert sorted(x for s in shards for x in s) == docs


def test_gathered_rows_are_in_single_process_order():
    rows = [{"task": t, "doc_id": i} for t in ("b", "a") for i in range(5)]
    per_rank = [parallel.shard(rows, r, 2) for r in range(2)]  # what each rank measured, rank order
    assert parallel.merge_gathered(per_rank) == parallel.sort_requests(rows)
    assert [(r["task"], r["doc_id"]) for r in parallel.merge_gathered(per_rank)][:3] == [("a", 0), ("a", 1), ("a", 2)]
    assert parallel.gather_rows(rows, parallel.World()) == rows


def test_world_from_the_environment():
    assert parallel.world({}) == parallel.World(0, 1, 0)
    assert parallel.world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == parallel.World(1, 2, 1)
    with pytest.raises(HarnessError, match="accepted values: 0 <= RANK < WORLD_SIZE"):
        parallel.world({"RANK": "2", "WORLD_SIZE": "2"})
    env = parallel.child_env(1, 2, 29500, base={})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"], env[parallel.PARENT_ENV]) == ("1", "2", "29500", "1")


def test_a_failing_process_stops_the_others(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    print('error: rank one broke', file=sys.stderr); sys.exit(3)\n"
                      "time.sleep(60)\n")
    with pytest.raises(parallel.ChildFailed) as err:
        parallel.launch([str(script)], 2)
    assert err.value.code == 3 and "process 1 of 2 failed (exit status 3): error: rank one broke" in err.value.message
    parallel.launch(["-c", "import os; assert os.environ['WORLD_SIZE'] == '2'"], 2)  # all succeed: returns
