"""A fault campaign: many short training jobs, each hit by one random fault, every invariant checked each time.

    python tests/fault_campaign.py [--faults 30] [--seed 0] [--workdir DIR]

Faults: kill -9 of a rank at a random step (2 ranks under torchrun --max-restarts=1), SIGTERM, Ctrl-C
(SIGINT), a corrupt newest checkpoint, a full disk while writing a checkpoint (injected), a second job
launched into a live run's folder, SIGTERM or Ctrl-C sent to the whole process group of a job that streams
its data through DataLoader worker processes (as SLURM, `timeout` and terminals send them); on a real
tmpfs mounted at the checkpoint folder (needs root; skipped, and counted so, without), the disk filled or
made read-only at a random moment under checkpoint files, distributed checkpoints and asynchronous
distributed checkpoints (FSDP, 2 ranks); uneven evaluation shards under FSDP on 2 and 3 ranks; and one
rank given another override than the other. After each, the job is continued as a user would (the same
command, or resume=last) and these invariants are checked:

- no good checkpoint is lost or changed: every step file that existed keeps its bytes (or was pruned by
  keep_last after a newer one was written), and the newest good one is still there after the fault;
- no foreign file is touched: a file of the user's inside the run folder and one beside it keep their bytes;
- the continued run ends bit-identical (weights, atol=0) to an uninterrupted run of the same world size;
- no process is left behind, and every command ends within its bound;
- a fault the run cannot go on from is one line naming it and exit 2, and leaves `latest` naming a
  checkpoint that loads, with no temporary checkpoint behind.

Prints one line per fault and a table of counts; exits 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
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


SHARDED = ("dist.strategy=fsdp",)  # distributed checkpoints (a folder per step), 2 ranks
ASYNC = (*SHARDED, "checkpoint.async_save=true")


def weights(run: Path) -> dict:
    """The newest checkpoint's model: a file's, or a distributed checkpoint's consolidated here."""
    from dtrain import checkpoint
    return checkpoint.weights(checkpoint.load(run / "checkpoints" / "latest"))


def digest(path: Path) -> str:
    if path.is_dir():  # a distributed checkpoint: every file's bytes, in name order
        return hashlib.sha256(b"".join(digest(f).encode() for f in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_files(run: Path) -> dict[str, str]:
    folder = run / "checkpoints"
    return {p.name: digest(p) for p in folder.glob("step-*") if not p.name.endswith(".corrupt")} \
        if folder.is_dir() else {}


def latest_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("-")[1].split(".")[0])
    except (OSError, IndexError, ValueError):
        return -1


def mount_tmpfs(at: Path) -> bool:
    at.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(at)], capture_output=True)
    return done.returncode == 0


def one_line_exit_2(code: int, err: str, nproc: int) -> bool:
    """Exit 2 with dtrain's one line (torchrun itself exits 1 and reports each rank's code)."""
    return (code == 2 if nproc == 1 else code == 1 and "exitcode  : 2" in err) and err.count("dtrain: error:") == 1


def leftovers(run: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(run) in line]


