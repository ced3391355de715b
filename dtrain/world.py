"""The one place that knows the process world: rank, world size, device, backend.

It reads what the launcher set (torchrun's variables, else SLURM's when started by `srun`, else the
single-process defaults), forms the process group, and offers the few collectives the rest of the code
needs; they are no-ops in a single process, so callers never branch on the world size.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist

# Imported before any process group exists: torch.distributed.nn.functional binds group.WORLD into its
# default arguments when imported (DDP's construction imports it), which kept the group and its gloo
# threads running past destroy_process_group() into the interpreter's exit, the likely source of a
# rank's rare abort there ("terminate called without an active exception").
import torch.distributed.nn

from dtrain.errors import WorldError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    num_nodes: int = 1
    launcher: str = "single"  # single | torchrun | slurm
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"world_size={self.world_size} nodes={self.num_nodes} launcher={self.launcher} "
                f"device={self.device} backend={self.backend if self.distributed else '-'}")


@dataclass(frozen=True)
class DataParallel:
    """A rank's place among the ranks that split the data (the strategy's data-parallel dimension): which
    share of each global batch it trains on, and the group its sums are reduced over (None: every rank)."""
    rank: int = 0
    size: int = 1
    group: Any = None


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    return int(env[key]) if env.get(key, "") != "" else default


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise WorldError(f"cannot read SLURM_NODELIST={nodelist!r}; set MASTER_ADDR to the first node")
    prefix, ranges = m.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _launch_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Rank, sizes and rendezvous address as the launcher describes them (no device, no backend)."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a manual env:// launch)
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "WORLD_SIZE", 1))
        return dict(
            rank=_int(env, "RANK", 0), local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1), local_world_size=local_world,
            num_nodes=_int(env, "GROUP_WORLD_SIZE", max(1, _int(env, "WORLD_SIZE", 1) // local_world)),
            launcher="torchrun", master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):  # inside `srun`
        ntasks = _int(env, "SLURM_NTASKS", 1)
        nnodes = _int(env, "SLURM_NNODES", 1)
        # SLURM_STEP_TASKS_PER_NODE may read '2(x3)'; tasks are spread evenly in the layouts we launch.
        local_world = int(re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", "")
                                   or str(max(1, ntasks // nnodes))).group())
        job = _int(env, "SLURM_JOB_ID", 0)
        return dict(
            rank=_int(env, "SLURM_PROCID", 0), local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=ntasks, local_world_size=local_world, num_nodes=nnodes, launcher="slurm",
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_NODELIST", "localhost")),
            # Derived from the job id so concurrent jobs sharing a node do not collide.
            master_port=_int(env, "MASTER_PORT", 20000 + job % 20000),
        )
    return dict(launcher="single")


def from_launcher(env: Mapping[str, str] = os.environ) -> World:
    """Rank and sizes as the launcher set them, before the device is known: enough to report an error
    that happens while the config is still being read."""
    return World(**_launch_env(env))


def shared_run_id(env: Mapping[str, str] = os.environ) -> str:
    """A run id every process of one launch computes identically, with no communication.

    DTRAIN_RUN_ID wins; a SLURM job id survives requeues (so `resume=auto` finds the run); torchrun's
    rendezvous id is shared by all nodes; on one node its agent's start time and pid are shared by the
    local ranks and survive torchrun's restarts; a lone process uses the time now and its pid. The pid
    keeps two launches in the same second apart.
    """
    if env.get("DTRAIN_RUN_ID"):
        return env["DTRAIN_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"job{env['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    stamp = "%Y-%m-%d_%H-%M-%S"
    if "TORCHELASTIC_RUN_ID" in env:
        if _int(env, "GROUP_WORLD_SIZE", 1) > 1:
            return "rdzv-" + env["TORCHELASTIC_RUN_ID"]
        started = _process_start_time(os.getppid())
        if started is not None:
            return f"{time.strftime(stamp, time.localtime(started))}-{os.getppid()}"
    return f"{time.strftime(stamp)}-{os.getpid()}"


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a process, from Linux's /proc; None where that is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def from_env(device: str = "auto", backend: str = "auto",
             env: Mapping[str, str] = os.environ) -> World:
    """Describe this process's world; raises WorldError for a world that cannot work."""
    info = _launch_env(env)
    local_rank, local_world = info.get("local_rank", 0), info.get("local_world_size", 1)
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WorldError(f"trainer.device={device} but this machine has no CUDA device; "
                             "use trainer.device=cpu (or auto)")
        if local_world > torch.cuda.device_count() and info.get("world_size", 1) > 1:
            raise WorldError(f"{local_world} processes on this node but only "
                             f"{torch.cuda.device_count()} CUDA device(s); launch at most "
                             f"{torch.cuda.device_count()} per node (--nproc_per_node)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WorldError(f"trainer.device={device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise WorldError("dist.backend=nccl needs CUDA devices; this process runs on "
                         f"{dev}: use dist.backend=gloo (or auto)")
    return World(**info, device=dev, backend=backend)


@contextlib.contextmanager
def process_group(world: World, timeout_s: float) -> Iterator[World]:
    """Form the process group (if there is more than one process) and always tear it down."""
    if world.distributed:
        if world.launcher == "slurm":  # env:// reads these; torchrun sets them itself
            os.environ.setdefault("MASTER_ADDR", world.master_addr)
            os.environ.setdefault("MASTER_PORT", str(world.master_port))
            os.environ.setdefault("RANK", str(world.rank))
            os.environ.setdefault("WORLD_SIZE", str(world.world_size))
        if world.device.type == "cuda":
            torch.cuda.set_device(world.device)
        try:
            dist.init_process_group(
                world.backend, rank=world.rank, world_size=world.world_size,
                timeout=datetime.timedelta(seconds=timeout_s), store=_restart_safe_store(world, timeout_s),
                device_id=world.device if world.device.type == "cuda" else None,
            )
        except (RuntimeError, TimeoutError, ValueError) as e:
            raise WorldError(
                f"rank {world.rank}: could not form the process group of {world.world_size} at "
                f"{world.master_addr}:{world.master_port} within {timeout_s:g}s "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check that every "
                "rank was started and can reach that address (dist.timeout_s sets the wait)"
            ) from e
    try:
        yield world
    finally:
        # DDP holds the group: collect the released model (and optimizer, loaders) so that destroying
        # the group frees it and its threads now, not during the interpreter's exit.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def _restart_safe_store(world: World, timeout_s: float, env: Mapping[str, str] = os.environ):
    """torchrun shares its rendezvous store with the workers and keeps it across `--max-restarts`, so a
    restarted group can read the previous attempt's addresses and fail to connect (pytorch#135712).
    On one node every worker restarts together with the same TORCHELASTIC_RESTART_COUNT, so keys
    namespaced by it are fresh. Across nodes the counts can differ: there torchrun must be started with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/multinode.sh does). None: let torch make the store."""
    attempt = _int(env, "TORCHELASTIC_RESTART_COUNT", 0)
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if world.num_nodes > 1:
        if _int(env, "TORCHELASTIC_MAX_RESTARTS", 0) > 0 and world.is_main:
            import warnings
            warnings.warn("torchrun --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                          "in torchrun's environment (pytorch#135712), else a restarted group may not form; "
                          "launch/multinode.sh sets it", stacklevel=2)
        return None
    if attempt == 0:
        return None
    client = dist.TCPStore(world.master_addr, world.master_port, world.world_size, is_master=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"dtrain/attempt-{attempt}", client)


def kill_children(sig: int) -> None:
    """Send `sig` to this process's child processes (torch's agent starts its workers in their own
    sessions, so a signal to our process group would not reach them)."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                os.kill(int(stat.parent.name), sig)


# -- the collectives the rest of the code uses; identity in a single process -------------------------

def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """`t` summed over every rank (of `group`: None, every rank), in place."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running stats drift apart after DDP's last
    forward, which broadcasts them only at its start)."""
    broadcast_tensors(list(module.buffers()), src)


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank `src`'s values into `tensors` on every rank (each rank calls it with the same list)."""
    if dist.is_initialized():
        for t in tensors:
            dist.broadcast(t, src)


def collective_failure(e: BaseException) -> str | None:
    """'peer died' or 'timeout' for an error from a collective whose peers vanished or never came (gloo and
    NCCL report these as text); None for any other error."""
    text = str(e)
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return "peer died"
    if isinstance(e, dist.DistError) or "Timed out" in text or "timed out" in text:
        return "timeout"
    return None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (of `group`: default, every rank)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def first_disagreement(values: dict[str, Any]) -> str | None:
    """Every rank's `values` compared with rank 0's, in one collective: the first key that differs, said as
    'KEY is A on rank 0 but B on rank R', or None when all agree (the same answer on every rank)."""
    ranks = gather_objects(values)
    for rank, theirs in enumerate(ranks[1:], start=1):
        for key in [*ranks[0], *(k for k in theirs if k not in ranks[0])]:  # in rank 0's order
            if ranks[0].get(key) != theirs.get(key):
                return f"{key} is {ranks[0].get(key)!r} on rank 0 but {theirs.get(key)!r} on rank {rank}"
    return None


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's rows of `t` (ranks may hold different numbers), concatenated in rank order, on every rank
    (of `group`)."""
    if not dist.is_initialized():
        return t
    counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([len(t)], dtype=torch.int64, device=t.device), group=group)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), *t.shape[1:], dtype=t.dtype, device=t.device)  # all_gather needs one shape
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def new_group(backend: str):
    """A further process group of every rank (each rank must call this at the same point)."""
    return dist.new_group(backend=backend) if dist.is_initialized() else None


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """The main rank runs the block first (a download, say), then the others; also when it raises."""
    if not world.is_main:
        barrier()
    try:
        yield
    finally:
        if world.is_main:
            barrier()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value`, on every rank (which stop signal arrived anywhere, say)."""
    return max_each_over_ranks([value], device)[0]


def start_max_over_ranks(value: int, device: torch.device) -> Callable[[], int]:
    """`max_over_ranks` in the background: the all-reduce starts now, and calling what this returns waits
    for it and gives the result. Every rank starts and reads the same ones, in the same order."""
    t = torch.full((1,), value, dtype=torch.int64, device=device)  # a fill: no copy from the host to wait on
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)

    def result() -> int:
        work.wait()
        return int(t.item())
    return result


def max_each_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Element by element, the largest of every rank's `values`, on every rank, in one collective."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
