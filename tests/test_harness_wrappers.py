"""lmms-eval wrappers: registration, request order, generation kwargs, model_args errors, one real run."""
import contextlib
import os
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sharp
from lmms_eval.api.instance import GenerationResult, Instance

from sharp.harness import catalog
from sharp.lmms import models as W
from sharp.lmms.manifest import model_ids


class _Tok:
    eos_token_id = 0
    pad_token_id = 0

    def __init__(self):
        self.vocab = {}

    def encode_text(self, text):
        ids = []
        for ch in text:
            ids.append(self.vocab.setdefault(ch, len(self.vocab) + 1))
        return ids

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv.get(int(i), "") for i in ids if int(i) != 0)


class _Model(torch.nn.Module):
    """generate() answers '<answer of the prompt>\\n\\ntrailing' and records its kwargs."""

    def __init__(self, tok):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        self.tok, self.calls = tok, []

    def forward(self, input_ids=None, **kw):
        return input_ids

    def generate(self, input_ids=None, attention_mask=None, answer=None, **kw):
        self.calls.append(kw)
        self(input_ids=input_ids)  # the prefill the wrapper times
        new = torch.tensor([self.tok.encode_text(answer + "\n\ntrailing")])[:, : kw["max_new_tokens"]]
        return torch.cat([input_ids, new], dim=1)


class _Backbone:
    """sample_frames reads nothing: a file named bad*.mp4 fails the way decord does (RuntimeError)."""

    def __init__(self, name):
        self.name, self.kind = name, "llava_onevision"
        self.tokenizer = _Tok()
        self.model = _Model(self.tokenizer)
        self.prepared = []

    def sample_frames(self, video):
        if os.path.basename(str(video)).startswith("bad"):
            raise RuntimeError(f"[decord] cannot open {video}")
        return np.zeros((2, 4, 4, 3), np.uint8)

    def pixels_to_inputs(self, frames, question):
        self.prepared.append((frames.shape, question))
        return {"input_ids": torch.ones(1, 10, dtype=torch.long), "attention_mask": torch.ones(1, 10),
                "answer": f"ans:{question}"}

    def layout(self, inputs):
        return SimpleNamespace(n_visual=64)


@pytest.fixture
def stub(monkeypatch, tmp_path):
    made = {}

    def load_backbone(name, **kw):
        made["bb"] = _Backbone(name)
        made["kwargs"] = kw
        return made["bb"]

    @contextlib.contextmanager
    def prune(bb, method, retention=None, **kw):  # the wrapper passes the method it resolved once
        made.setdefault("prune", []).append(method)
        retention = method.retention if retention is None else retention
        yield SimpleNamespace(visual_tokens_per_layer=[64, 64] + [max(1, round(64 * retention))] * 2,
                              stage_times={"select": 0.001})

    monkeypatch.setattr(sharp, "load_backbone", load_backbone)
    monkeypatch.setattr(sharp, "prune", prune)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    made["video"] = str(video)
    return made


def _requests(video, gen_kwargs, n=3, task="t"):
    docs = [{"q": f"question {i}", "video": video} for i in range(n)]
    reqs = [Instance("generate_until", (f"question {i}", dict(gen_kwargs), lambda d: [d["video"]], i, task, "test"),
                     idx=0, metadata={"task": task, "doc_id": i, "repeats": 1}) for i in range(n)]
    return {task: {"test": docs}}, reqs


def test_entry_point_resolves_our_classes():
    eps = [ep for ep in entry_points().select(group="lmms_eval.models") if ep.value.startswith("sharp.")]
    if not eps:
        pytest.skip("the project is not installed (`pip install -e .` registers the lmms_eval.models entry point)")
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    assert get_model("llava_onevision_fastv") is W.SharpLlavaOneVision__fastv
    assert get_model("sharp_qwen2_vl") is W.SharpQwen2VL
    assert get_model("sharp_llava_onevision") is W.SharpLlavaOneVision
    assert get_model("qwen2_vl_sharp").fixed_method == "sharp"
    assert {"sharp_llava_onevision", "sharp_qwen2_vl", "llava_onevision_vanilla", "qwen2_vl_fastv"} <= set(
        MODEL_REGISTRY_V2.list_model_names())
    assert get_model("llava_onevision").__module__.startswith("lmms_eval")  # built-ins untouched


