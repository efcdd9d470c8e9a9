"""The shipped toy video LLMs (sharp/weights/toy_*): they load, answer the synthetic benchmark well
unpruned, and pruning runs on them with the right token budgets. Trains nothing; CPU, < 60 s."""
from __future__ import annotations

import json

import pytest
import torch

import sharp
from sharp import toy
from sharp.methods import budget

NAMES = [n for n in toy.TOY_BACKBONES if toy.TOY_BENCHMARKS[n] == "benchmark"]  # scenes toys: test_scenes.py
N_DOCS = 40  # the first 40 test docs: every question type 8 times
VANILLA_FLOOR = 90.0  # the shipped toys score >= 95% on the whole test split (metadata.json)
_CACHE: dict = {}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    from sharp.synthetic import ensure_split

    return ensure_split("test", n=N_DOCS)


def loaded(name, docs, tmp_path_factory):
    if name not in _CACHE:
        bb = sharp.load_backbone(name, device="cpu")
        store = toy.cached_pixels(bb, docs, tmp_path_factory.mktemp(f"toycache_{name}"))
        _CACHE[name] = (bb, store)
    return _CACHE[name]


@pytest.fixture(scope="module")
def evaluated(docs, tmp_path_factory):
    """toy.evaluate(name, method, retention) on the docs, each evaluation run once for the module."""
    results = {}

    def get(name, method, retention):
        if (name, method, retention) not in results:
            bb, store = loaded(name, docs, tmp_path_factory)
            results[name, method, retention] = toy.evaluate(bb, docs, method, retention, store=store, batch_size=4)
        return results[name, method, retention]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_shipped_files(name):
    d = toy.WEIGHTS_DIR / name
    assert json.loads((d / "backbone.json").read_text())["kind"] == toy.TOY_BACKBONES[name]
    assert json.loads((d / "config.json").read_text()) == toy.toy_config(name)
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["test_accuracy"] >= 95.0, meta["test_accuracy"]
    assert (d / "model.safetensors").stat().st_size < 8 * 2**20  # a few MB
    assert name in sharp.backbone_names()


