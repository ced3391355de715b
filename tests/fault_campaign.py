"""A fault campaign: many short training jobs, each hit by one random fault, every invariant checked each time.

    python tests/fault_campaign.py [--faults 30] [--seed 0] [--workdir DIR]

Faults: kill -9 of a rank at a random step (2 ranks under torchrun --max-restarts=1), SIGTERM, Ctrl-C
(SIGINT), a corrupt newest checkpoint, a full disk while writing a checkpoint, a second job launched
into a live run's folder, and SIGTERM or Ctrl-C sent to the whole process group of a job that streams its
data through DataLoader worker processes (as SLURM, `timeout` and terminals send them). After each, the
job is continued as a user would (the same command, or
resume=last) and these invariants are checked:

- no good checkpoint is lost or changed: every step file that existed keeps its bytes (or was pruned by
  keep_last after a newer one was written), and the newest good one is still there after the fault;
- no foreign file is touched: a file of the user's inside the run folder and one beside it keep their bytes;
- the continued run ends bit-identical (weights, atol=0) to an uninterrupted run of the same world size;
- no process is left behind, and every command ends within its bound.

Prints one line per fault and a table of counts; exits 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FAULTS = str(ROOT / "tests" / "faults.py")
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("DTRAIN_RUN_ID", None)
CONFIG = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=601", "data.batch_size=32",
          "data.eval_batch_size=64", "optim=adam", "sched=cosine", "trainer.epochs=2", "seed=11",
          "checkpoint.every_n_steps=5", "checkpoint.keep_last=3")
STREAMED = ("data.loader=stream", "data.num_workers=2")  # the DataLoader path, with worker processes
STEPS = 2 * (481 // 32)  # 30 optimizer steps
BOUND_S = 150  # no command may take longer


def launch(cwd: Path, *args: str, nproc: int = 1, fault: str = "", restarts: int = 0, wait: bool = True):
    cmd = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               f"--nproc_per_node={nproc}", f"--max-restarts={restarts}"]
    cmd += [FAULTS, *CONFIG, *args]
    env = {**ENV, **({"DTRAIN_FAULT": fault} if fault else {})}
    # Its own session, so a fault that signals the job's process group reaches the job and its workers only.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    start = time.monotonic()
    out, err = proc.communicate(timeout=BOUND_S)
    return proc.returncode, out, err, time.monotonic() - start


def weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest, weights_only=True)["model"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_files(run: Path) -> dict[str, str]:
    folder = run / "checkpoints"
    return {p.name: digest(p) for p in folder.glob("step-*.pt")} if folder.is_dir() else {}


def leftovers(run: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(run) in line]


class Campaign:
    def __init__(self, workdir: Path, seed: int):
        self.workdir, self.rng = workdir, random.Random(seed)
        self.violations: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.references = {n: self.reference(n) for n in (1, 2)}
        self.references["streamed"] = self.reference(1, *STREAMED)

    def reference(self, nproc: int, *args: str) -> dict:
        run = self.workdir / f"reference-{nproc}{'-streamed' if args else ''}"
        code, out, err, _ = launch(self.workdir, f"hydra.run.dir={run}", *args, nproc=nproc)
        assert code == 0, err[-3000:]
        return weights(run)

    def check(self, name: str, ok: bool, detail: str) -> None:
        if not ok:
            self.violations.append(f"{name}: {detail}")

    def run_one(self, i: int, kind: str) -> None:
        run, step = self.workdir / f"{i:02d}-{kind}", self.rng.randrange(5, STEPS - 2)
        run.mkdir()
        mine, beside = run / "my-notes.txt", self.workdir / f"{i:02d}-beside.txt"
        mine.write_text(f"the user's own file {i}\n")
        beside.write_text(f"another file of the user's {i}\n")
        foreign = {p: digest(p) for p in (mine, beside)}
        name, nproc, durations = f"#{i} {kind}@{step}", 1, []  # nproc: which reference the end must equal
        at = f"hydra.run.dir={run}"

        if kind == "kill -9":
            nproc = 2
            code, out, err, t = launch(run, at, nproc=2, restarts=1, fault=f"kill:{self.rng.randrange(2)}:{step}")
            durations.append(t)
            self.check(name, code == 0 and "resumed from" in out, f"torchrun restart did not finish (exit {code})")
        elif kind in ("SIGTERM", "SIGINT", "corrupt newest"):
            signame = "int" if kind == "SIGINT" else "term"
            if kind == "SIGINT":  # the default run folder under runs/, continued with resume=last
                base, at = run, "resume=last"
                code, out, err, t = launch(base, fault=f"int:0:{step}")
                [run] = (base / "runs" / "mlp3-synthetic").iterdir()
            else:
                code, out, err, t = launch(run, at, fault=f"{signame}:0:{step}")
            durations.append(t)
            expected = 130 if kind == "SIGINT" else 75
            self.check(name, code == expected, f"stop exited {code}, expected {expected}: {err[-300:]}")
            before = step_files(run)
            if kind == "corrupt newest":
                newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
                newest.write_bytes(os.urandom(self.rng.randrange(1, 4000)))
                before.pop(newest.name)
            code, out, err, t = launch(run.parent.parent.parent if kind == "SIGINT" else run, at)
            durations.append(t)
            self.check(name, code == 0, f"continuing exited {code}: {err[-300:]}")
            self.kept(name, run, before)
        elif kind.startswith("group "):  # the whole process group, workers included, as clusters signal
            sig, expected = ("groupint", 130) if "Ctrl-C" in kind else ("groupterm", 75)
            code, out, err, t = launch(run, at, *STREAMED, fault=f"{sig}:0:{step}")
            durations.append(t)
            self.check(name, code == expected and "DataLoader worker" not in err and "Traceback" not in err,
                       f"stop exited {code}, expected {expected}: {err[-300:]}")
            self.check(name, (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}.pt",
                       "no checkpoint at the step the signal arrived")
            before = step_files(run)
            code, out, err, t = launch(run, at, *STREAMED)
            durations.append(t)
            self.check(name, code == 0, f"continuing exited {code}: {err[-300:]}")
            self.kept(name, run, before)
            nproc = "streamed"
        elif kind == "full disk":
            step = 5 * self.rng.randrange(2, STEPS // 5)  # a step that writes a checkpoint
            name = f"#{i} {kind}@{step}"
            code, out, err, t = launch(run, at, fault=f"enospc:0:{step}")
            durations.append(t)
            self.check(name, code == 2 and "No space left on device" in err and "Traceback" not in err,
                       f"full disk exited {code}: {err[-300:]}")
            before = step_files(run)
            self.check(name, f"step-{step - 5:08d}.pt" in before, "the checkpoint before the full disk is gone")
            code, out, err, t = launch(run, at)
            durations.append(t)
            self.check(name, code == 0, f"continuing exited {code}")
            self.kept(name, run, before)
        elif kind == "concurrent launch":
            live = launch(run, at, fault=f"hang:0:{step}", wait=False)
            start = time.monotonic()
            while step_files(run) == {} or not (run / "checkpoints" / "latest").exists():
                if time.monotonic() - start > BOUND_S or live.poll() is not None:
                    break
                time.sleep(0.2)
            time.sleep(0.5)
            before = step_files(run)
            code, out, err, t = launch(run, at)
            durations.append(t)
            self.check(name, code == 2 and f"pid {live.pid} " in err, f"second job exited {code}: {err[-300:]}")
            self.check(name, step_files(run) == before, "the second job changed the live run's checkpoints")
            live.kill()  # the live job dies without releasing the folder
            live.communicate()
            code, out, err, t = launch(run, at)
            durations.append(t)
            self.check(name, code == 0 and "taking over" in out, f"taking over exited {code}")
            self.kept(name, run, before)

        final = weights(run)
        reference = self.references[nproc]
        self.check(name, final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final),
                   "the continued run did not end bit-identical to an uninterrupted one")
        for path, value in foreign.items():
            self.check(name, path.exists() and digest(path) == value, f"{path.name} was touched")
        self.check(name, not leftovers(run), f"processes left behind: {leftovers(run)}")
        self.check(name, max(durations) < BOUND_S, f"a command took {max(durations):.0f}s")
        self.counts[kind] += 1
        print(f"{name:28s} {'ok' if not any(v.startswith(name + ':') for v in self.violations) else 'VIOLATED'} "
              f"({', '.join(f'{d:.0f}s' for d in durations)})", flush=True)

    def kept(self, name: str, run: Path, before: dict[str, str]) -> None:
        """Every step file from before the fault keeps its bytes, unless keep_last pruned it for a newer one."""
        after = step_files(run)
        for file, value in before.items():
            if file in after:
                self.check(name, after[file] == value, f"{file} was overwritten")
            else:
                newer = [f for f in after if f > file]
                self.check(name, len(newer) >= 3, f"{file} disappeared without {3} newer checkpoints")


KINDS = ("SIGTERM", "SIGINT", "corrupt newest", "full disk", "concurrent launch", "kill -9", "group SIGTERM",
         "group Ctrl-C")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip())
    workdir.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(workdir, args.seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(args.faults)]
    campaign.rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        campaign.run_one(i, kind)
    print("\n| fault | injected |\n|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {campaign.counts[kind]} |")
    print(f"| **all** | {sum(campaign.counts.values())} |\n\nviolations: {len(campaign.violations)}")
    for v in campaign.violations:
        print("  " + v)
    return 1 if campaign.violations else 0


if __name__ == "__main__":
    sys.exit(main())
