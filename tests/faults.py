"""Run dtrain's real entry point with a fault injected from outside (no test hooks in dtrain itself).

    torchrun --nproc_per_node=2 tests/faults.py key=value ...     with DTRAIN_FAULT=ACTION:RANK:STEP
    python tests/faults.py --launch key=value ...                  dtrain.launch, its workers wrapped too

After optimizer step STEP on rank RANK: `raise` an error, `hang` forever, `kill` the process with SIGKILL,
`slow` sleeps 0.3 s after every step from STEP on, `term`/`usr1` it with SIGTERM/SIGUSR1 (as SLURM does on
preemption), `int` with SIGINT (Ctrl-C), `groupterm`/`groupint` send those to the whole process group (its
DataLoader workers too); `killsave` SIGKILLs rank 0 half-way through writing the checkpoint of step STEP
(inside the real atomic write); `enospc` fails that write as a full disk would (`enospc-summary`: the
write of summary.json); `crashstop` raises and `slowstop` sleeps 30 s on rank RANK when a stop signal is
saved; `diestart` ends rank RANK silently before the process group forms, `hangstart` hangs it before its
first collective, `mismatch` gives rank RANK the override optim.lr=0.002 (STEP is ignored for these).
Faults fire only in torchrun's first
attempt (TORCHELASTIC_RESTART_COUNT=0), so a restarted group runs clean. DTRAIN_FAULT_COUNT_ALLREDUCE=1
writes how many gradient all-reduces DDP ran to <run dir>/allreduce-rank<R>.txt; DTRAIN_DUMP_STATE=1
saves each rank's final model state to <run dir>/state-rank<R>.pt. DTRAIN_LIST_THREADS=DIR writes the
names of each rank's threads inside its process group and after the group's teardown to
DIR/threads-{inside,after}-rank<R>.txt.
"""

import contextlib
import os
import signal
import sys
import time

from dtrain import trainer
from dtrain.cli import main


def install() -> None:
    spec = os.environ.get("DTRAIN_FAULT")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        action, rank, step = spec.split(":")
        original = trainer.Trainer.optimizer_step

        def faulty_step(self):
            original(self)
            if action == "slow" and self.world.rank == int(rank) and self.progress.step >= int(step):
                time.sleep(0.3)  # a long job, so a test can signal it mid-training
            if self.world.rank == int(rank) and self.progress.step == int(step):
                if action == "raise":
                    raise RuntimeError(f"injected failure at step {step}")
                if action == "hang":
                    time.sleep(10_000)
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                if action == "usr1":
                    os.kill(os.getpid(), signal.SIGUSR1)
                if action == "int":  # Ctrl-C
                    os.kill(os.getpid(), signal.SIGINT)
                if action in ("groupterm", "groupint"):  # to the whole process group, DataLoader workers too
                    os.killpg(os.getpgrp(), signal.SIGTERM if action == "groupterm" else signal.SIGINT)

        trainer.Trainer.optimizer_step = faulty_step

        if action == "enospc":  # the disk is full when the checkpoint of step STEP is written
            import errno
            from dtrain import checkpoint
            original_write = checkpoint._atomic_write

            def full_write(path, write):
                if path.name == f"step-{int(step):08d}.pt":
                    raise OSError(errno.ENOSPC, "No space left on device")
                return original_write(path, write)

            checkpoint._atomic_write = full_write

        if action == "mismatch" and os.environ.get("RANK", "0") == rank:  # this rank alone trains other values
            sys.argv.append("optim.lr=0.002")

        if action in ("diestart", "hangstart"):  # dies before the group forms, or hangs before its first collective
            from dtrain import world
            original_group = world.process_group

            @contextlib.contextmanager
            def faulty_group(w, timeout_s):
                if action == "diestart" and w.rank == int(rank):
                    os._exit(1)  # as a worker killed by the system, before dtrain could say anything
                with original_group(w, timeout_s) as inside:
                    if action == "hangstart" and w.rank == int(rank):
                        time.sleep(10_000)
                    yield inside

            world.process_group = faulty_group

        if action == "enospc-summary":  # the disk fills up just before summary.json is written
            import errno
            from dtrain import rundir

            def no_space():
                raise OSError(errno.ENOSPC, "No space left on device")

            def full_summary(self, summary):
                self.write(self.summary, no_space)  # the run folder's real guarded write, failing

            rundir.RunDir.write_summary = full_summary

        if action == "killsave":
            import io
            from dtrain import checkpoint
            original_write = checkpoint._atomic_write

            def dying_write(path, write):
                if path.name != f"step-{int(step):08d}.pt":
                    return original_write(path, write)

                def half_then_die(f):  # inside the real write: half the file reaches the disk, then death
                    buf = io.BytesIO()
                    write(buf)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)

                return original_write(path, half_then_die)

            checkpoint._atomic_write = dying_write

        if action in ("crashstop", "slowstop"):  # a rank that crashes, or takes its time, saving on a stop signal
            from dtrain import checkpointer
            original_stop = checkpointer.Checkpointer.save_on_stop

            def faulty_stop(self, *args, **kwargs):
                if self.world.rank == int(rank):
                    if action == "crashstop":
                        raise RuntimeError("injected crash while stopping")
                    time.sleep(30)
                return original_stop(self, *args, **kwargs)

            checkpointer.Checkpointer.save_on_stop = faulty_stop

    if os.environ.get("DTRAIN_FAULT_COUNT_ALLREDUCE"):
        original_init = trainer.Trainer.__init__

        def counting_init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            calls = {"n": 0}
            path = self.run.path / f"allreduce-rank{self.world.rank}.txt"

            def hook(state, bucket):
                calls["n"] += 1
                path.write_text(str(calls["n"]))
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
                return allreduce_hook(None, bucket)

            self.net.register_comm_hook(None, hook)

        trainer.Trainer.__init__ = counting_init

    if os.environ.get("DTRAIN_DUMP_STATE"):
        original_fit = trainer.Trainer.fit

        def dumping_fit(self):
            result = original_fit(self)
            import torch
            torch.save(self.model.state_dict(), self.run.path / f"state-rank{self.world.rank}.pt")
            return result

        trainer.Trainer.fit = dumping_fit

    if os.environ.get("DTRAIN_LIST_THREADS"):
        from pathlib import Path

        from dtrain import world
        original_group = world.process_group

        def write_threads(when, rank):
            names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
            Path(os.environ["DTRAIN_LIST_THREADS"], f"threads-{when}-rank{rank}.txt").write_text("\n".join(names))

        @contextlib.contextmanager
        def listing_group(w, timeout_s):
            with original_group(w, timeout_s) as inside:
                write_threads("inside", w.rank)
                yield inside
            write_threads("after", w.rank)

        world.process_group = listing_group


if __name__ == "__main__":
    if sys.argv[1:2] == ["--launch"]:  # dtrain.launch, with every worker running this wrapper
        from dtrain import launch
        launch.WORKER = ("-u", __file__)
        sys.exit(launch.main(sys.argv[2:]))
    install()
    sys.exit(main())
