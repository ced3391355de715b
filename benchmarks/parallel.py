"""The GPT workload (experiment=char_gpt) against the strongest hand-written loop, and on 4 ranks DDP, FSDP,
2x2 (FSDP over dp=2, tensor parallel over tp=2; also with sequence and loss parallelism) and tp=4 side by
side.

    python benchmarks/parallel.py [--rounds 3] [--steps 60] [--device cpu|cuda] [--skip-ranks]

One process: `python -m dtrain experiment=char_gpt` and `--plain` (below: the same GPT class, the same
windows of the same text preloaded as one token tensor on the device, batches by index_select, fused AdamW,
the same clipping and cosine schedule, no host sync inside the timed steps), each its own process, the order
alternating round by round; tokens/s of training time (dtrain's summary; the plain loop times its steps
after 5 warm-up ones). Four ranks: each round runs every layout once, starting one further along the list;
tokens/s (median and range over the rounds) and what one rank holds (`state_bytes_per_rank`: parameters,
gradients and optimizer state). On a GPU (`--device cuda`) the summary's MFU is printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ("experiment=char_gpt", "logger.plots=false", "checkpoint.enabled=false", "trainer.log_every_n_steps=1000")


def plain(steps: int, device: str) -> None:
    """The hand-written loop: what an expert writes for this model and data."""
    import torch
    from dtrain import app, data
    from dtrain import world as w
    from dtrain.gpt import GPT
    cfg = app.make_config(app.compose(list(RECIPE)))
    splits = data.build(cfg.data, w.World())
    dev = torch.device(device)
    x, y = splits.train.x.to(dev), splits.train.y.to(dev)
    m = cfg.model.kwargs
    torch.manual_seed(cfg.seed)
    model = GPT(splits.out, x.shape[1], m["n_layer"], m["n_head"], m["n_embd"], m["dropout"], m["bias"],
                m["tie_weights"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=True)
    warmup, total = cfg.sched.warmup_steps, steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    order = torch.randperm(len(x), device=dev)
    batch = cfg.data.batch_size
    for step in range(steps + 5):
        if step == 5:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        idx = order[(step * batch) % (len(x) - batch):][:batch]
        logits = model(x.index_select(0, idx))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.index_select(0, idx).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip, foreach=True)
        opt.step()
        sched.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    timed = time.perf_counter() - start
    print("RESULT " + json.dumps({"tokens_per_sec": steps * batch * x.shape[1] / timed, "loss": float(loss)}))


def run_plain(steps: int, device: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--plain", "--steps", str(steps), "--device", device],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])["tokens_per_sec"]


def run_dtrain(steps: int, device: str, nproc: int = 1, *overrides: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        subprocess.run([*launcher, "-m", "dtrain", *RECIPE, f"trainer.max_steps={steps}", f"trainer.device={device}",
                        *overrides, f"hydra.run.dir={tmp}/run"], cwd=ROOT, capture_output=True, text=True, check=True)
        return json.loads((Path(tmp) / "run" / "summary.json").read_text())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-ranks", action="store_true", help="only the one-process comparison")
    args = p.parse_args()
    if args.plain:
        return plain(args.steps, args.device)
    ours, theirs, ratios = [], [], []
    for r in range(args.rounds):  # the order alternates, so drift in the machine's speed hits both alike
        if r % 2:
            b = run_plain(args.steps, args.device)
            a = run_dtrain(args.steps, args.device)["tokens_per_sec"]
        else:
            a = run_dtrain(args.steps, args.device)["tokens_per_sec"]
            b = run_plain(args.steps, args.device)
        ours.append(a)
        theirs.append(b)
        ratios.append(a / b)
        print(f"round {r + 1}: dtrain {a:,.0f} tokens/s, plain loop {b:,.0f} tokens/s, ratio {a / b:.3f}", flush=True)
    print(f"\none process ({args.device}), {args.rounds} rounds of {args.steps} steps: dtrain {spread(ours)} tokens/s, "
          f"plain loop {spread(theirs)}; dtrain / plain {statistics.median(ratios):.3f}x "
          f"({min(ratios):.3f}-{max(ratios):.3f})")
    if args.skip_ranks:
        return
    rows = {"DDP": ("dist.strategy=ddp",), "FSDP (dp=4)": ("dist.strategy=fsdp",),
            "2x2 (FSDP dp=2, tp=2)": ("dist.strategy=fsdp", "dist.tp=2"),
            "2x2, sequence and loss parallel": ("dist.strategy=fsdp", "dist.tp=2", "dist.sequence_parallel=true",
                                                "dist.loss_parallel=true"),
            "tp=4 (dp=1)": ("dist.strategy=fsdp", "dist.tp=4")}
    speed: dict[str, list[float]] = {name: [] for name in rows}
    held, mfu = {}, {}
    for r in range(args.rounds):  # each round runs every layout, starting one further along the list
        names = list(rows)[r % len(rows):] + list(rows)[:r % len(rows)]
        for name in names:
            s = run_dtrain(args.steps, args.device, 4, *rows[name])
            speed[name].append(s["tokens_per_sec"])
            held[name], mfu[name] = s["state_bytes_per_rank"]["total"], s.get("mfu")
            print(f"round {r + 1}: {name} {s['tokens_per_sec']:,.0f} tokens/s", flush=True)
    base = held["DDP"]
    print(f"\n| 4 ranks | tokens/s, median (range) of {args.rounds} | state bytes per rank | vs DDP |")
    print("|---|---|---|---|")
    for name in rows:
        extra = f", MFU {mfu[name]:.1%}" if mfu[name] is not None else ""
        print(f"| {name} | {spread(speed[name])}{extra} | {held[name]:,} | {held[name] / base:.2f}x |")

if __name__ == "__main__":
    main()
