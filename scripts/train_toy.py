#!/usr/bin/env python
"""Train the toy video LLMs (toy_llava_onevision, toy_qwen2_vl) on the synthetic benchmark.

    python scripts/train_toy.py                       # both toys, shipped settings -> sharp/weights/
    python scripts/train_toy.py --backbone toy_qwen2_vl --out-dir /tmp/toy   # elsewhere

Deterministic on CPU (fixed seed, data order and thread count): the same command on the same
machine gives the same weights. The videos are decoded and preprocessed once by the backbone's
own pipeline (frames and pixels of ``Backbone.prepare``) and cached (``$SHARP_CACHE/toy`` or
``~/.cache/sharp/toy``). Teacher forcing with the loss on the answer tokens only (the option
letter and ``<|im_end|>``), AdamW, linear warm-up then cosine decay. At the end the model is
evaluated by greedy generation through ``sharp.prune`` (vanilla) on the train and test splits and
saved as ``<out-dir>/<name>/{model.safetensors, config.json, backbone.json, metadata.json}``.
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sharp import toy  # noqa: E402

# Shipped settings per toy (what sharp/weights/<name>/metadata.json records).
DEFAULTS = {
    "toy_llava_onevision": dict(steps=600, batch_size=16, lr=1e-3, warmup=30, train_n=2000, aux_weight=0.5, q_weight=0.5, t_weight=0.5, o_weight=0.5, schedule="cosine"),
    "toy_qwen2_vl": dict(steps=600, batch_size=16, lr=1e-3, warmup=30, train_n=2000, aux_weight=0.5, q_weight=0.5, t_weight=0.5, o_weight=0.5, schedule="cosine"),
}


def lr_at(step: int, steps: int, lr: float, warmup: int, final: float = 0.05) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))


class AuxHeads(torch.nn.Module):
    """Training-only linear probes (discarded after training): colour and shape of the object in each
    visual token's cell, read from the LM input (the projector output), and the token's frame, read
    after ``pos_layer`` decoder layers. They give the vision tower and the first layer a dense signal
    so that the answer loss has useful visual features to work with from the start."""

    def __init__(self, hidden: int, frames: int, kinds: int):
        super().__init__()
        self.q_color = torch.nn.Linear(hidden, len(toy.COLOR_IDS) + 1)
        self.q_shape = torch.nn.Linear(hidden, len(toy.SHAPE_IDS) + 1)
        self.q_kind = torch.nn.Linear(hidden, kinds)
        self.t_quarter = torch.nn.Linear(hidden, 4)
        self.t_color = torch.nn.Linear(hidden, len(toy.COLOR_IDS))
        self.t_shape = torch.nn.Linear(hidden, len(toy.SHAPE_IDS))
        self.t_count = torch.nn.Linear(hidden, 4)
        self.o_match = torch.nn.Linear(hidden, 2)
        self.o_letter = torch.nn.Linear(hidden, 4)
        self.color = torch.nn.Linear(hidden, len(toy.COLOR_IDS) + 1)
        self.shape = torch.nn.Linear(hidden, len(toy.SHAPE_IDS) + 1)
        self.frame = torch.nn.Linear(hidden, frames)


_ANCHOR_IDS: dict = {}


def _anchor_positions(bb, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the position of the question's "?" and of the newline ending each of the 4 options."""
    if bb.name not in _ANCHOR_IDS:
        enc = lambda c: bb.tokenizer(c, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        _ANCHOR_IDS[bb.name] = (enc("?"), enc("\n"))
    q_id, nl_id = _ANCHOR_IDS[bb.name]
    s = ids.shape[1]
    ar = torch.arange(s)
    qpos = torch.where(ids == q_id, ar, -1).max(dim=1).values  # the last "?" (there is one)
    after = (ids == nl_id) & (ar[None] > qpos[:, None])
    rank = after.long().cumsum(1)
    opos = torch.stack([torch.where(after & (rank == r), ar, 0).max(dim=1).values for r in (2, 3, 4, 5)], 1)
    return qpos, opos


def compute_losses(bb, batch: dict, labels: list, heads, args) -> tuple[torch.Tensor, dict]:
    """Answer loss (teacher forcing, answer tokens only) + optional auxiliary losses."""
    F = torch.nn.functional
    k = batch["n_answer_tokens"]
    inputs = {key: v for key, v in batch.items() if key != "n_answer_tokens"}
    need_hidden = heads is not None
    out = bb.model(**inputs, use_cache=False, output_hidden_states=need_hidden)
    logits = out.logits[:, -(k + 1):-1].float()  # (b, k, V)
    targets = inputs["input_ids"][:, -k:]
    loss_ans = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    stats = {"answer": loss_ans.item(), "correct": (logits[:, 0].argmax(-1) == targets[:, 0]).float().mean().item()}
    if getattr(args, "text_weight", 0) > 0:  # next-token loss on the prompt's text tokens
        ids = inputs["input_ids"]
        layout = bb.layout(inputs)
        text = (inputs["attention_mask"].bool() & ~(ids == bb.video_token_id))
        tmask = text[:, :-1] & text[:, 1:]
        tmask[:, -(k + 1):] = False
        lt = F.cross_entropy(out.logits[:, :-1][tmask].float(), ids[:, 1:][tmask])
        stats["text"] = lt.item()
    loss = loss_ans + (args.text_weight * lt if getattr(args, "text_weight", 0) > 0 else 0)
    if heads is not None:
        layout = bb.layout(inputs)
        vis = bb.visual_mask(inputs["input_ids"], layout)  # (b, s)
        lab = {key: torch.stack([x[key] for x in labels]) for key in ("color", "shape", "frame")}  # (b, n_vis)
        h_sem = out.hidden_states[args.aux_sem_layer][vis].view(len(labels), layout.n_visual, -1)
        h_pos = out.hidden_states[args.aux_pos_layer][vis].view(len(labels), layout.n_visual, -1)
        l_col = F.cross_entropy(heads.color(h_sem).flatten(0, 1), lab["color"].flatten())
        l_shp = F.cross_entropy(heads.shape(h_sem).flatten(0, 1), lab["shape"].flatten())
        l_frm = F.cross_entropy(heads.frame(h_pos).flatten(0, 1), lab["frame"].flatten())
        if args.aux_weight > 0:
            loss = loss + args.aux_weight * (l_col + l_shp + l_frm)
        stats.update(color=l_col.item(), shape=l_shp.item(), frame=l_frm.item())
        qpos, opos = _anchor_positions(bb, inputs["input_ids"], k)  # (b,), (b, 4)
        rows = torch.arange(len(labels))
        if args.q_weight > 0:  # what the question asks, at its "?"
            hq = out.hidden_states[args.aux_q_layer][rows, qpos]
            lq = sum(F.cross_entropy(getattr(heads, key)(hq), torch.tensor([x[key] for x in labels]))
                     for key in ("q_color", "q_shape", "q_kind"))
            loss = loss + args.q_weight * lq
            stats["question"] = lq.item()
        if args.t_weight > 0:  # what the answer is about (target object), at the "?"
            ht = out.hidden_states[args.aux_t_layer][rows, qpos]
            lt_ = sum(F.cross_entropy(getattr(heads, key)(ht), torch.tensor([x[key] for x in labels]))
                      for key in ("t_quarter", "t_color", "t_shape", "t_count"))
            loss = loss + args.t_weight * lt_
            stats["target"] = lt_.item()
        if args.o_weight > 0:  # at the end of each option line: its letter, and whether it is the answer
            ho = out.hidden_states[args.aux_o_layer][rows[:, None], opos]  # (b, 4, d)
            letter = torch.arange(4).expand(len(labels), 4)
            match = torch.stack([letter[i] == "ABCD".index(x["answer"]) for i, x in enumerate(labels)]).long()
            hl = out.hidden_states[args.aux_q_layer][rows[:, None], opos]
            lo = (F.cross_entropy(heads.o_match(ho).flatten(0, 1), match.flatten())
                  + F.cross_entropy(heads.o_letter(hl).flatten(0, 1), letter.flatten()))
            loss = loss + args.o_weight * lo
            stats["option"] = lo.item()
    return loss, stats


def train_one(name: str, args) -> dict:
    from sharp.synthetic import ensure_split

    d = DEFAULTS[name]
    args = argparse.Namespace(**vars(args))
    for key in ("aux_weight", "q_weight", "t_weight", "o_weight", "schedule"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    steps = args.steps or d["steps"]
    bs = args.batch_size or d["batch_size"]
    lr = args.lr or d["lr"]
    warmup = args.warmup if args.warmup is not None else d["warmup"]
    train_n = args.train_n or d["train_n"]

    t_start = time.time()
    print(f"[{name}] data: train {train_n} docs, test {args.test_n} docs", flush=True)
    train_docs = ensure_split("train", n=train_n, seed=args.data_seed)
    test_docs = ensure_split("test", n=args.test_n, seed=args.data_seed)
    config = toy.toy_config(name)
    if args.text_layers:
        config["text_config"]["num_hidden_layers"] = args.text_layers
    bb = toy.build_untrained(name, config=config, seed=args.seed)
    train_px = toy.cached_pixels(bb, train_docs, args.cache_dir, verbose=True)
    test_px = toy.cached_pixels(bb, test_docs, args.cache_dir, verbose=True)
    t_data = time.time() - t_start
    n_params = sum(p.numel() for p in bb.model.parameters())
    print(f"[{name}] {n_params / 1e6:.2f} M parameters; data ready in {t_data:.0f} s", flush=True)

    model = bb.model
    model.train()
    heads, labels = None, None
    params = list(model.parameters())
    if args.aux_o_layer is None:
        args.aux_o_layer = bb.num_layers - 1
    if args.aux_weight > 0 or args.q_weight > 0 or args.t_weight > 0 or args.o_weight > 0:
        probe = toy.make_batch(bb, train_docs, train_px, [0])
        layout = bb.layout(probe)
        kinds = sorted({toy.question_kind(d) for d in train_docs})
        labels = [{**toy.visual_token_labels(bb, d, layout.grid), **toy.question_labels(d, kinds),
                   **toy.target_labels(d), "answer": d["answer"]} for d in train_docs]
        torch.manual_seed(args.seed + 1)
        heads = AuxHeads(bb.text_config.hidden_size, layout.frames, len(kinds))
        params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(len(train_docs)) for _ in range(math.ceil(steps * bs / len(train_docs)) + 1)])
    t0 = time.time()
    hist = []
    run_loss, run_acc = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, final=1.0 if args.schedule == "constant" else 0.05)
        idx = order[step * bs:(step + 1) * bs].tolist()
        batch = toy.make_batch(bb, train_docs, train_px, idx, with_answer=True)
        loss, st = compute_losses(bb, batch, [labels[i] for i in idx] if labels else None, heads, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        run_loss.append(st)
        run_acc.append(st["correct"])
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": float(np.mean([r["answer"] for r in run_loss])),
                   "train_acc_tf": 100 * float(np.mean(run_acc)), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.time() - t0, 1)}
            for key in ("color", "shape", "frame", "text", "question", "target", "option"):
                if key in run_loss[0]:
                    rec[f"aux_{key}"] = float(np.mean([r[key] for r in run_loss]))
            hist.append(rec)
            aux = "  ".join(f"{k[4:]} {v:.3f}" for k, v in rec.items() if k.startswith("aux_"))
            print(f"[{name}] step {rec['step']:4d}  loss {rec['loss']:.4f}  teacher-forced acc {rec['train_acc_tf']:5.1f}%"
                  f"  lr {rec['lr']:.2e}  {rec['seconds']:.0f} s  {aux}", flush=True)
            run_loss, run_acc = [], []
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            model.eval()
            acc, per = toy.letter_accuracy(bb, test_docs[:args.eval_n], _sub(test_px, args.eval_n), args.eval_batch)
            print(f"[{name}]   test[:{args.eval_n}] {acc:.1f}%  {_fmt(per)}  (argmax over the letters)", flush=True)
            model.train()
    t_train = time.time() - t0
    model.eval()

    print(f"[{name}] evaluating (greedy generation through sharp.prune, vanilla)", flush=True)
    te = toy.evaluate(bb, test_docs, store=test_px, batch_size=args.eval_batch)
    tr_n = min(args.train_eval_n, len(train_docs))
    tr = toy.evaluate(bb, train_docs[:tr_n], store=_sub(train_px, tr_n), batch_size=args.eval_batch)
    print(f"[{name}] train[:{tr_n}] {tr.accuracy:.1f}%  {_fmt(tr.per_qtype)}", flush=True)
    print(f"[{name}] test  {te.accuracy:.1f}%  {_fmt(te.per_qtype)}", flush=True)

    out = Path(args.out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "backbone.json").write_text(json.dumps({"kind": bb.kind, "tokenizer": "byte", "num_frames": bb.num_frames},
                                                  indent=2) + "\n")
    import transformers

    meta = {
        "backbone": name, "kind": bb.kind, "parameters": n_params,
        "steps": steps, "batch_size": bs, "lr": lr, "warmup": warmup, "weight_decay": args.weight_decay,
        "clip": args.clip, "aux_weight": args.aux_weight, "q_weight": args.q_weight,
        "schedule": args.schedule, "text_weight": args.text_weight, "aux_q_layer": args.aux_q_layer,
        "t_weight": args.t_weight, "aux_t_layer": args.aux_t_layer,
        "o_weight": args.o_weight, "aux_o_layer": args.aux_o_layer, "aux_sem_layer": args.aux_sem_layer,
        "aux_pos_layer": args.aux_pos_layer, "seed": args.seed, "data_seed": args.data_seed, "threads": torch.get_num_threads(),
        "train_docs": len(train_docs), "test_docs": len(test_docs), "num_frames": bb.num_frames,
        "visual_tokens": te.n_visual,
        "train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
        "train_accuracy": round(tr.accuracy, 2), "train_accuracy_docs": tr_n,
        "train_accuracy_per_qtype": {k: round(v, 2) for k, v in tr.per_qtype.items()},
        "test_accuracy": round(te.accuracy, 2),
        "test_accuracy_per_qtype": {k: round(v, 2) for k, v in te.per_qtype.items()},
        "final_loss": hist[-1]["loss"] if hist else None,
        "history": hist,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = os.path.getsize(out / "model.safetensors") / 2**20
    print(f"[{name}] saved {out} ({size:.1f} MiB); training {t_train:.0f} s", flush=True)
    return meta


def _sub(store, n):
    return toy.PixelStore(store.kind, store.u8[:n], store.thw[:n], store.mean, store.std)


def _fmt(per: dict) -> str:
    return " ".join(f"{k} {v:.0f}" for k, v in per.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="all", choices=["all", *toy.TOY_BACKBONES])
    ap.add_argument("--out-dir", default=str(toy.WEIGHTS_DIR), help="writes <out-dir>/<backbone>/ (default: sharp/weights)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--train-n", type=int, default=None, help="train docs (a prefix of the train split)")
    ap.add_argument("--test-n", type=int, default=200)
    ap.add_argument("--train-eval-n", type=int, default=200, help="train docs scored at the end")
    ap.add_argument("--seed", type=int, default=0, help="model init and data order")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic splits")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fix it for bit-reproducibility)")
    ap.add_argument("--cache-dir", default=None, help="preprocessed-video cache (default $SHARP_CACHE/toy)")
    ap.add_argument("--aux-weight", type=float, default=None, help="weight of the auxiliary visual losses (0: off)")
    ap.add_argument("--text-weight", type=float, default=0.0, help="weight of a next-token loss on the prompt text")
    ap.add_argument("--q-weight", type=float, default=None, help="weight of the question probes (0: off)")
    ap.add_argument("--aux-q-layer", type=int, default=2, help="hidden state of the answering position read by them")
    ap.add_argument("--t-weight", type=float, default=None, help="weight of the answer-state probes (0: off)")
    ap.add_argument("--aux-t-layer", type=int, default=3, help="hidden state of the answering position read by them")
    ap.add_argument("--text-layers", type=int, default=None, help="override the LM depth (experiments)")
    ap.add_argument("--o-weight", type=float, default=None, help="weight of the option probes (0: off)")
    ap.add_argument("--aux-o-layer", type=int, default=None, help="hidden state of the option ends read (default: last)")
    ap.add_argument("--schedule", default=None, choices=["cosine", "constant"])
    ap.add_argument("--aux-sem-layer", type=int, default=0, help="hidden state read by the colour/shape probes")
    ap.add_argument("--aux-pos-layer", type=int, default=1, help="hidden state read by the frame probe")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=0, help="score test[:eval-n] every N steps (0: never)")
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--eval-batch", type=int, default=8)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    names = list(toy.TOY_BACKBONES) if args.backbone == "all" else [args.backbone]
    summary = {}
    for name in names:
        meta = train_one(name, args)
        summary[name] = {k: meta[k] for k in ("test_accuracy", "train_accuracy", "train_seconds", "steps")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