def test_model_ids_come_from_the_method_registry():
    ids = model_ids()
    registered = catalog.registered_methods()
    families = ("llava_onevision", "qwen2_vl", "llava_video", "qwen2_5_vl", "qwen3_vl")
    assert ids == [f"sharp_{family}" for family in families] + [
        f"{family}_{m}" for family in families for m in registered if m.isidentifier()]
    assert {"llava_onevision_vanilla", "qwen2_vl_fastv", "llava_onevision_sharp"} <= set(ids)
    for m in catalog.planned_methods():  # planned methods get an id when they are registered
        assert (f"llava_onevision_{m}" in ids) == (m in registered)


def test_known_backbones_come_from_the_backbone_registry():
    for family in ("llava_onevision", "qwen2_vl", "llava_video", "qwen2_5_vl", "qwen3_vl"):
        names = W.known_backbones(family)
        assert names[0] == catalog.DEFAULT_BACKBONES[family]
        assert sorted(names) == sorted(n for n in sharp.backbone_names() if catalog.backbone_family(n) == family)
    assert {"tiny_qwen2_vl", "toy_qwen2_vl", "qwen2_vl_7b"} <= set(W.known_backbones("qwen2_vl"))


def test_requests_keep_order_and_gen_kwargs_apply(stub):
    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision", method="fastv", retention=0.25, layer=2)
    lm.task_dict, reqs = _requests(stub["video"], {"until": ["\n\n"], "max_new_tokens": 64, "temperature": 0,
                                                   "do_sample": False, "top_p": 1.0, "num_beams": 1}, n=4)
    out = lm.generate_until(reqs)
    assert all(isinstance(o, GenerationResult) for o in out)
    assert [o.text for o in out] == [f"ans:question {i}" for i in range(4)]  # request order, cut at until
    calls = stub["bb"].model.calls[1:]  # [0] is the untimed warm-up
    assert len(calls) == 4
    assert all(c["max_new_tokens"] == 64 and c["do_sample"] is False and c.get("num_beams") == 1 for c in calls)
    assert all(c.get("temperature") is None and c.get("top_p") is None for c in calls)  # greedy
    assert [q for _, q in stub["bb"].prepared[1:]] == [f"question {i}" for i in range(4)]
    m = stub["prune"][-1]
    assert (m.name, m.retention, m.layer) == ("fastv", 0.25, 2)
    stats = lm.request_stats
    assert [s["doc_id"] for s in stats] == [0, 1, 2, 3]
    assert stats[0]["visual_tokens_before"] == 64 and stats[0]["visual_tokens_after"] == 16
    assert stats[0]["prefill_ms"] is not None and stats[0]["stage_ms"] == {"select": 1.0}
    assert out[0].token_counts.input_tokens == 10


def test_max_new_tokens_default_and_sampling(stub):
    lm = W.SharpQwen2VL(backbone="tiny_qwen2_vl", warmup=0)
    lm.task_dict, reqs = _requests(stub["video"], {"temperature": 0.7, "top_p": 0.9, "until": "ans"}, n=1)
    out = lm.generate_until(reqs)
    call = stub["bb"].model.calls[0]
    assert call["max_new_tokens"] == 128  # qwen2_vl built-in default when the task sets none
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["top_p"] == 0.9
    assert out[0].text == ""  # cut at the until string "ans"
    assert W.SharpLlavaOneVision.default_max_new_tokens == 1024  # llava_onevision built-in default


