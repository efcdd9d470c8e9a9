"""The paper's four benchmarks end to end through lmms-eval's own task code, on miniature replicas.

``scripts/make_replicas.py`` writes MVBench (its 20 subtasks: per-source video folders, TVQA frame
folders), LongVideoBench val, MLVU dev and VideoMME in the layout lmms-eval 0.7.3 reads from HF_HOME;
then ``run.py backbone=<tiny of each family> tasks=paper limit=1`` runs OFFLINE (HF_HUB_OFFLINE=1,
HF_DATASETS_OFFLINE=1): lmms-eval loads the annotations from the datasets cache, its doc_to_visual finds
the videos, its doc_to_text builds the prompts (the post-prompts it gives the family's built-in model
name), the wrapper answers, and the tasks' process_results / aggregations score the answers into the
summary. The tiny models have random weights: the scores are chance, only the path is checked.

One replica is built per session; the five families run in ONE subprocess (imports once), each a
``run.run_in_process`` cell. What only real data can check is listed in scripts/make_replicas.py.
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sharp.harness.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import make_replicas as R  # noqa: E402

pytestmark = pytest.mark.replica  # about 2-4 min on 2 CPU cores: `-m "not replica"` leaves it out

FAMILIES = {  # tiny backbone -> (tasks config, lmms-eval name the harness gives the task manager)
    "tiny_llava_onevision": ("paper", "llava_onevision"),
    "tiny_llava_video": ("paper", "llava_vid"),
    "tiny_qwen2_vl": ("paper_qwen2_vl", "qwen2_vl"),
    "tiny_qwen2_5_vl": ("paper", "qwen2_5_vl"),
    "tiny_qwen3_vl": ("paper", "qwen3_vl"),
}
COLUMNS = {"paper": ("mvbench", "longvideobench", "mlvu", "videomme"),
           "paper_qwen2_vl": ("mvbench", "longvideobench", "videomme")}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT = 1
NEW_TOKENS = 3  # the tasks ask 16 (LongVideoBench 32); random weights answer noise: 3 keep CI short

# post-prompts of lmms-eval 0.7.3's task yamls (lmms_eval_specific_kwargs) for each model name
MVBENCH_POST = "Only give the best option.\n"
LVB_POST = "Answer with the option's letter from the given choices directly.\n"
MLVU_POST = "\nOnly give the best option.\nBest option: ("
VIDEOMME_POST = {"llava_vid": "The best answer is:", "qwen3_vl": "Answer with the option letter only."}
VIDEOMME_DEFAULT_POST = "\nAnswer with the option's letter from the given choices directly."

DRIVER = textwrap.dedent("""
    import sys, time, json
    sys.path.insert(0, {root!r})
    import run
    run.register_methods()
    walls = {{}}
    for backbone, tasks in {cells!r}:
        t0 = time.time()
        run.run_in_process([f"backbone={{backbone}}", f"tasks={{tasks}}", "limit={limit}", "results_dir={out}",
                            "gen_kwargs='max_new_tokens={new_tokens}'"])
        walls[backbone] = time.time() - t0
    print("WALLS " + json.dumps(walls))
""")


@pytest.fixture(scope="session")
def replica(tmp_path_factory):
    """One replica for the session (1 doc per subtask / task type / duration group)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        pytest.fail("lmms-eval 0.7.3's videomme task imports cv2 at its top: install opencv-python-headless "
                    "(requirements-lmms.txt)")
    home = tmp_path_factory.mktemp("hf_replica")
    t0 = time.time()
    made = R.make_replicas(home, docs=1)
    return home, made, time.time() - t0


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE")}
    env.update(OFFLINE, HF_HOME=str(home))
    return env