class Campaign:
    def __init__(self, workdir: Path, seed: int):
        self.workdir, self.rng = workdir, random.Random(seed)
        self.violations: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()
        self.references = {n: self.reference(n) for n in (1, 2)}
        self.references["streamed"] = self.reference(1, *STREAMED)
        self.references["sharded"] = self.reference(2, *SHARDED)

    def reference(self, nproc: int, *args: str) -> dict:
        run = self.workdir / f"reference-{nproc}{'-' + args[0].split('=')[-1] if args else ''}"
        code, out, err, _ = launch(self.workdir, f"hydra.run.dir={run}", *args, nproc=nproc)
        assert code == 0, err[-3000:]
        return weights(run)

    def check(self, name: str, ok: bool, detail: str) -> None:
        if not ok:
            self.violations.append(f"{name}: {detail}")

    def run_one(self, i: int, kind: str) -> None:
        run, step = self.workdir / f"{i:02d}-{re.sub('[^a-z0-9]+', '-', kind.lower()).strip('-')}", \
            self.rng.randrange(5, STEPS - 2)
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
                if not before:  # it was the only one: never a silent start from step 0
                    code, out, err, t = launch(run, at)
                    durations.append(t)
                    self.check(name, code == 2 and "no checkpoint in" in err and err.count("\n") == 1,
                               f"resuming with no good checkpoint exited {code}: {err[-300:]}")
                    at = f"{at} resume=none"  # the user's choice: start over in this folder
            code, out, err, t = launch(run.parent.parent.parent if kind == "SIGINT" else run, *at.split())
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
        elif kind.startswith(("full disk (", "read-only (")):  # a real file system, filled or made read-only
            args = {"file": (), "DCP": SHARDED, "DCP async": ASYNC}[kind.split("(")[1].rstrip(")")]
            procs, folder = (2 if args else 1), run / "checkpoints"
            if not mount_tmpfs(folder):
                self.skipped[kind] += 1
                print(f"{name:28s} skipped (mounting a tmpfs needs root)", flush=True)
                return
            try:
                step = self.rng.randrange(5, STEPS - 12)
                name = f"#{i} {kind}@{step}"
                live = launch(run, at, *args, nproc=procs, fault=f"slow:0:{step}", wait=False)
                start = time.monotonic()
                while latest_step(run) < step // 5 * 5 and live.poll() is None and time.monotonic() - start < BOUND_S:
                    time.sleep(0.05)
                if kind.startswith("full disk"):
                    subprocess.run(["sh", "-c", f"cat /dev/zero > {folder / 'filler'}"], capture_output=True)
                else:
                    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
                out, err = live.communicate(timeout=BOUND_S)
                durations.append(time.monotonic() - start)
                self.check(name, one_line_exit_2(live.returncode, err, procs) and "could not write" in err
                           and "Exception in thread" not in err, f"the fault exited {live.returncode}: {err[-400:]}")
                self.check(name, not list(folder.glob(".*.tmp*")), "a temporary checkpoint was left behind")
                before = step_files(run)
                weights(run)  # latest loads
                if kind.startswith("full disk"):
                    (folder / "filler").unlink()
                else:
                    subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)
                code, out, err, t = launch(run, at, *args, nproc=procs)
                durations.append(t)
                self.check(name, code == 0, f"continuing exited {code}: {err[-300:]}")
                self.kept(name, run, before)
                final = weights(run)
            finally:
                subprocess.run(["umount", "-l", str(folder)], capture_output=True)
            return self.finish(name, kind, run, "sharded" if args else 1, final, foreign, durations)
        elif kind.startswith("uneven shards"):  # every forward a collective; val 65 = 33 + 32 or 22 + 22 + 21
            nproc = int(kind.split("(")[1][0])
            sizes = ("data.batch_size=33", "data.eval_batch_size=63") if nproc == 3 else ()
            code, out, err, t = launch(run, at, *SHARDED, "data.val_fraction=0.108", *sizes, "dist.timeout_s=30",
                                       nproc=nproc)
            durations.append(t)
            self.check(name, code == 0, f"exited {code}: {err[-300:]}")
            summary = json.loads((run / "summary.json").read_text()) if code == 0 else {}
            self.check(name, summary.get("val_samples") == 65, f"val_samples {summary.get('val_samples')}, not 65")
            return self.finish(name, kind, run, None, None, foreign, durations)
        elif kind == "rank config mismatch":
            nproc = 2
            code, out, err, t = launch(run, at, nproc=2, fault="mismatch:1:0")
            durations.append(t)
            self.check(name, one_line_exit_2(code, err, 2) and "the ranks disagree on what to train: optim.lr" in err,
                       f"the mismatch exited {code}: {err[-300:]}")
            self.check(name, step_files(run) == {}, "a checkpoint was written")
            code, out, err, t = launch(run, at, nproc=2)
            durations.append(t)
            self.check(name, code == 0, f"continuing exited {code}: {err[-300:]}")
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

        self.finish(name, kind, run, nproc, weights(run), foreign, durations)

    def finish(self, name: str, kind: str, run: Path, nproc, final: dict | None, foreign: dict,
               durations: list[float]) -> None:
        """The invariants every fault ends with (nproc None: no continued run to compare)."""
        if nproc is not None:
            reference = self.references[nproc]
            self.check(name, final.keys() == reference.keys() and all(torch.equal(final[k], reference[k])
                                                                      for k in final),
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
         "group Ctrl-C", "full disk (file)", "full disk (DCP)", "full disk (DCP async)", "read-only (file)",
         "read-only (DCP)", "read-only (DCP async)", "uneven shards (2 FSDP ranks)", "uneven shards (3 FSDP ranks)",
         "rank config mismatch")


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
    print("\n| fault | injected | skipped |\n|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {campaign.counts[kind]} | {campaign.skipped[kind]} |")
    print(f"| **all** | {sum(campaign.counts.values())} | {sum(campaign.skipped.values())} |\n\nviolations: "
          f"{len(campaign.violations)}")
    for v in campaign.violations:
        print("  " + v)
    return 1 if campaign.violations else 0


if __name__ == "__main__":
    sys.exit(main())