@pytest.mark.parametrize("cls,args,needle", [
    (W.SharpLlavaOneVision, {"backbone": "qwen2_vl_7b"}, "backbone='qwen2_vl_7b' is not a llava_onevision backbone; accepted values: llava_onevision_7b"),
    (W.SharpLlavaOneVision, {"method": "nosuch"}, "unknown pruning method 'nosuch'; valid methods:"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 1.5}, "retention must be in (0, 1]"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 0.25, "lyer": 2}, "unknown argument(s) lyer; valid arguments:"),
    (W.SharpLlavaOneVision, {"method": "vanilla", "retention": 0.5}, "accepted values: 1"),
    (W.SharpQwen2VL, {"batch_size": 0}, "batch_size=0; accepted values: an integer >= 1"),
    (W.SharpQwen2VL, {"batch_size": "auto"}, "batch_size='auto'; accepted values: an integer >= 1"),
    (W.SharpQwen2VL, {"strict": "yes"}, "strict='yes'; accepted values: true, false"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 0.25, "layer": 99}, "fastv: layer must be in 1..27"),
    (W.method_class(W.SharpQwen2VL, "fastv"), {"method": "vanilla"}, "method='vanilla' conflicts with the model id"),
    (W.SharpLlavaOneVision, {"method": "fastv+sharp", "retention": 0.25, "visionzip.layer": 2},
     "visionzip.layer: 'visionzip' is not a child of method 'fastv+sharp'; its children: fastv, sharp"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 0.25, "sharp.layer": 2},
     "sharp.layer: dotted keys set a child's kwarg of a composed method"),
    (W.SharpLlavaOneVision, {"method": "fastv+sharp", "retention": 0.25, "layer": 2}, "fastv, sharp"),
    (W.SharpLlavaOneVision, {"method": "fastv+nosuch", "retention": 0.25}, "unknown pruning method 'nosuch'"),
])
def test_bad_model_args_name_the_argument_and_accepted_values(stub, cls, args, needle):
    with pytest.raises(W.ModelArgsError) as err:
        cls(**args)
    assert needle in str(err.value)
    assert "bb" not in stub  # rejected before loading anything


def test_planned_method_fails_naming_the_implemented_ones(stub):
    missing = [m for m in catalog.planned_methods() if m not in catalog.registered_methods()]
    if not missing:
        pytest.skip("every planned method is registered")
    for cls, args in ((W.method_class(W.SharpLlavaOneVision, missing[0]), {}),
                      (W.SharpQwen2VL, {"method": missing[0]})):
        with pytest.raises(W.ModelArgsError) as err:
            cls(retention=0.25, **args)
        msg = str(err.value)
        assert f"method {missing[0]!r} is not implemented yet [planned: " in msg and "\n" not in msg
        assert "implemented methods: " + ", ".join(catalog.registered_methods()) in msg
    assert "bb" not in stub


def test_model_args_string_parsing(stub):
    lm = W.SharpLlavaOneVision.create_from_arg_string(
        "backbone=tiny_llava_onevision,method=fastv,retention=0.25,layer=3,attn_implementation=eager,num_frames=8",
        {"batch_size": "1", "device": None})
    assert (lm.method, lm.retention, lm.method_kwargs) == ("fastv", 0.25, {"layer": 3})
    assert stub["kwargs"] == {"attn_implementation": "eager", "num_frames": 8}


def test_model_args_dotted_keys_become_per_child_dicts(stub):
    lm = W.SharpLlavaOneVision.create_from_arg_string(
        "backbone=tiny_llava_onevision,method=fastv+sharp,retention=0.25,sharp.layer=2,fastv.retention=0.5,"
        "sharp.lam=0.5", {"batch_size": "1", "device": None})
    assert lm.method == "fastv+sharp" and lm.retention == 0.25
    assert lm.method_kwargs == {"sharp": {"layer": 2, "lam": 0.5}, "fastv": {"retention": 0.5}}
    lm.task_dict, reqs = _requests(stub["video"], {"max_new_tokens": 4}, n=1)
    lm.generate_until(reqs)
    m = stub["prune"][-1]
    fastv, sharp_child = m.children
    assert m.label == "fastv+sharp" and m.retention == 0.25 and fastv.retention == 0.5
    assert (sharp_child.layer, sharp_child.lam) == (2, 0.5)
    # what the harness records is the same string back
    from lmms_eval.utils import simple_parse_args_string

    from sharp.lmms.args import format_model_args, nest_child_kwargs

    kwargs = {"backbone": "tiny_llava_onevision", "method": "fastv+sharp", "retention": 0.25, **lm.method_kwargs}
    text = format_model_args(kwargs)
    assert text == ("backbone=tiny_llava_onevision,method=fastv+sharp,retention=0.25,sharp.layer=2,sharp.lam=0.5,"
                    "fastv.retention=0.5")
    assert nest_child_kwargs("fastv+sharp", simple_parse_args_string(text)) == kwargs
    # repeated children are keyed name@i
    assert nest_child_kwargs("fastv+fastv", {"fastv@2.layer": 3}) == {"fastv@2": {"layer": 3}}
    with pytest.raises(W.ModelArgsError, match="its children: fastv@1, fastv@2"):
        nest_child_kwargs("fastv+fastv", {"fastv.layer": 3})