@pytest.mark.parametrize("name", NAMES)
def test_word_tokenizer_round_trip(name, docs, tmp_path_factory):
    """One token per prompt word (the toys' vocabulary), exact decoding, and byte fallback."""
    bb, _ = loaded(name, docs, tmp_path_factory)
    meta = json.loads((toy.WEIGHTS_DIR / name / "backbone.json").read_text())
    assert meta["words"] == toy.toy_words()  # the vocabulary is a function of the benchmark
    text = toy.question_text(docs[0])
    ids = bb.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bb.tokenizer.decode(ids) == text
    assert len(ids) < len(text.split()) * 2 + 12  # words, not bytes
    odd = "Zyxw quux? 42"
    assert bb.tokenizer.decode(bb.tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd
    assert max(ids) < bb.text_config.vocab_size


@pytest.mark.parametrize("name", NAMES)
def test_pixel_cache_matches_prepare(name, docs, tmp_path_factory):
    """Cached preprocessing is bit-identical to Backbone.prepare (what the harness feeds)."""
    bb, store = loaded(name, docs, tmp_path_factory)
    for i in (0, 4):
        ref = bb.prepare(docs[i]["video"], toy.question_text(docs[i]))
        got = toy.make_batch(bb, docs, store, [i])
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_vanilla_accuracy_floor(name, docs, evaluated):
    res = evaluated(name, "vanilla", 1.0)
    assert res.accuracy >= VANILLA_FLOOR, (res.accuracy, res.per_qtype, res.preds, res.answers)
    assert res.kept_counts == [res.n_visual] * len(docs)


@pytest.mark.parametrize("name", NAMES)
def test_fastv_budget_and_degradation(name, docs, evaluated):
    res = evaluated(name, "fastv", 0.25)
    assert res.kept_counts == [budget(res.n_visual, 0.25)] * len(docs)
    low = evaluated(name, "fastv", 0.05)
    assert low.kept_counts == [budget(low.n_visual, 0.05)] * len(docs)
    vanilla = evaluated(name, "vanilla", 1.0)
    assert low.accuracy <= vanilla.accuracy  # keeping 5% of the tokens cannot help


def test_training_is_deterministic(tmp_path):
    """scripts/train_toy.py (``sharp.toy.training.main``) run twice with the same settings writes
    bit-identical weights (a short run: the shipped toys come from the same code with more steps; see
    their metadata.json)."""
    from safetensors.torch import load_file

    from sharp.toy import training

    threads = torch.get_num_threads()
    outs = []
    try:
        for run in ("a", "b"):
            out = tmp_path / run
            assert training.main(["--backbone", "toy_llava_onevision", "--steps", "4", "--batch-size", "4",
                                  "--train-n", "16", "--test-n", "4", "--train-eval-n", "4", "--threads", "1",
                                  "--log-every", "2", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
            outs.append(out / "toy_llava_onevision")
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((o / "metadata.json").read_text()) for o in outs)
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]
    assert ma["history"][0]["loss"] > 0 and ma["steps"] == 4
    init = toy.build_untrained("toy_llava_onevision")  # and training did change the weights
    assert not torch.equal(init.model.state_dict()["lm_head.weight"], a["lm_head.weight"])
    # a retrained copy loads by name from its folder (scripts/retention_curve.py --weights-dir)
    bb = sharp.load_backbone("toy_llava_onevision", device="cpu", weights_dir=tmp_path / "a")
    assert all(torch.equal(v, a[k]) for k, v in bb.model.state_dict().items())
    with pytest.raises(ValueError, match="weights_dir is for trained-weights backbones"):
        sharp.load_backbone("tiny_llava_onevision", weights_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no backbone.json"):
        sharp.load_backbone("toy_llava_onevision", weights_dir=tmp_path / "nothing")


def test_training_continues_from_earlier_weights(tmp_path, capsys):
    """``--init-from``: training starts from an earlier run's weights (here the shipped toy's) and the
    metadata keeps that run's record and the summed training time; another toy's weights are refused."""
    from sharp.toy import training

    threads = torch.get_num_threads()
    common = ["--backbone", "toy_llava_onevision", "--steps", "1", "--batch-size", "2", "--train-n", "4",
              "--test-n", "2", "--train-eval-n", "2", "--threads", "1", "--lr", "1e-9", "--warmup", "1",
              "--out-dir", str(tmp_path / "w"), "--cache-dir", str(tmp_path / "cache")]
    try:
        with pytest.raises(SystemExit) as exc:
            training.main(common + ["--init-from", str(toy.WEIGHTS_DIR / "toy_scenes_llava_onevision")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --init-from") and "not a run of toy_llava_onevision" in err[0]
        assert training.main(common + ["--init-from", str(toy.WEIGHTS_DIR / "toy_llava_onevision")]) == 0
    finally:
        torch.set_num_threads(threads)
    shipped = json.loads((toy.WEIGHTS_DIR / "toy_llava_onevision" / "metadata.json").read_text())
    meta = json.loads((tmp_path / "w" / "toy_llava_onevision" / "metadata.json").read_text())
    assert meta["init_from"]["command"] == shipped["command"] and "history" not in meta["init_from"]
    assert meta["total_train_seconds"] == pytest.approx(shipped["train_seconds"] + meta["train_seconds"], abs=0.11)
    # a learning rate of 1e-9 for one step: the continued weights are the shipped ones, nearly (both loaded
    # by name, so that the file's module paths follow the installed transformers either way)
    a = sharp.load_backbone("toy_llava_onevision", device="cpu", weights_dir=tmp_path / "w").model.state_dict()
    b = sharp.load_backbone("toy_llava_onevision", device="cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)
