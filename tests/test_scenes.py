"""The multi-scene benchmark (sharp.synthetic.scenes) and its toys (sharp/weights/toy_scenes_*): the
generator is deterministic (pinned hashes of the first docs and videos), the videos have the promised
structure, and each shipped toy answers its held-out split well unpruned. CPU, < 30 s."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import sharp
from sharp import toy
from sharp.synthetic import scenes

NAMES = [n for n in toy.TOY_BACKBONES if toy.TOY_BENCHMARKS[n] == "scenes"]
N_DOCS = 24  # the first 24 held-out docs: every question type 8 times
ACCURACY_FLOOR = 85.0

# Pinned by the generator as committed (format version 1); a change of the generator must bump
# scenes.FORMAT_VERSION and these. The frame digest was checked equal with numpy's SIMD dispatch
# on and off (NPY_DISABLE_CPU_FEATURES=X86_V3).
DOCS_SHA256 = "b8fcdeeb60e53278babbb848a09502ea7dfb90179623d6a374d7b6fbec482693"  # generate_docs("test", 24)
FRAMES_SHA256 = "d6efa70e87bc427309b8bf4e3915d478dc6a6e28e16cdbbbd160a06836b057ec"  # frames of test docs 0-2


def _docs_sha(docs) -> str:
    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()


def test_generator_is_deterministic():
    docs = scenes.generate_docs("test", N_DOCS)
    assert _docs_sha(docs) == DOCS_SHA256
    assert scenes.frames_digest(docs[:3]) == FRAMES_SHA256
    assert scenes.generate_docs("test", 3) == docs[:3]  # a split is a prefix of a larger one
    train = scenes.generate_docs("train", 3)
    assert all(a["id"] != b["id"] for a, b in zip(train, docs)) and train[0]["events"] != docs[0]["events"]


def test_videos_have_scenes_cuts_and_the_asked_event():
    docs = scenes.generate_docs("test", 36)
    assert [d["qtype"] for d in docs[:3]] == list(scenes.QTYPES)
    for q in scenes.QTYPES:  # every letter once per 12-doc block and question type
        for block in range(3):
            letters = [d["answer"] for d in docs[12 * block:12 * (block + 1)] if d["qtype"] == q]
            assert sorted(letters) == list("ABCD"), (q, block, letters)
    for d in docs:
        assert d["num_frames"] >= 16 and d["options"] == list(scenes.COLORS)
        bounds = [(s["start"], s["end"]) for s in d["scenes"]]
        assert bounds[0][0] == 0 and bounds[-1][1] == d["num_frames"]
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous: hard cuts
        assert all((e - s) % 2 == 0 and e - s >= 6 for s, e in bounds)  # whole Qwen2-VL temporal patches
        assert len({s["background"] for s in d["scenes"]}) == len(bounds)
        target = [e for e in d["events"] if e["role"] == "target"]
        assert len(target) == 1 and target[0]["color"] == d["answer_text"]
        t = target[0]
        scene_of = scenes.scene_of_frame(d)
        if d["qtype"] == "cut":
            cut = d["cuts"][d["target_scene"]]
            assert t["start"] <= cut - 3 and t["end"] >= cut + 3  # spans the cut, 3+ frames each side
            for e in d["events"]:
                if e is not t:  # distractors: inside one scene, away from the cut's two scenes
                    k = scene_of[e["start"]]
                    assert scene_of[e["end"] - 1] == k and k not in (d["target_scene"], d["target_scene"] + 1)
        else:
            k = d["target_scene"]
            assert scene_of[t["start"]] == scene_of[t["end"] - 1] == k
            named = d["scenes"][k]["background"] if d["qtype"] == "scene" else scenes.SCENE_ORDINALS[k]
            assert f"the {named} scene" in d["question"]
    frames = scenes.render_video(docs[0])
    assert frames.shape == (32, 168, 168, 3)
    # a hard cut: consecutive frames across a cut differ far more than within a scene
    diff = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    cuts = np.asarray(docs[0]["cuts"]) - 1
    assert diff[cuts].min() > 5 * np.median(diff)


@pytest.fixture(scope="module")
def held_out():
    return scenes.ensure_split("test", n=N_DOCS)


@pytest.fixture(scope="module")
def shipped():
    """name -> (backbone, vanilla EvalResult on the first N_DOCS held-out docs), evaluated once."""
    return {}


def _scored(name, held_out, shipped, tmp_path_factory):
    if name not in shipped:
        bb = sharp.load_backbone(name, device="cpu")
        store = toy.cached_pixels(bb, held_out, tmp_path_factory.mktemp(f"scenes_{name}"))
        shipped[name] = (bb, toy.evaluate(bb, held_out, "vanilla", 1.0, store=store, batch_size=8))
    return shipped[name]


@pytest.mark.parametrize("name", NAMES)
def test_toy_is_deeper_with_512_visual_tokens(name, held_out, shipped, tmp_path_factory):
    meta = json.loads((toy.WEIGHTS_DIR / name / "metadata.json").read_text())
    assert json.loads((toy.WEIGHTS_DIR / name / "config.json").read_text()) == toy.toy_config(name)
    assert json.loads((toy.WEIGHTS_DIR / name / "backbone.json").read_text())["words"] == toy.toy_words(name)
    bb, res = _scored(name, held_out, shipped, tmp_path_factory)
    assert bb.num_layers >= 8
    assert res.n_visual >= 512 and res.n_visual == meta["visual_tokens"]
    assert res.kept_counts == [res.n_visual] * len(held_out)


@pytest.mark.parametrize("name", NAMES)
def test_toy_answers_held_out_split_unpruned(name, held_out, shipped, tmp_path_factory):
    _, res = _scored(name, held_out, shipped, tmp_path_factory)
    assert res.accuracy >= ACCURACY_FLOOR, (res.accuracy, res.per_qtype, res.preds, res.answers)
    meta = json.loads((toy.WEIGHTS_DIR / name / "metadata.json").read_text())
    assert meta["test_accuracy"] >= ACCURACY_FLOOR and meta["test_docs"] >= 200  # the whole held-out split


def test_probe_targets_follow_the_docs(held_out, shipped, tmp_path_factory):
    """The training-only targets of the scenes toys, against the docs read directly: each visual token's
    background is its frame's scene's (``labels.background``), and the question probe's word class names the
    word that stands in the question (a background, an ordinal, or none for ``cut``)."""
    from sharp.toy.probes import asked_word

    bb, _ = _scored(NAMES[0], held_out, shipped, tmp_path_factory)
    layout = bb.layout(toy.make_batch(bb, held_out, toy.cached_pixels(bb, held_out[:1], tmp_path_factory.mktemp("p")), [0]))
    words = list(scenes.BACKGROUNDS) + list(scenes.SCENE_ORDINALS)
    for doc in held_out:
        labels = toy.visual_token_labels(bb, doc, layout.grid)
        first_frames = bb.visual_frame_indices(doc["num_frames"], doc.get("fps"))[:, 0]
        expected = [next(sc["background"] for sc in doc["scenes"] if sc["start"] <= f < sc["end"]) for f in first_frames]
        got = labels["background"].view(len(first_frames), -1)
        assert (got == got[:, :1]).all()  # one background per frame
        assert [list(scenes.BACKGROUNDS)[i] for i in got[:, 0].tolist()] == expected
        word = asked_word(doc)
        if doc["qtype"] == "cut":
            assert word == len(words)
        else:
            assert f"the {words[word]} scene" in doc["question"]


@pytest.mark.parametrize("background", ["linear", "words"])
def test_training_with_every_probe_runs(tmp_path, background):
    """scripts/train_toy.py (``sharp.toy.training.main``) on a scenes toy with the background (its own head, or
    the background words' input embeddings) and question probes, 2 steps of 2 videos: weights written, settings
    recorded, loss finite."""
    import torch

    from sharp.toy import training

    threads = torch.get_num_threads()
    try:
        assert training.main(["--backbone", NAMES[0], "--steps", "2", "--batch-size", "2", "--train-n", "4",
                              "--test-n", "2", "--train-eval-n", "2", "--log-every", "1",
                              "--qtype-weights", '{"scene": 2}', "--background-probe", background,
                              "--out-dir", str(tmp_path / "w"),
                              "--cache-dir", str(tmp_path / "cache")]) == 0
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((tmp_path / "w" / NAMES[0] / "metadata.json").read_text())
    assert meta["background_probe"] == background and meta["question_probe"] is True and meta["qtype_weights"] == {"scene": 2}
    assert all(np.isfinite(h["loss"]) and h["aux"] > 0 for h in meta["history"]) and meta["steps"] == 2