def test_missing_video_is_a_clear_error(stub, tmp_path):
    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision")
    lm.task_dict, reqs = _requests(str(tmp_path / "nope.mp4"), {}, n=1)
    with pytest.raises(W.MissingResourceError, match="nope.mp4"):
        lm.generate_until(reqs)


def test_real_tiny_backbone_through_the_wrapper():
    from sharp.synthetic import ensure_split

    docs = ensure_split("test", n=2)
    lm = W.method_class(W.SharpQwen2VL, "fastv")(backbone="tiny_qwen2_vl", retention=0.25, num_frames=8)
    task_docs = [{"video": d["video"], "prompt": d["prompt"]} for d in docs]
    lm.task_dict = {"t": {"test": task_docs}}
    reqs = [Instance("generate_until", (d["prompt"], {"max_new_tokens": 3, "until": ["\n\n"]},
                                        lambda doc: [doc["video"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(task_docs)]
    out = lm.generate_until(reqs)
    assert len(out) == 2
    for s in lm.request_stats:
        assert s["visual_tokens_after"] == sharp.methods.budget(s["visual_tokens_before"], 0.25)
        assert 0 < s["output_tokens"] <= 3 and s["prefill_ms"] > 0 and s["prefill_tflops"] > 0
        assert s["peak_memory_mb"] > 0
        assert s["prefill_tflops_measured"] == pytest.approx(s["prefill_tflops"], rel=1e-6)


# ----------------------------------------------------------------------------- bad videos, padding, batches
def test_a_bad_video_costs_one_answer(stub, tmp_path):
    from sharp.harness.resources import HarnessError

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 64)
    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision", warmup=0)
    task_dict, reqs = _requests(stub["video"], {"max_new_tokens": 64, "until": ["\n\n"]}, n=3)
    task_dict["t"]["test"][0]["video"] = str(bad)
    lm.task_dict = task_dict
    out = lm.generate_until(reqs)
    assert [o.text for o in out] == ["", "ans:question 1", "ans:question 2"]  # never a text-only answer
    assert lm.failed_requests == 1 and len(stub["bb"].model.calls) == 2
    failed = lm.request_stats[0]
    assert failed["task"] == "t" and failed["doc_id"] == 0 and failed["video"] == str(bad)
    assert failed["failed"].startswith("RuntimeError: [decord] cannot open") and str(bad) in failed["failed"]
    assert [s["doc_id"] for s in lm.request_stats[1:]] == [1, 2] and all("failed" not in s for s in lm.request_stats[1:])

    strict = W.SharpLlavaOneVision(backbone="tiny_llava_onevision", warmup=0, strict=True)
    strict.task_dict = task_dict
    with pytest.raises(HarnessError, match=r"strict=true: t doc 0: RuntimeError: \[decord\] cannot open .*bad.mp4"):
        strict.generate_until(reqs)


def test_a_run_whose_videos_all_fail_stops(stub, tmp_path):
    from sharp.harness.resources import HarnessError

    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision", warmup=0)
    task_dict, reqs = _requests(str(tmp_path / "bad.mp4"), {}, n=8)
    (tmp_path / "bad.mp4").write_bytes(b"")
    lm.task_dict = task_dict
    with pytest.raises(HarnessError, match=r"the first 5 request\(s\) all failed, last: t doc 4: RuntimeError"):
        lm.generate_until(reqs)
    assert lm.failed_requests == W.FAIL_FAST and stub["bb"].model.calls == []


def test_padding_requests_of_the_evaluator_are_not_run(stub):
    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision", warmup=0)
    lm.task_dict, reqs = _requests(stub["video"], {"max_new_tokens": 64, "until": ["\n\n"]}, n=2)
    pad = Instance("generate_until", reqs[1].args, idx=0, metadata={"task": "t", "doc_id": 1, "repeats": 1,
                                                                   "__padding_only__": True})
    out = lm.generate_until(reqs + [pad])
    assert [o.text for o in out] == ["ans:question 0", "ans:question 1", ""]
    assert len(stub["bb"].model.calls) == 2 and [s["doc_id"] for s in lm.request_stats] == [0, 1]


def _pending(i, shape, settings=None):
    return W._Pending(i, f"q{i}", "t", i, settings or {"max_new_tokens": 4}, [], np.zeros(shape, np.uint8), None)


def test_layout_batches_group_by_frame_shape_and_settings():
    b = W.LayoutBatches(2, max_pending=3)
    a1, b1, a2 = _pending(0, (4, 8, 8, 3)), _pending(1, (2, 8, 8, 3)), _pending(2, (4, 8, 8, 3))
    assert b.add(a1) == [] and b.add(b1) == []
    assert b.add(a2) == [[a1, a2]]  # same layout: a full batch
    c1 = _pending(3, (4, 8, 8, 3), {"max_new_tokens": 32})  # same frames, other settings: its own group
    d1, d2 = _pending(4, (6, 8, 8, 3)), _pending(5, (6, 8, 8, 3))
    assert b.add(c1) == [] and b.add(d1) == []
    assert b.add(d2) == [[d1, d2]]
    e1 = _pending(6, (8, 8, 8, 3))
    assert b.add(e1) == []  # 3 pending: b1, c1, e1
    f1 = _pending(7, (10, 8, 8, 3))
    ready = b.add(f1)  # 4 > max_pending: the largest (first) group goes, alone
    assert ready == [[b1]] and b.pending() == 3
    assert b.drain() == [[c1], [e1], [f1]] and b.pending() == 0


def test_per_sample_layers_from_the_trace():
    kept = [[torch.arange(6), torch.arange(4)], [torch.arange(3), torch.arange(2)]]  # [stage][sample]
    got = W.per_sample_layers(kept, [1, 3], measured=[8, 6, 6, 3], n_visual=8, batch=2)
    assert got == [[8, 6, 6, 3], [8, 4, 4, 2]]
    assert W.per_sample_layers(kept, [1, 3], measured=[8, 8, 6, 3], n_visual=8, batch=2) is None  # disagree
    assert W.per_sample_layers([], [], measured=[8, 8], n_visual=8, batch=3) == [[8, 8]] * 3


def test_batches_answer_like_batch_1_on_a_real_tiny_backbone(tmp_path):
    """tiny_qwen2_vl + FastV: 4 synthetic videos and 2 of another size (another layout) in batches of 4 give
    batch 1's answers and per-request numbers; each batch holds one layout."""
    from sharp.backbones.video import write_video
    from sharp.synthetic import ensure_split

    docs = [{"video": d["video"], "prompt": d["prompt"]} for d in ensure_split("test", n=4)]
    rng = np.random.default_rng(0)
    for k in range(2):
        path = write_video(tmp_path / f"other{k}.mp4", rng.integers(0, 255, (6, 96, 64, 3), dtype=np.uint8), fps=4)
        docs.insert(1 + 2 * k, {"video": str(path), "prompt": docs[0]["prompt"]})
    reqs = [Instance("generate_until", (d["prompt"], {"max_new_tokens": 3, "until": ["\n\n"]},
                                        lambda doc: [doc["video"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    runs = {}
    for bs in (1, 4):
        lm = W.method_class(W.SharpQwen2VL, "fastv")(backbone="tiny_qwen2_vl", retention=0.25, layer=2,
                                                     num_frames=8, batch_size=bs, warmup=0)
        lm.task_dict = {"t": {"test": docs}}
        runs[bs] = ([o.text for o in lm.generate_until(reqs)], sorted(lm.request_stats, key=lambda s: s["doc_id"]))
    (texts1, stats1), (texts4, stats4) = runs[1], runs[4]
    assert texts4 == texts1
    keys = ("doc_id", "visual_tokens_before", "visual_tokens_after", "visual_tokens_per_layer", "input_tokens",
            "output_tokens", "prefill_tflops")
    assert [{k: s[k] for k in keys} for s in stats4] == [{k: s[k] for k in keys} for s in stats1]
    assert [s["batch_size"] for s in stats1] == [1] * 6
    assert [s["batch_size"] for s in stats4] == [4, 2, 4, 2, 4, 4]  # synthetic videos together, the others apart
    assert stats4[1]["visual_tokens_before"] != stats4[0]["visual_tokens_before"]
