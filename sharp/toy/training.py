"""Train the toy video LLMs (toy_llava_onevision, toy_qwen2_vl) on the synthetic benchmark.

    python scripts/train_toy.py                       # both toys, shipped settings -> sharp/weights/
    python scripts/train_toy.py --backbone toy_qwen2_vl --out-dir /tmp/toy   # elsewhere

What it does, per toy:

* builds the HF architecture of ``sharp.toy.toy_config(name)`` with seeded random weights and the
  toys' word-level tokenizer (``sharp.toy.toy_words``: one token per word of the prompts);
* decodes and preprocesses the train/test videos once with the backbone's own pipeline (the frames
  and pixels of ``Backbone.prepare``), cached in ``$SHARP_CACHE/toy`` (or ``~/.cache/sharp/toy``);
* trains with teacher forcing on the prompt of the lmms-eval task ``sharp_synthetic``; the loss is
  the cross-entropy of the answer tokens (option letter, ``<|im_end|>``) plus ``--aux-weight`` times
  a training-only per-visual-token loss (a linear probe on the hidden state after decoder layer
  ``--aux-layer`` predicts the colour of the object in the token's cell and the frame it is in, 0 if
  no object). The probe is thrown away; it only gives the vision tower and the first layer a dense
  signal, which shortens the plateau at chance of the answer loss several times over; the multi-scene
  toys add heads for each token's scene, the colour its scene has shown so far, its scene's background
  (``--background-probe``) and, at the position that predicts the answer, the question's scene word and
  the scene it asks about (``--question-probe``; docs/toy.md says why each is there);
* AdamW, linear warm-up then a constant (or cosine-decayed) learning rate, gradient clipping at 1;
* evaluates by greedy generation through ``sharp.prune`` (vanilla), with the task's answer parser,
  on the test split and the first train docs, and writes ``<out-dir>/<name>/{model.safetensors,
  config.json, backbone.json, metadata.json}``; ``sharp.load_backbone(name)`` loads it.

Deterministic on CPU (fixed seeds, data order and thread count): rerunning the same command on the
same machine gives the same weights; on another machine, the same accuracy within about a point.

Code: ``sharp.toy.training`` (shipped settings, training loop, ``train_one``, ``main``) and
``sharp.toy.probes`` (the training-only probes); ``scripts/train_toy.py`` is the command line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sharp import paths
from sharp.toy.configs import (TOY_BACKBONES, TOY_BENCHMARKS, WEIGHTS_DIR, build_untrained, toy_benchmark, toy_config,
                               toy_words)
from sharp.toy.evaluation import evaluate, letter_accuracy
from sharp.toy.pixels import cached_pixels, make_batch
from sharp.toy.probes import add_question_heads, make_probe, question_probe_loss

# Shipped settings per toy (what sharp/weights/<name>/metadata.json records).
DEFAULTS = {
    "toy_llava_onevision": dict(steps=2000, batch_size=32, lr=1e-3, warmup=30, train_n=2000, aux_weight=0.5, aux_layer=1,
                                schedule="constant"),
    "toy_qwen2_vl": dict(steps=2000, batch_size=32, lr=1e-3, warmup=30, train_n=2000, aux_weight=0.5, aux_layer=1,
                                schedule="constant"),
    # the multi-scene benchmark (sharp.synthetic.scenes): 8 layers, 512 / 576 visual tokens, sized to train in
    # under an hour on 2 CPU cores, the two toys side by side with one thread each (see docs/toy.md)
    # (background and question probes: issue 22c, docs/toy.md)
    "toy_scenes_llava_onevision": dict(steps=2000, batch_size=8, lr=2e-3, warmup=50, train_n=2000, aux_weight=0.5,
                                       aux_layer=1, schedule="cosine", background_probe="linear", question_probe=True),
    "toy_scenes_qwen2_vl": dict(steps=2000, batch_size=8, lr=2e-3, warmup=50, train_n=2000, aux_weight=0.5,
                                aux_layer=1, schedule="cosine", background_probe="linear", question_probe=True),
}


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def _load_data(name: str, d: dict, args):
    """The train/test docs, the untrained toy and their cached pixels."""
    bench = toy_benchmark(name)
    print(f"[{name}] data ({bench.__name__}): train {d['train_n']} docs, test {args.test_n} docs", flush=True)
    train_docs = bench.ensure_split("train", n=d["train_n"], seed=args.data_seed)
    test_docs = bench.ensure_split("test", n=args.test_n, seed=args.data_seed)
    config = toy_config(name)
    words = toy_words(name)
    bb = build_untrained(name, config=config, seed=args.seed, words=words)
    train_px = cached_pixels(bb, train_docs, args.cache_dir, verbose=True)
    test_px = cached_pixels(bb, test_docs, args.cache_dir, verbose=True)
    return bb, config, words, (train_docs, train_px), (test_docs, test_px)


def _train_step(bb, batch: dict, probe, labels, idx, layout, aux_weight: float, aux_layer: int, docs=None):
    """Loss of one teacher-forced batch and its log record."""
    k = batch.pop("n_answer_tokens")
    out = bb.model(**batch, use_cache=False, output_hidden_states=probe is not None)
    logits = out.logits[:, -(k + 1):-1].float()  # (b, k, vocab): predictions of the answer tokens
    target = batch["input_ids"][:, -k:]  # (b, k)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    rec = {"answer": loss.item(), "correct": (logits[:, 0].argmax(-1) == target[:, 0]).float().mean().item()}
    if probe is not None:
        vis = bb.visual_mask(batch["input_ids"], layout)  # (b, s)
        h = out.hidden_states[aux_layer][vis].view(len(idx), layout.n_visual, -1)
        scenes = probe.scene is not None
        h2 = out.hidden_states[aux_layer + 1][vis].view(len(idx), layout.n_visual, -1) if scenes else None
        aux = probe.loss(h, torch.stack([labels[i]["color"] for i in idx]),
                         torch.stack([labels[i]["oframe"] for i in idx]),
                         torch.stack([labels[i]["scene"] for i in idx]) if scenes else None, h2,
                         torch.stack([labels[i]["scene_color"] for i in idx]) if scenes else None,
                         torch.stack([labels[i]["background"] for i in idx]) if "background" in labels[0] else None)
        if probe.asked_scene is not None:
            question = question_probe_loss(probe, out, docs, idx, k, aux_layer + 1)
            aux = aux + question
            rec["question"] = question.item()
        loss = loss + aux_weight * aux
        rec["aux"] = aux.item()
    return loss, rec


def _log(name: str, step: int, run: list, t0: float) -> dict:
    """Print and return the mean of the records since the last log."""
    mean = {key: float(np.mean([r[key] for r in run])) for key in run[0]}
    print(f"[{name}] step {step:5d}  answer loss {mean['answer']:.4f}  teacher-forced acc "
          f"{100 * mean['correct']:5.1f}%" + (f"  probe {mean['aux']:.3f}" if "aux" in mean else "")
          + (f" (question {mean['question']:.3f})" if "question" in mean else "")
          + f"  {time.time() - t0:.0f} s", flush=True)
    return {"step": step, "loss": round(mean["answer"], 4), "teacher_forced_acc": round(100 * mean["correct"], 1),
            **({"aux": round(mean["aux"], 4)} if "aux" in mean else {}), "seconds": round(time.time() - t0, 1)}


def _data_order(docs: list, n: int, weights: dict, seed: int) -> np.ndarray:
    """``n`` doc indices: shuffled epochs of the train docs, where a doc of question type q appears
    ``weights.get(q, 1)`` times per epoch (integer weights; 1 for every type: plain epochs)."""
    pool = np.concatenate([np.full(int(weights.get(doc["qtype"], 1)), i) for i, doc in enumerate(docs)])
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(pool) for _ in range(math.ceil(n / len(pool)) + 1)])


def _train_loop(name: str, bb, d: dict, args, train, test) -> tuple[list, float]:
    """AdamW with teacher forcing (+ the probe loss); returns the loss history and the seconds."""
    (train_docs, train_px), (test_docs, test_px) = train, test
    model = bb.model
    model.train()
    params = list(model.parameters())
    layout = bb.layout(make_batch(bb, train_docs, train_px, [0]))
    probe, labels = make_probe(bb, d, train_docs, layout, args.seed)
    if probe is not None and d.get("question_probe"):
        add_question_heads(probe, bb.text_config.hidden_size, len(train_docs[0]["scenes"]), args.seed)
    if probe is not None:
        params += list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=d["lr"], weight_decay=args.weight_decay, betas=(0.9, 0.98))
    steps, bs = d["steps"], d["batch_size"]
    order = _data_order(train_docs, steps * bs, d.get("qtype_weights") or {}, args.seed)
    t0 = time.time()
    hist, run = [], []
    for step in range(steps):
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"[{name}] time budget of {args.max_minutes:g} min reached after {step} steps: stopping", flush=True)
            d["steps_done"] = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, d["lr"], d["warmup"], d["schedule"])
        idx = order[step * bs:(step + 1) * bs].tolist()
        batch = make_batch(bb, train_docs, train_px, idx, with_answer=True)
        loss, rec = _train_step(bb, batch, probe, labels, idx, layout, d["aux_weight"], d["aux_layer"], train_docs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        run.append(rec)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            hist.append(_log(name, step + 1, run, t0))
            run = []
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            acc, per = letter_accuracy(bb, test_docs, test_px, args.eval_batch)
            print(f"[{name}]   test {acc:.1f}%  {_format_per_qtype(per)}  (argmax over the letters)", flush=True)
    t_train = time.time() - t0
    model.eval()
    return hist, t_train


def _init_from(bb, folder: str) -> dict:
    """Load the weights of an earlier run of the same toy (``<folder>/model.safetensors``) to continue
    training it; returns that run's metadata without its history (recorded as ``init_from``)."""
    from safetensors.torch import load_file

    from sharp.backbones.compat import match_state_dict

    folder = Path(folder)
    state = match_state_dict(bb.model, load_file(str(folder / "model.safetensors")))  # 4.57 / 5.x names
    own = bb.model.state_dict()
    differ = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if differ:
        print(f"error: --init-from {folder}: not a run of {bb.name} ({len(differ)} weights differ in name or "
              f"shape, e.g. {differ[0]})", file=sys.stderr)
        raise SystemExit(2)
    bb.model.load_state_dict(state)
    meta = json.loads((folder / "metadata.json").read_text())
    return {k: v for k, v in meta.items() if k != "history"}


