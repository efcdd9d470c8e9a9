"""Synthetic temporal video MCQ benchmark and its lmms-eval task (CPU, offline, < 60 s)."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sharp.synthetic import QTYPES, TASK_DIR, ensure_split, generate_docs, sampled_frame_indices
from sharp.synthetic import benchmark as bench

from lmms_helpers import fake_video_model, synthetic_task_manager, task_results, use_offline_synthetic


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _decode(path: str) -> np.ndarray:
    import av

    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _strip_video(docs):
    return [{k: v for k, v in d.items() if k != "video"} for d in docs]


# ----------------------------------------------------------------------------- generator


def test_docs_schema_and_prompt():
    docs = generate_docs("test", 10)
    assert [d["qtype"] for d in docs[:5]] == list(QTYPES)
    for d in docs:
        assert len(d["options"]) == 4 and len(set(d["options"])) == 4
        assert d["answer"] in "ABCD"
        assert d["options"]["ABCD".index(d["answer"])] == d["answer_text"]
        lines = d["prompt"].split("\n")
        assert lines[0] == d["question"]
        assert lines[1:5] == [f"{l}. {o}" for l, o in zip("ABCD", d["options"])]
        assert lines[5] == "Answer with the option's letter from the given choices directly."
        assert d["num_frames"] == (64 if d["qtype"] == "long" else 32)
        assert d["height"] % 2 == 0 and d["width"] % 2 == 0
        assert d["event_frames"]


def test_generation_is_deterministic_and_prefix_stable():
    a, b = generate_docs("test", 12, seed=3), generate_docs("test", 12, seed=3)
    assert a == b
    assert generate_docs("test", 5, seed=3) == a[:5]
    assert generate_docs("test", 12, seed=4) != a
    # "default" is the first docs of "test"
    assert generate_docs("default", 6) == generate_docs("test", 6)
    for d in a[:5]:
        assert np.array_equal(bench.render_video(d), bench.render_video(d))


def test_splits_are_disjoint():
    def sig(d):
        return json.dumps([d["qtype"], d["question"], d["options"], d["events"], d["scene"]], sort_keys=True)

    train, test = generate_docs("train", 300), generate_docs("test", 200)
    assert not {d["id"] for d in train} & {d["id"] for d in test}
    assert not {sig(d) for d in train} & {sig(d) for d in test}
    assert len({sig(d) for d in test}) == len(test)
    with pytest.raises(ValueError):
        generate_docs("validation", 2)


def test_answer_letters_balanced():
    docs = generate_docs("test", 200)
    assert collections.Counter(d["answer"] for d in docs) == {l: 50 for l in "ABCD"}
    per_q = collections.Counter((d["qtype"], d["answer"]) for d in docs)
    assert all(per_q[(q, l)] == 10 for q in QTYPES for l in "ABCD")
    for k in range(0, 200, 4):  # every aligned block of 4 docs uses each letter once
        assert sorted(d["answer"] for d in docs[k : k + 4]) == list("ABCD")
    train = generate_docs("train", 100)
    assert collections.Counter(d["answer"] for d in train) == {l: 25 for l in "ABCD"}


def test_events_hit_uniformly_sampled_frames():
    for d in generate_docs("test", 200) + generate_docs("train", 100):
        idx = set(sampled_frame_indices(d["num_frames"], 32).tolist())
        assert len(idx) == 32
        for e in d["events"]:
            assert 0 <= e["start"] < e["end"] <= d["num_frames"]
            hits = idx & set(range(e["start"], e["end"]))
            assert len(hits) >= 2, (d["id"], e)
        # objects never overlap in time
        spans = sorted((e["start"], e["end"]) for e in d["events"])
        assert all(s1 >= e0 for (_, e0), (s1, _) in zip(spans, spans[1:]))
        if d["subtype"] == "quarter":
            q = d["num_frames"] // 4
            target = [e for e in d["events"] if e["role"] == "target"][0]
            assert target["start"] // q == (target["end"] - 1) // q == "ABCD".index(d["answer"])
        if d["qtype"] == "count":
            assert sum(e["role"] == "target" for e in d["events"]) == "ABCD".index(d["answer"]) + 1
        if d["qtype"] == "order":
            first, last = sorted(d["events"], key=lambda e: e["start"])
            assert first["color"] != last["color"]
            e = first if d["subtype"] == "first" else last
            assert d["answer_text"] == e["color"]
        if d["subtype"] == "color":
            assert [e["color"] for e in d["events"]] == [d["answer_text"]]
        if d["qtype"] == "temporal":
            target, distractor = d["events"]
            assert target["color"] != distractor["color"] and target["shape"] != distractor["shape"]
            assert f"the {target['color']} {target['shape']}" in d["question"]


def test_options_in_fixed_order_per_type():
    """The answer letter follows from the content: options are listed in one fixed order per type."""
    by_type = collections.defaultdict(set)
    for d in generate_docs("test", 100):
        by_type[d["qtype"], d["subtype"]].add(tuple(d["options"]))
    assert all(len(v) == 1 for v in by_type.values()), by_type
    assert by_type["count", "count"] == {("1", "2", "3", "4")}
    assert by_type["temporal", "quarter"] == {bench.QUARTER_OPTIONS}
    assert by_type["order", "first"] == {tuple(bench.COLORS)}


# ----------------------------------------------------------------------------- files and cache


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, ensure_split("test", n=5, seed=0, cache_dir=root)


def test_videos_match_metadata(small_split):
    _, docs = small_split
    for d in docs:
        assert os.path.isabs(d["video"]) and d["video"].endswith(".mp4")
        frames = _decode(d["video"])
        assert frames.shape == (d["num_frames"], d["height"], d["width"], 3)
        # the same frames an LLaVA-OV style sampler keeps
        sampled = frames[sampled_frame_indices(d["num_frames"], 32)]
        assert sampled.shape[0] == 32
        for e in d["events"]:
            color = np.array(bench.COLORS[e["color"]])
            for t in range(d["num_frames"]):
                px = frames[t, e["cy"], e["cx"]].astype(int)
                covered = any(o["start"] <= t < o["end"] and bench._shape_mask(o["shape"], o["cx"], o["cy"], o["size"])[e["cy"], e["cx"]] for o in d["events"])
                if e["start"] <= t < e["end"]:
                    assert np.abs(px - color).max() <= 40, (d["id"], t)
                elif not covered:
                    assert np.abs(px - color).max() > 60, (d["id"], t)


def test_ensure_split_deterministic_bytes(small_split, tmp_path):
    _, docs = small_split
    again = ensure_split("test", n=5, seed=0, cache_dir=tmp_path)
    assert _strip_video(again) == _strip_video(docs)
    assert [_sha(d["video"]) for d in again] == [_sha(d["video"]) for d in docs]
    assert _strip_video(docs) == _strip_video([{**d, "video": ""} for d in generate_docs("test", 5)])


def test_ensure_split_idempotent_and_repairs(tmp_path):
    docs = ensure_split("default", n=3, cache_dir=tmp_path)
    d = Path(docs[0]["video"]).parent.parent
    manifest = d / "manifest.json"
    stamp = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    assert ensure_split("default", n=3, cache_dir=tmp_path) == docs
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} == stamp  # nothing rewritten

    # half-written dataset (no manifest, a missing video): regenerated
    manifest.unlink()
    Path(docs[1]["video"]).unlink()
    assert ensure_split("default", n=3, cache_dir=tmp_path) == docs
    assert manifest.is_file() and all(Path(x["video"]).is_file() for x in docs)
    # manifest present but a video lost: regenerated too
    Path(docs[2]["video"]).unlink()
    assert ensure_split("default", n=3, cache_dir=tmp_path) == docs
    assert Path(docs[2]["video"]).is_file()
    # garbage manifest
    manifest.write_text("{not json")
    assert ensure_split("default", n=3, cache_dir=tmp_path) == docs
    assert json.loads(manifest.read_text())["n"] == 3


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from sharp.paths import cache_dir

    monkeypatch.setenv("SHARP_CACHE", str(tmp_path))
    assert bench.default_cache_dir() == tmp_path / "synthetic" == cache_dir("synthetic")  # the one cache root
    docs = ensure_split("test", n=1)
    assert Path(docs[0]["video"]).is_relative_to(tmp_path.resolve() / "synthetic")
    monkeypatch.delenv("SHARP_CACHE")
    assert bench.default_cache_dir() == Path("~/.cache/sharp/synthetic").expanduser()


# ----------------------------------------------------------------------------- lmms-eval task


def _task_utils():
    spec = importlib.util.spec_from_file_location("sharp_synthetic_task_utils", Path(TASK_DIR) / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("B.", "B"),
        (" (C) in the third quarter", "C"),
        ("D) 4", "D"),
        ("**A**", "A"),
        ("Answer: C", "C"),
        ("The answer is (D).", "D"),
        ("The correct option is B. red", "B"),
        ("<think>maybe A</think>C", "C"),
        ("red", "B"),  # spelled-out option text
        ("I think it is the circle", ""),
        ("", ""),
    ],
)
def test_extract_letter(text, letter):
    assert _task_utils().extract_letter(text, ["blue", "red", "green", "yellow"]) == letter


def test_doc_to_text_uses_pre_post_prompt():
    u = _task_utils()
    doc = generate_docs("test", 1)[0]
    assert u.sharp_synthetic_doc_to_text(doc, {"pre_prompt": "", "post_prompt": bench.ANSWER_INSTRUCTION}) == doc["prompt"]
    txt = u.sharp_synthetic_doc_to_text(doc, {"pre_prompt": "PRE ", "post_prompt": "POST"})
    assert txt.startswith("PRE " + doc["question"]) and txt.endswith("\nPOST")


@pytest.fixture(scope="module")
def task_manager():
    return synthetic_task_manager()


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    return use_offline_synthetic(monkeypatch, tmp_path, 20)


def test_task_registered(task_manager):
    assert {"sharp_synthetic", "sharp_synthetic_default"} <= set(task_manager.all_tasks)


def test_lmms_eval_oracle_scores_100(task_manager, offline_env):
    model = fake_video_model(lambda doc: f"{doc['answer']}. {doc['answer_text']}")
    r = task_results(model, "sharp_synthetic", task_manager, limit=10)
    assert r["accuracy,none"] == 100.0
    for q in QTYPES:
        assert r[f"accuracy_{q},none"] == 100.0
    assert len(model.requests) == 10
    ctx, gen_kwargs, doc = model.requests[0]
    assert ctx == doc["prompt"]
    assert gen_kwargs["max_new_tokens"] == 16 and gen_kwargs["do_sample"] is False
    assert Path(doc["video"]).is_relative_to((offline_env / "cache").resolve())


def test_lmms_eval_constant_answer_is_chance(task_manager, offline_env):
    r = task_results(fake_video_model(lambda doc: "A"), "sharp_synthetic", task_manager)  # 20 docs
    assert r["accuracy,none"] == 25.0
    r = task_results(fake_video_model(lambda doc: "The answer is (B)"), "sharp_synthetic_default", task_manager)
    assert r["accuracy,none"] == 25.0
    assert all(r[f"accuracy_{q},none"] == 25.0 for q in QTYPES)
