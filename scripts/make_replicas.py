"""Miniature replicas of the paper's four benchmarks, laid out as lmms-eval 0.7.3's tasks read them.

    python scripts/make_replicas.py --hf-home /tmp/hf_replica [--docs 2] [--benchmarks mvbench,videomme]
    HF_HOME=/tmp/hf_replica HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        python run.py backbone=tiny_llava_onevision tasks=paper limit=2

A replica is a TEST FIXTURE, never a result: the questions are placeholders about short synthetic
videos (moving squares), the answers arbitrary. It checks the path a real evaluation takes: lmms-eval's
own task code loads the annotations offline from the Hugging Face caches, its ``doc_to_visual`` finds
the videos where a pre-warmed ``HF_HOME`` has them, its ``doc_to_text`` builds the prompts (with the
post-prompt it gives the model id), our wrapper answers and the task's ``process_results`` /
aggregation score the answers. What only the real data can check: the real videos' codecs, lengths,
resolutions and frame rates, the real columns' values, and every score.

What is written under ``--hf-home`` (per benchmark; the task files named are lmms-eval 0.7.3's):

- ``hub/datasets--<org>--<name>/{refs/<revision>, snapshots/<commit>/...}``: the hub snapshot with the
  repository's file layout (annotation files where the hub has them; a dataset card whose ``configs``
  name the subsets, as MVBench's does), the commit a fixed fake hash.
- ``datasets/<org>___<name>/<config>/0.0.0/<commit>/``: the arrow cache that ``datasets.load_dataset``
  writes on a first online load; offline (``HF_DATASETS_OFFLINE=1``) lmms-eval's ``load_dataset`` reads
  exactly this. Built here by ``datasets`` itself from the snapshot's files (so columns and splits are
  what the files give).
- the videos where each task's ``utils.py`` looks:

  ============== =========================== ================================================================
  task           dataset (revision)          videos
  ============== =========================== ================================================================
  mvbench_*      OpenGVLab/MVBench (video)   ``mvbench_video/<source folder>/<video>`` (``DATA_LIST`` in
                                             ``tasks/mvbench/utils.py``); ``mvbench_video`` links to the
                                             snapshot, as the task's ``create_link`` leaves it. The
                                             episodic_reasoning source (TVQA) is a frame folder
                                             (``<clip>/00001.jpg``..., 3 fps, as MVBench ships TVQA)
  longvideobench longvideobench/             ``datasets/longvideobench/videos/<video_path>``
  _val_v         LongVideoBench (main)       (``validation-00000-of-00001.parquet``)
  mlvu_dev       sy1998/MLVU_dev (main)      ``mlvu/<video_name>`` (``mlvu/test-00000-of-00001.parquet``)
  videomme       lmms-eval/Video-MME (main)  ``videomme/data/<videoID>.mp4`` (+ ``videomme/subtitle/
                                             <videoID>.srt``; ``videomme/test-00000-of-00001.parquet``)
  ============== =========================== ================================================================

``--docs N`` docs per MVBench subtask, per MLVU task type, per VideoMME duration and per LongVideoBench
duration group (default 2). Writing all four takes a few seconds; the folder is about 1 MB.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import string
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sharp.harness.benchmarks import BENCHMARKS  # noqa: E402  (hub ids, revisions, video folders, task names)

BENCHMARK_ORDER = ("mvbench", "videomme", "mlvu", "longvideobench")
BENCHMARK = {b.column: b for b in BENCHMARKS.values()}  # replica name (the paper's column) -> its Benchmark
DEFAULT_DOCS = 2  # docs per MVBench subtask / MLVU task type / VideoMME duration / LongVideoBench group

# tasks/mvbench/utils.py DATA_LIST: subtask -> folder under $HF_HOME/mvbench_video
MVBENCH_SOURCES = {
    "object_interaction": "star/Charades_segment",
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video",
    "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4",
    "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
# MVBench subtasks whose annotations bound the clip (start/end seconds), as the benchmark's json files do
MVBENCH_BOUNDED = ("action_sequence", "action_prediction", "object_interaction", "action_localization",
                   "episodic_reasoning")
MVBENCH_FRAME_FOLDERS = ("episodic_reasoning",)  # TVQA: frames extracted at 3 fps

# tasks/mlvu/utils.py mlvu_aggregate_results_dev TASK_TYPES
MLVU_TASK_TYPES = ("plotQA", "needle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")
# tasks/videomme/utils.py: VIDEO_TYPE and valid (domain, sub_category, task_type) values
VIDEOMME_DURATIONS = ("short", "medium", "long")
VIDEOMME_CELLS = (("Knowledge", "Humanity & History", "Counting Problem"),
                  ("Film & Television", "Animation", "Action Recognition"),
                  ("Sports Competition", "Basketball", "Temporal Reasoning"),
                  ("Life Record", "Daily Life", "Object Recognition"))
LVB_DURATION_GROUPS = (15, 60, 600, 3600)
LVB_CATEGORIES = ("S2E", "T2O", "E2O", "O3O")

SIZE = (64, 96)   # (H, W) of the synthetic videos: even (yuv420p), small
FRAMES, FPS = 32, 8  # 4 s: LLaVA-OV's 32 uniform frames without repeats


def commit_of(repo_id: str) -> str:
    """A fixed fake commit hash per replica repository (40 hex digits, like the hub's)."""
    return hashlib.sha1(f"sharp-replica:{repo_id}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------- videos
def synthetic_frames(seed: int, frames: int = FRAMES, size: tuple[int, int] = SIZE) -> np.ndarray:
    """(T, H, W, 3) uint8: a colored square crossing a gray background (one per seed)."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = np.full((frames, h, w, 3), 96, np.uint8)
    color = rng.integers(64, 256, 3).astype(np.uint8)
    side = h // 4
    y = int(rng.integers(0, h - side))
    for t in range(frames):
        x = int(round(t * (w - side) / max(frames - 1, 1)))
        out[t, y:y + side, x:x + side] = color
    return out


def write_mp4(path: Path, seed: int) -> None:
    from sharp.backbones.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, synthetic_frames(seed), fps=FPS)


def write_frame_folder(path: Path, seed: int) -> None:
    """A clip as numbered jpg frames (MVBench's TVQA frame folders)."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(synthetic_frames(seed), start=1):
        Image.fromarray(frame).save(path / f"{i:05d}.jpg", quality=95)


# ------------------------------------------------------------------------------ hub + datasets caches
def snapshot_dir(hf_home: Path, repo_id: str, revision: str = "main") -> Path:
    """Create ``hub/datasets--<org>--<name>/refs/<revision>`` and return its (empty) snapshot folder."""
    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit
    if snap.exists():
        shutil.rmtree(snap)
    snap.mkdir(parents=True)
    return snap


def dataset_card(repo_id: str, configs: Optional[dict[str, dict[str, str]]] = None) -> str:
    """README.md: ``configs`` (config -> split -> file) in the card's YAML, and the fixture notice."""
    lines = ["---", f"pretty_name: replica of {repo_id}"]
    if configs:
        lines.append("configs:")
        for name, splits in configs.items():
            lines += [f"- config_name: {name}", "  data_files:"]
            for split, path in splits.items():
                lines += [f"  - split: {split}", f"    path: {path}"]
    lines.append("---")
    lines.append(f"# Replica of {repo_id} (scripts/make_replicas.py): a test fixture, never a result.")
    return "\n".join(lines) + "\n"


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def cache_dataset(hf_home: Path, repo_id: str, snap: Path, config: Optional[str] = None) -> Path:
    """The ``datasets`` arrow cache of one config, as a first online ``load_dataset(repo_id, config)``
    leaves it (``datasets/<org>___<name>/<config>/0.0.0/<commit>``), built by ``datasets`` from the
    snapshot's files and its card's ``configs``."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    cache = hf_home / "datasets"
    builder = datasets.load_dataset_builder(str(snap), name=config, cache_dir=str(cache))
    builder.dataset_name = camelcase_to_snakecase(repo_id.split("/")[-1])  # as the hub module names it
    builder.repo_id = repo_id
    builder.hash = commit_of(repo_id)
    builder.info.dataset_name = builder.dataset_name
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return Path(builder.cache_dir)


# ------------------------------------------------------------------------------------- benchmarks
def _letters(n: int) -> str:
    return string.ascii_uppercase[:n]


def _numbered_docs(kinds, docs: int, first_seed: int):
    """``(k, kind, i, n, seed)`` for ``docs`` docs of each kind: kind index k, doc i within the kind,
    n = k * docs + i over all, and a video seed counting up from ``first_seed + 1``."""
    for k, kind in enumerate(kinds):
        for i in range(docs):
            n = k * docs + i
            yield k, kind, i, n, first_seed + 1 + n


def make_mvbench(hf_home: Path, docs: int) -> dict:
    """OpenGVLab/MVBench, revision ``video``: ``json/<subtask>.json`` (split ``train``) and the source
    folders in the snapshot; ``$HF_HOME/mvbench_video`` -> the snapshot (the task's create_link)."""
    bench = BENCHMARK["mvbench"]
    repo_id = bench.dataset
    snap = snapshot_dir(hf_home, repo_id, revision=bench.revision)
    configs = {}
    seed = 0
    for sub, folder in MVBENCH_SOURCES.items():
        rows = []
        for i in range(docs):
            seed += 1
            candidates = [f"{sub.replace('_', ' ')} option {c}" for c in _letters(3 + i % 2)]
            name = f"{sub}_{i:03d}" + ("" if sub in MVBENCH_FRAME_FOLDERS else ".mp4")
            row = {"video": name, "question": f"What happens in clip {i} ({sub.replace('_', ' ')})?",
                   "candidates": candidates, "answer": candidates[seed % len(candidates)]}
            if sub in MVBENCH_BOUNDED:
                row.update(start=0.0, end=FRAMES / FPS)
            rows.append(row)
            if sub in MVBENCH_FRAME_FOLDERS:
                write_frame_folder(snap / folder / name, seed)
            else:
                write_mp4(snap / folder / name, seed)
        (snap / "json").mkdir(exist_ok=True)
        (snap / "json" / f"{sub}.json").write_text(json.dumps(rows, indent=1))
        configs[sub] = {"train": f"json/{sub}.json"}
    (snap / "README.md").write_text(dataset_card(repo_id, configs))
    for sub in MVBENCH_SOURCES:
        cache_dataset(hf_home, repo_id, snap, sub)
    link = hf_home / bench.video_dir
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(snap, target_is_directory=True)
    return {"tasks": len(MVBENCH_SOURCES), "docs": len(MVBENCH_SOURCES) * docs}


def make_videomme(hf_home: Path, docs: int) -> dict:
    """lmms-eval/Video-MME: ``videomme/test-00000-of-00001.parquet`` (split ``test``); videos
    ``$HF_HOME/videomme/data/<videoID>.mp4``, subtitles ``$HF_HOME/videomme/subtitle/<videoID>.srt``."""
    repo_id = BENCHMARK["videomme"].dataset
    snap = snapshot_dir(hf_home, repo_id)
    videos = hf_home / BENCHMARK["videomme"].video_dir
    rows = []
    for _, duration, _, n, seed in _numbered_docs(VIDEOMME_DURATIONS, docs, 1000):
        domain, sub_category, task_type = VIDEOMME_CELLS[n % len(VIDEOMME_CELLS)]
        video_id = f"replica{n:04d}"
        answer = "ABCD"[seed % 4]
        rows.append({"video_id": f"{n + 1:03d}", "duration": duration, "domain": domain,
                     "sub_category": sub_category, "url": f"https://example.invalid/{video_id}",
                     "videoID": video_id, "question_id": f"{n + 1:03d}-1", "task_type": task_type,
                     "question": f"What color is the moving square in video {n}?",
                     "options": [f"{c}. color {c.lower()}" for c in "ABCD"], "answer": answer})
        write_mp4(videos / "data" / f"{video_id}.mp4", seed)
        srt = (f"1\n00:00:00,000 --> 00:00:01,000\n<font color=\"white\" size=\".72c\">replica subtitle {n}"
               "</font>\n\n")
        (videos / "subtitle").mkdir(parents=True, exist_ok=True)
        (videos / "subtitle" / f"{video_id}.srt").write_text(srt)
    write_parquet(snap / "videomme" / "test-00000-of-00001.parquet", rows)
    (snap / "README.md").write_text(dataset_card(repo_id))
    cache_dataset(hf_home, repo_id, snap)
    return {"tasks": 1, "docs": len(rows)}


def make_mlvu(hf_home: Path, docs: int) -> dict:
    """sy1998/MLVU_dev: ``mlvu/test-00000-of-00001.parquet`` (split ``test``); videos
    ``$HF_HOME/mlvu/<video_name>``. Questions carry their options, answers are letters (the task's
    ``mlvu_doc_to_text`` uses the question alone and compares the parsed letter with ``answer``)."""
    repo_id = BENCHMARK["mlvu"].dataset
    snap = snapshot_dir(hf_home, repo_id)
    videos = hf_home / BENCHMARK["mlvu"].video_dir
    rows = []
    for t, task_type, i, _, seed in _numbered_docs(MLVU_TASK_TYPES, docs, 2000):
        candidates = [f"answer {c.lower()}" for c in "ABCD"]
        options = "\n".join(f"({c}) {cand}" for c, cand in zip("ABCD", candidates))
        name = f"{t + 1}_{task_type}_{i:03d}.mp4"
        rows.append({"video_name": name, "duration": FRAMES / FPS,
                     "question": f"Which answer fits the {task_type} question {i}?\n{options}",
                     "candidates": candidates, "answer": "ABCD"[seed % 4], "task_type": task_type,
                     "question_id": f"{task_type}_{i}"})
        write_mp4(videos / name, seed)
    write_parquet(snap / "mlvu" / "test-00000-of-00001.parquet", rows)
    (snap / "README.md").write_text(dataset_card(repo_id))
    cache_dataset(hf_home, repo_id, snap)
    return {"tasks": 1, "docs": len(rows)}


def make_longvideobench(hf_home: Path, docs: int) -> dict:
    """longvideobench/LongVideoBench: ``validation-00000-of-00001.parquet`` (split ``validation``) and
    ``test-00000-of-00001.parquet``; videos ``$HF_HOME/datasets/longvideobench/videos/<video_path>``,
    subtitles ``.../subtitles/<subtitle_path>``. Options are ``option0..option4`` ("N/A" when absent)."""
    repo_id = BENCHMARK["longvideobench"].dataset
    snap = snapshot_dir(hf_home, repo_id)
    root = hf_home / BENCHMARK["longvideobench"].video_dir
    rows = []
    for _, group, _, n, seed in _numbered_docs(LVB_DURATION_GROUPS, docs, 3000):
        video_id = f"replica{n:04d}"
        n_options = 4 + n % 2
        candidates = [f"event {c.lower()}" for c in _letters(n_options)]
        row = {"video_id": video_id, "question": f"What happens after the square appears ({n})?",
               "question_wo_referring_query": f"What happens ({n})?", "candidates": candidates,
               "correct_choice": seed % n_options, "position": [1], "topic_category": "replica",
               "question_category": LVB_CATEGORIES[n % len(LVB_CATEGORIES)], "level": "L1-Perception",
               "id": f"{video_id}_0", "video_path": f"{video_id}.mp4", "subtitle_path": f"{video_id}_en.json",
               "duration_group": group, "starting_timestamp_for_subtitles": 0.0,
               "duration": FRAMES / FPS, "view_count": 0}
        row.update({f"option{k}": candidates[k] if k < n_options else "N/A" for k in range(5)})
        rows.append(row)
        write_mp4(root / "videos" / row["video_path"], seed)
        (root / "subtitles").mkdir(parents=True, exist_ok=True)
        (root / "subtitles" / row["subtitle_path"]).write_text(
            json.dumps([{"start": "00:00:00.000", "end": "00:00:01.000", "line": f"replica line {n}"}]))
    write_parquet(snap / "validation-00000-of-00001.parquet", rows)
    test = [{**r, "correct_choice": -1} for r in rows[:1]]
    write_parquet(snap / "test-00000-of-00001.parquet", test)
    (snap / "README.md").write_text(dataset_card(repo_id))
    cache_dataset(hf_home, repo_id, snap)
    return {"tasks": 1, "docs": len(rows)}


MAKERS: dict[str, Callable[[Path, int], dict]] = {
    "mvbench": make_mvbench, "videomme": make_videomme, "mlvu": make_mlvu, "longvideobench": make_longvideobench,
}


def make_replicas(hf_home, docs: int = DEFAULT_DOCS, benchmarks=BENCHMARK_ORDER) -> dict[str, dict]:
    """Write the replicas of ``benchmarks`` under ``hf_home``; returns per benchmark its task and doc counts."""
    if docs < 1:
        raise ValueError(f"docs={docs}; accepted values: an integer >= 1")
    unknown = sorted(set(benchmarks) - set(MAKERS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; accepted values: {', '.join(BENCHMARK_ORDER)}")
    hf_home = Path(hf_home).expanduser().resolve()
    hf_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # "Repo card metadata block was not found" for cards without YAML
    made = {b: MAKERS[b](hf_home, docs) for b in BENCHMARK_ORDER if b in benchmarks}
    for lock in (hf_home / "datasets").glob("*.lock"):  # the builders' locks of the snapshot-named caches
        lock.unlink()
    return made


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-home", required=True, help="the HF_HOME to write (created if missing)")
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS,
                        help=f"docs per subtask / task type / duration (default {DEFAULT_DOCS})")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARK_ORDER),
                        help=f"comma-separated subset of {','.join(BENCHMARK_ORDER)} (default: all)")
    args = parser.parse_args(argv)
    try:
        made = make_replicas(args.hf_home, args.docs, [b.strip() for b in args.benchmarks.split(",") if b.strip()])
    except ValueError as err:
        parser.error(str(err))
    home = Path(args.hf_home).expanduser().resolve()
    for bench, info in made.items():
        print(f"{bench:<15} task {BENCHMARK[bench].task:<22} {info['docs']:>3} docs ({info['tasks']} task(s))")
    print(f"replica written under HF_HOME={home} (a test fixture, never a result); run e.g.\n"
          f"  HF_HOME={home} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python run.py backbone=tiny_llava_onevision "
          "tasks=paper limit=2")


if __name__ == "__main__":
    main()