def _save(out_dir: Path, bb, config: dict, words, meta: dict) -> None:
    """model.safetensors (float32), config.json, backbone.json (family, words), metadata.json."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: v.detach().to(torch.float32).contiguous() for key, v in bb.model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "backbone.json").write_text(json.dumps({"kind": bb.kind, "tokenizer": "words", "words": words},
                                                      indent=1) + "\n")
    (out_dir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")


def train_one(name: str, args) -> dict:
    """Build, train, evaluate and save the toy ``name`` with the toy's :data:`DEFAULTS` overridden by the
    options set in ``args`` (the namespace of :func:`build_parser`); returns the metadata written."""
    known = {"background_probe": "off", "qtype_weights": {}, "question_probe": False, **DEFAULTS[name]}
    d = {**known, **{k: v for k, v in vars(args).items() if k in known and v is not None}}
    t_start = time.time()
    bb, config, words, train, test = _load_data(name, d, args)
    (train_docs, train_px), (test_docs, test_px) = train, test
    t_data = time.time() - t_start
    n_params = sum(p.numel() for p in bb.model.parameters())
    print(f"[{name}] {n_params / 1e6:.2f} M parameters; data ready in {t_data:.0f} s", flush=True)

    earlier = _init_from(bb, args.init_from) if args.init_from else None
    hist, t_train = _train_loop(name, bb, d, args, train, test)

    print(f"[{name}] evaluating (greedy generation through sharp.prune, vanilla)", flush=True)
    te = evaluate(bb, test_docs, store=test_px, batch_size=args.eval_batch)
    tr_n = min(args.train_eval_n, len(train_docs))
    tr = evaluate(bb, train_docs[:tr_n], store=train_px.first(tr_n), batch_size=args.eval_batch)
    print(f"[{name}] train[:{tr_n}] {tr.accuracy:.1f}%  {_format_per_qtype(tr.per_qtype)}", flush=True)
    print(f"[{name}] test  {te.accuracy:.1f}%  {_format_per_qtype(te.per_qtype)}", flush=True)

    import transformers

    meta = {
        "backbone": name, "kind": bb.kind, "parameters": n_params, **d,
        "weight_decay": args.weight_decay, "clip": args.clip, "seed": args.seed, "data_seed": args.data_seed,
        "threads": torch.get_num_threads(), "test_docs": len(test_docs), "num_frames": bb.num_frames,
        "visual_tokens": te.n_visual, "train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
        "train_accuracy": round(tr.accuracy, 2), "train_accuracy_docs": tr_n,
        "train_accuracy_per_qtype": {key: round(v, 2) for key, v in tr.per_qtype.items()},
        "test_accuracy": round(te.accuracy, 2),
        "test_accuracy_per_qtype": {key: round(v, 2) for key, v in te.per_qtype.items()},
        "history": hist,
        **({"init_from": earlier,
            "total_train_seconds": round(t_train + earlier.get("total_train_seconds", earlier["train_seconds"]), 1)}
           if earlier else {}),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    out_dir = Path(args.out_dir) / name
    _save(out_dir, bb, config, words, meta)
    size = os.path.getsize(out_dir / "model.safetensors") / 2**20
    print(f"[{name}] saved {out_dir} ({size:.1f} MiB); training {t_train:.0f} s", flush=True)
    return meta


def _format_per_qtype(per: dict) -> str:
    return " ".join(f"{key} {v:.0f}" for key, v in per.items())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/train_toy.py`` (every setting left at None takes the toy's :data:`DEFAULTS`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="all", choices=["all", "scenes", *TOY_BACKBONES],
                    help="all: toy_llava_onevision and toy_qwen2_vl; scenes: the two toys of the scenes benchmark")
    ap.add_argument("--out-dir", default=str(WEIGHTS_DIR), help="writes <out-dir>/<backbone>/ (default: sharp/weights)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--aux-weight", type=float, default=None, help="weight of the visual-token probe loss (0: off)")
    ap.add_argument("--aux-layer", type=int, default=None, help="hidden state read by the probe (1: after layer 0)")
    ap.add_argument("--train-n", type=int, default=None, help="train docs (a prefix of the train split)")
    ap.add_argument("--background-probe", default=None, choices=["off", "linear", "words"],
                    help="multi-scene toys: also probe each token's scene background colour, with a linear head "
                         "or against the LM's input embeddings of the background words")
    ap.add_argument("--question-probe", default=None, action=argparse.BooleanOptionalAction,
                    help="multi-scene toys: also probe, at the answer position, the question's scene word (after "
                         "layer 0) and the scene it asks about (after layer 1)")
    ap.add_argument("--qtype-weights", default=None, type=json.loads,
                    help='JSON, e.g. \'{"scene": 2}\': a doc of that question type appears so many times per epoch')
    ap.add_argument("--init-from", default=None, help="continue from the weights in this folder (a run of the same toy)")
    ap.add_argument("--schedule", default=None, choices=["constant", "cosine"], help="after the warm-up")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--test-n", type=int, default=200)
    ap.add_argument("--train-eval-n", type=int, default=200, help="train docs scored at the end")
    ap.add_argument("--seed", type=int, default=0, help="model init and data order")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic splits")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped toys: 1; fix it for bit-reproducibility)")
    ap.add_argument("--cache-dir", default=str(paths.cache_dir("toy")), help="preprocessed-video cache (default $SHARP_CACHE/toy)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop training after this many minutes (0: never); metadata records steps_done")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=0, help="score the test split every N steps (0: never)")
    ap.add_argument("--eval-batch", type=int, default=16)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Train the toys that ``argv`` (the options of :func:`build_parser`) names; returns the exit status."""
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.backbone in ("all", "scenes"):  # all: the two toys of the first benchmark; scenes: the multi-scene toys
        bench = "benchmark" if args.backbone == "all" else "scenes"
        names = [n for n in TOY_BACKBONES if TOY_BENCHMARKS[n] == bench]
    else:
        names = [args.backbone]
    summary = {}
    for name in names:
        meta = train_one(name, args)
        summary[name] = {key: meta[key] for key in ("test_accuracy", "train_accuracy", "train_seconds", "steps")}
    print(json.dumps(summary, indent=2))
    return 0