@pytest.fixture(scope="session")
def family_runs(replica, tmp_path_factory):
    """run.py's cell for every family's tiny backbone on the replica (one subprocess)."""
    home, _, _ = replica
    out = tmp_path_factory.mktemp("replica_results")
    cells = [(bb, tasks) for bb, (tasks, _) in FAMILIES.items()]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(REPO_ROOT), cells=cells, limit=LIMIT, out=out,
                                                        new_tokens=NEW_TOKENS)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=_env(home))
    return out, proc, time.time() - t0


def _samples(cell_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (cell_dir / f"samples_{task}.jsonl").read_text().splitlines()]


def test_replica_layout_is_what_the_tasks_read(replica):
    """Offline, lmms-eval's own task objects load every replica split and find every doc's video."""
    home, made, wall = replica
    assert wall < 120
    assert made == {"mvbench": {"tasks": 20, "docs": 20}, "videomme": {"tasks": 1, "docs": 3},
                    "mlvu": {"tasks": 1, "docs": 7}, "longvideobench": {"tasks": 1, "docs": 4}}
    code = textwrap.dedent("""
        import json, os
        from lmms_eval.tasks import TaskManager, get_task_dict
        tm = TaskManager("ERROR", model_name="llava_onevision")
        tasks = get_task_dict(["mvbench", "longvideobench_val_v", "mlvu_dev", "videomme"], tm)
        seen = {}
        def walk(d):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v)
                else:
                    docs = list(v.test_docs())
                    paths = [p for doc in docs for p in v.doc_to_visual(doc)]
                    seen[v.config.task] = [len(docs), all(os.path.exists(p) for p in paths),
                                           sorted({"dir" if os.path.isdir(p) else "file" for p in paths})]
        walk(tasks)
        print("SEEN " + json.dumps(seen))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=_env(home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SEEN "))[5:])
    assert len([t for t in seen if t.startswith("mvbench_")]) == 20
    for task, (n, found, kinds) in seen.items():
        assert n >= 1 and found, (task, n, found)
        assert kinds == (["dir"] if task == "mvbench_episodic_reasoning" else ["file"]), (task, kinds)
    assert seen["videomme"][0] == 3 and seen["mlvu_dev"][0] == 7 and seen["longvideobench_val_v"][0] == 4
    # the hub snapshots the preflight looks for, and MVBench's link as lmms-eval's create_link leaves it
    assert (home / "mvbench_video").is_symlink() and (home / "mvbench_video" / "json" / "action_count.json").is_file()
    snap = home / "hub" / "datasets--OpenGVLab--MVBench"
    assert (snap / "refs" / "video").read_text() == R.commit_of("OpenGVLab/MVBench")


def test_make_replicas_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="accepted values: mvbench, videomme, mlvu, longvideobench"):
        R.make_replicas(tmp_path, benchmarks=["mvbench", "egoschema"])
    with pytest.raises(ValueError, match="docs=0"):
        R.make_replicas(tmp_path, docs=0)


def test_every_family_runs_the_paper_benchmarks_offline(family_runs):
    out, proc, wall = family_runs
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    walls = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("WALLS "))[6:])
    print(f"replica runs: {wall:.0f} s in all; per family {walls}")
    for backbone, (tasks, _) in FAMILIES.items():
        s = json.loads((out / backbone / "vanilla" / "r1" / "summary.json").read_text())
        assert s["status"] == "finished", backbone
        n_requests = 20 * LIMIT + (len(COLUMNS[tasks]) - 1) * LIMIT
        assert s["requests"] == n_requests and s["failed_requests"] == 0 and s["failures"] == [], (backbone, s["failures"])
        for column in COLUMNS[tasks]:  # per-task scores in the summary, on the paper's scale
            assert 0.0 <= s["scores"][column] <= 100.0, (backbone, column)
        assert ("mlvu" in s["scores"]) == (tasks == "paper")
        assert s["tokens"]["visual_after"] == s["tokens"]["visual_before"] > 0
        rows = [json.loads(line) for line in (out / backbone / "vanilla" / "r1" / "requests.jsonl").read_text().splitlines()]
        assert len(rows) == n_requests and all(r["output_tokens"] <= NEW_TOKENS for r in rows)


@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_prompts_and_parsed_answers_are_lmms_evals(replica, family_runs, backbone):
    """Each task's prompt carries the post-prompt lmms-eval gives the family's model name, and each
    answer went through the task's own process_results (its per-sample metric fields)."""
    home, _, _ = replica
    out, proc, _ = family_runs
    assert proc.returncode == 0, proc.stderr[-4000:]
    tasks, name = FAMILIES[backbone]
    cell = out / backbone / "vanilla" / "r1"
    for sub in R.MVBENCH_SOURCES:
        docs = json.loads((home / "mvbench_video" / "json" / f"{sub}.json").read_text())
        for sample in _samples(cell, f"mvbench_{sub}"):
            doc = docs[sample["doc_id"]]
            assert sample["input"] == ("Question:" + doc["question"] + "\nOption:\n" + "".join(
                f"({c}) {cand}\n" for c, cand in zip("ABCDE", doc["candidates"])) + MVBENCH_POST)
            m = sample["mvbench_accuracy"]
            assert m["gt_answer"] == "ABCDE"[doc["candidates"].index(doc["answer"])]
            assert m["score"] in (0, 1) and "failed" not in sample
    for sample in _samples(cell, "longvideobench_val_v"):
        assert sample["input"].endswith(LVB_POST)
        assert sample["lvb_acc"]["parsed_pred"] in "ABCDE" and sample["lvb_acc"]["answer"] in "ABCDE"
    videomme = _samples(cell, "videomme")
    for sample in videomme:
        text = sample["input"]
        assert text.endswith(VIDEOMME_POST.get(name, VIDEOMME_DEFAULT_POST)), (name, text[-80:])
        assert text.startswith("Question: ") == (name == "qwen3_vl")
        assert set(sample["videomme_perception_score"]) >= {"pred_answer", "answer", "duration"}
    if tasks == "paper":
        for sample in _samples(cell, "mlvu_dev"):
            assert sample["input"].endswith(MLVU_POST)
            assert set(sample["mlvu_percetion_score"]) >= {"pred_answer", "answer", "task_type"}
    else:
        assert not (cell / "samples_mlvu_dev.jsonl").exists()


def test_a_frame_folder_is_read_as_its_frames_at_3_fps(tmp_path):
    """MVBench's TVQA clips are frame folders: the wrapper encodes them once (natural name order, odd
    sizes padded to even) and the backbone's reader samples the result like any video."""
    import decord
    import numpy as np
    from PIL import Image

    from sharp.lmms.frame_folders import FRAME_FOLDER_FPS, FrameFolderVideos, frame_files

    folder = tmp_path / "clip"
    folder.mkdir()
    levels = [0, 40, 80, 120, 160, 200, 240, 20, 60, 100, 140]  # frame i is gray level levels[i]
    for i, level in enumerate(levels, start=1):
        Image.fromarray(np.full((33, 63, 3), level, np.uint8)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert [p.name for p in frame_files(folder)][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert frame_files(folder)[-1].name == "frame_11.png"  # natural order: 11 after 9, not after 1
    videos = FrameFolderVideos()
    path = videos.video(folder)
    assert videos.video(folder) == path  # encoded once
    vr = decord.VideoReader(path)
    assert len(vr) == len(levels) and vr.get_avg_fps() == pytest.approx(FRAME_FOLDER_FPS)
    frames = vr.get_batch(list(range(len(levels)))).asnumpy()
    assert frames.shape == (len(levels), 34, 64, 3)
    np.testing.assert_allclose(frames[:, :33, :63].reshape(len(levels), -1).mean(axis=1), levels, atol=3)
    videos.close()
    assert not Path(path).exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .jpg/.jpeg/.png frames"):
        FrameFolderVideos().video(tmp_path / "empty")
