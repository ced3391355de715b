"""Launch: `python -m dtrain.launch [key=value ...]`, or the console script `dtrain-launch`.

Takes the same overrides as `python -m dtrain`, plus the `launcher.*` keys, and Hydra's `--config-dir DIR`,
`--config-name NAME` and `-m` anywhere among them. It composes and validates the whole config once, before any
worker starts (bad input: one line, exit 2, no run folder), then starts the workers with torchrun's own
elastic agent in this process; one process runs right here, without an agent. `-m` sweeps: every point is
validated first, then each is launched in turn into runs/multirun/<id>/<n>-<name>/ (a signal stops the sweep).

    launcher.nproc_per_node   processes on this node; 0: one per GPU, else 1
    launcher.nnodes           nodes; 0: SLURM_NNODES inside a SLURM allocation, else 1
    launcher.rdzv_endpoint    host:port of the rendezvous; "": the first host of SLURM's node list (port from
                              the job id) on several nodes, else this host on a free port
    launcher.rdzv_id          "": the SLURM job id, else one made for this launch
    launcher.max_restarts     restarts of the whole group after a worker failure (each resumes)
    launcher.monitor_interval seconds between the agent's checks of its workers

Exit codes are those of a single process: 0 done, 1 a rank failed (its own message is shown above, not
torchrun's traceback), 2 bad input, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint, 130 stopped by
Ctrl-C after a checkpoint. SIGTERM, SIGUSR1 and Ctrl-C sent to the launcher reach every worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from dtrain import app, cmdline, errors, rundir, validate
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, BadInput,
                           ConfigError)

WORKER = ("-u", "-m", "dtrain")  # what each worker runs, with the overrides after it


@dataclass(frozen=True)
class Plan:
    nproc_per_node: int
    nnodes: int
    rdzv_endpoint: str
    rdzv_id: str
    run_id: str  # the run folder's id, the same on every node

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


LAUNCHER_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--multirun", "-m")  # Hydra's, as dtrain's own


def arguments(argv: list[str]) -> cmdline.Args:
    """The command line, Hydra's flags in any position (dtrain/cmdline.py); a flag the launcher has no use
    for is one line."""
    args = cmdline.split(argv)
    for flag in args.flags:
        name = flag.partition("=")[0]
        if name.startswith("-") and name not in LAUNCHER_FLAGS:
            raise ConfigError(f"{name}: dtrain.launch takes key=value overrides, --config-dir DIR, --config-name "
                              "NAME and -m (a sweep) only")
    return args


def compose(argv: list[str], with_hydra: bool = False):
    """The config `python -m dtrain argv` would run (app.compose), composed without running anything. As
    Hydra's parser does, the last --config-dir and --config-name count."""
    args = arguments(argv)
    names, folders = args.values("--config-name", "-cn"), args.values("--config-dir", "-cd")
    for flag, values in (("--config-dir", folders), ("--config-name", names)):
        if values and not values[-1]:
            raise ConfigError(f"{flag}: give a value ({flag} {'DIR' if flag == '--config-dir' else 'NAME'})")
    return app.compose(args.overrides, hydra=with_hydra, search=[Path(folders[-1])] if folders else [],
                       name=names[-1] if names else app.CONFIG_NAME)


def sweep(argv: list[str]) -> list[list[str]]:
    """`-m`: the command line of each point of the sweep (Hydra's basic sweeper's order: the last key
    varies fastest), without -m; one point, as given, without it."""
    args = arguments(argv)
    if not args.has("--multirun", "-m"):
        return [argv]
    for override in args.overrides:  # Hydra's sweep plug-ins are python -m dtrain -m's, not the launcher's
        if override.lstrip("+~").startswith(("hydra/launcher=", "hydra/sweeper=", "hydra.sweeper.", "hydra.launcher.")):
            raise ConfigError(f"{override}: dtrain.launch -m sweeps the points one after another itself; for Hydra's "
                              "launchers and sweepers (SLURM, ...) use python -m dtrain -m")
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    try:
        points = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args.overrides), None)[0]
    except HydraException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    flags = [f for f in args.flags if f not in ("--multirun", "-m")]
    return [[*flags, *point] for point in points]


def plan(cfg: Config, env: Mapping[str, str] = os.environ) -> Plan:
    """Processes, nodes and rendezvous from the launcher keys, else from the machine and SLURM."""
    lc, in_slurm = cfg.launcher, bool(env.get("SLURM_JOB_ID"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and cfg.trainer.device != "cpu" else 0
    nproc = lc.nproc_per_node or max(gpus, 1)
    nnodes = lc.nnodes or (int(env.get("SLURM_NNODES", "1")) if in_slurm else 1)
    rdzv_id = lc.rdzv_id or (env["SLURM_JOB_ID"] if in_slurm else uuid.uuid4().hex[:12])
    endpoint = lc.rdzv_endpoint
    if not endpoint and nnodes > 1:
        if not in_slurm:
            raise ConfigError(f"launcher.nnodes={nnodes} needs launcher.rdzv_endpoint=HOST:PORT (a host every "
                              "node can reach), or a SLURM allocation to read it from")
        host = w.first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "localhost"))
        endpoint = f"{host}:{20000 + int(env['SLURM_JOB_ID']) % 20000}"
    run_id = env.get("DTRAIN_RUN_ID") or (
        w.shared_run_id(env) if in_slurm or nnodes == 1 else f"rdzv-{rdzv_id}")
    return Plan(nproc, nnodes, endpoint or "localhost:0", rdzv_id, run_id)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); dtrain.validate has checked the form."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def check_rendezvous(p: Plan, timeout_s: float) -> None:
    """An endpoint that cannot work is one line before any worker starts, never a hang: a host that does
    not resolve; on one node (where the launcher hosts the rendezvous store) a port something else holds;
    on several nodes, an endpoint where no rendezvous store answers within dist.timeout_s."""
    host, port = split_endpoint(p.rdzv_endpoint)
    key = f"launcher.rdzv_endpoint={p.rdzv_endpoint}"
    try:
        socket.getaddrinfo(host, port)
    except OSError as e:
        raise ConfigError(f"{key}: the host {host!r} cannot be resolved ({e.strerror or e}); give a host name or "
                          "address every node can reach") from None
    if port == 0:  # a free port, picked when the store starts
        return
    if p.nnodes == 1 or _is_this_host(host):
        problem = _port_taken(port)
        if problem is None:
            return  # the store will be ours
        if p.nnodes == 1:
            raise ConfigError(f"{key}: port {port} is in use on this host ({problem}); choose a free port, or "
                              "leave launcher.rdzv_endpoint unset and a free one is picked")
    _probe_store(host, port, timeout_s, key)


def _is_this_host(host: str) -> bool:
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname  # what c10d's rendezvous uses
    return _matches_machine_hostname(host)


def _port_taken(port: int) -> Optional[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds: TIME_WAIT is no obstacle
        try:
            s.bind(("", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def _probe_store(host: str, port: int, timeout_s: float, key: str) -> None:
    """Wait until a rendezvous store answers at host:port. torch's store client waits forever on a port
    held by something that accepts connections but is not a store, so it runs in a thread we stop
    waiting for."""
    import datetime
    import threading
    deadline = time.monotonic() + timeout_s
    while True:  # first until anything accepts (the first node may start later than this one)
        try:
            socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())).close()
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{key}: nothing answered within dist.timeout_s={timeout_s:g}; start the first "
                                  "node (or check the address), then this one") from None
            time.sleep(0.5)
    answered: list[bool] = []

    def connect() -> None:
        with contextlib.suppress(Exception):
            dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
            answered.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(max(1.0, deadline - time.monotonic()))
    if not answered:
        raise ConfigError(f"{key}: something accepts connections there but no rendezvous store answered within "
                          f"dist.timeout_s={timeout_s:g} (another program holds the port?); choose another port")


def check(cfg: Config, p: Plan) -> None:
    """What the workers would refuse, refused before any starts."""
    cuda = cfg.trainer.device.startswith("cuda") or cfg.trainer.device == "auto" and torch.cuda.is_available()
    if cuda and p.nproc_per_node > max(torch.cuda.device_count(), 1):
        raise ConfigError(f"launcher.nproc_per_node={p.nproc_per_node} but this node has "
                          f"{torch.cuda.device_count()} CUDA device(s); launch at most one process per GPU")
    world = w.World(world_size=p.world_size, device=torch.device("cuda" if cuda else "cpu"))
    validate.check_world(cfg, world)
    if cfg.dist.tp > 1:
        from dtrain import build
        build.check_tensor_plan(cfg, world)
    if p.world_size > 1:
        check_rendezvous(p, cfg.dist.timeout_s)


def exit_code(codes: Mapping[int, int], reported: Optional[Mapping[int, int]] = None) -> tuple[int, str]:
    """One exit code for the job from the failed workers' own codes (negative: killed by a signal, which
    the agent does to the others once one fails), and what to say about it. `reported`: the ranks that
    ended through dtrain's own exit path (app.start), which printed their own one-line message."""
    own = {rank: c for rank, c in codes.items() if c > 0}
    if not own:
        killed = ", ".join(f"rank {r} by {signal.Signals(-c).name}" for r, c in sorted(codes.items()) if c < 0)
        return EXIT_FAILED, f"workers were killed: {killed or codes}"
    silent = sorted(r for r in own if reported is not None and r not in reported)
    for code in (EXIT_BAD_INPUT, EXIT_FAILED):
        if code in own.values():
            if silent:  # died before dtrain could report (killed by the system, a crash in a library)
                return code, f"rank {silent[0]} exited with code {own[silent[0]]} without a message of its own"
            return code, ""  # the ranks printed their own one-line message
    if set(own.values()) in ({EXIT_PREEMPTED}, {EXIT_INTERRUPTED}):
        return next(iter(own.values())), ""
    rank, code = min(own.items())
    return EXIT_FAILED, f"rank {rank} exited with code {code}"


def run_workers(argv: list[str], cfg: Config, p: Plan) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torch's agent turns the signals it handles into a SignalException, on which it sends that same
    # signal to every worker and waits for them. It handles SIGTERM and SIGINT by default; SIGUSR1
    # (SLURM's usual warning) is added by handling all three here and raising what the agent expects.
    received: dict[str, int] = {}

    def forward(signum, frame):
        if "signum" not in received:
            received["signum"] = signum
            raise SignalException(f"dtrain.launch got {signal.Signals(signum).name}", sigval=signal.Signals(signum))
        if signum == signal.SIGINT:  # Ctrl-C again: stop the workers at once
            w.kill_children(signal.SIGKILL)
            raise KeyboardInterrupt
        # A repeated SIGTERM/SIGUSR1 (a scheduler insisting) changes nothing: the workers are saving.

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we say what happened
    timeout = int(math.ceil(cfg.dist.timeout_s))
    launch = LaunchConfig(min_nodes=p.nnodes, max_nodes=p.nnodes, nproc_per_node=p.nproc_per_node,
                          run_id=p.rdzv_id, rdzv_backend="c10d", rdzv_endpoint=p.rdzv_endpoint,
                          # a rendezvous that cannot form (a peer missing, a port held by something
                          # that is not a rendezvous store) fails within dist.timeout_s, never hangs
                          rdzv_configs={"join_timeout": timeout, "read_timeout": timeout},
                          max_restarts=cfg.launcher.max_restarts, monitor_interval=cfg.launcher.monitor_interval,
                          start_method="spawn", shutdown_timeout=int(cfg.trainer.stop_grace_s) + 10,
                          signals_to_handle="SIGHUP,SIGQUIT")  # TERM, INT and USR1 are ours (`forward`)
    # Each worker leaves its own exit code here (app.start): after a stop signal the verdict comes from
    # the workers themselves, not from whatever files the run folder holds.
    codes_dir = Path(tempfile.mkdtemp(prefix="dtrain-launch-"))
    os.environ[errors.EXIT_CODE_DIR] = str(codes_dir)
    try:
        elastic_launch(launch, sys.executable)(*WORKER, *argv)
        return 0
    except ChildFailedError as e:
        code, why = exit_code({rank: f.exitcode for rank, f in e.failures.items()}, errors.read_exit_codes(codes_dir))
    except SignalException:
        code, why = stopped_code(errors.read_exit_codes(codes_dir), p.nproc_per_node, received["signum"])
    except KeyboardInterrupt:  # Ctrl-C twice: the workers were killed without finishing their step
        code, why = EXIT_INTERRUPTED, "interrupted; the workers were stopped at once"
    except RendezvousError as e:
        code, why = EXIT_BAD_INPUT, rendezvous_failure(p.rdzv_endpoint, cfg.dist.timeout_s, e)
    finally:
        shutil.rmtree(codes_dir, ignore_errors=True)
    if why:
        print(f"dtrain.launch: {why}", file=sys.stderr, flush=True)
    return code


def rendezvous_failure(endpoint: str, timeout_s: float, e: BaseException) -> str:
    detail = (str(e).splitlines() or [""])[0][:200]
    detail = f": {detail}" if detail and detail != type(e).__name__ else ""
    return (f"error: the rendezvous at launcher.rdzv_endpoint={endpoint} did not form within dist.timeout_s="
            f"{timeout_s:g} ({type(e).__name__}{detail}); check that the port is free on the first node "
            "and that every node can reach it, or leave launcher.rdzv_endpoint unset on one node")


def stopped_code(codes: Mapping[int, int], workers: int, signum: int) -> tuple[int, str]:
    """After a stop signal, the job's code from the exit codes this node's `workers` left: theirs when
    every one of them exited on its own (75 or 130 only if each saved a checkpoint after the signal;
    1 if one crashed), else 128 + the signal, as a process killed by it."""
    name = signal.Signals(signum).name
    if len(codes) < workers:
        return 128 + signum, (f"stopped by {name}; {workers - len(codes)} of {workers} worker(s) did not exit "
                              "on their own, so no checkpoint after the signal can be trusted")
    if set(codes.values()) == {128 + signum}:  # checkpointing was off: the workers said so
        return 128 + signum, ""
    return exit_code(codes)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        points = sweep(argv)
        if arguments(argv).has("--multirun", "-m"):  # each point in a folder of the sweep's, as Hydra's
            points = [[*point, f"hydra.run.dir={sweep_folder(point, n)}"] for n, point in enumerate(points)]
        planned = [(point, *validated(point)) for point in points]  # every point, before any starts
    except BadInput as e:
        print(f"dtrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    worst = 0
    for n, (point, cfg, p) in enumerate(planned):
        if len(planned) > 1:
            print(f"dtrain.launch: sweep point {n + 1}/{len(planned)}: {' '.join(point)}", flush=True)
        code = launch(point, cfg, p)
        worst = worst or code
        if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED) or code >= 128:  # a signal: the rest of the sweep is not run
            return code
    return worst


def sweep_folder(point: list[str], n: int) -> str:
    """A sweep point's run folder: hydra.sweep.dir/hydra.sweep.subdir (<n>-<name> unless overridden), as
    `python -m dtrain -m` names it."""
    full = compose([*point, f"hydra.job.num={n}"], with_hydra=True)
    return str(Path(str(full.hydra.sweep.dir)) / str(full.hydra.sweep.subdir))


def validated(argv: list[str]) -> tuple[Config, Plan]:
    cfg = app.make_config(compose(argv))
    p = plan(cfg)
    check(cfg, p)
    return cfg, p


def launch(argv: list[str], cfg: Config, p: Plan) -> int:
    """One run: in this process, or its workers under torchrun's agent."""
    os.environ["DTRAIN_RUN_ID"] = p.run_id  # every worker, on every node, names the same run folder
    if p.nproc_per_node > 1:  # as torchrun sets it, so a run stopped under one resumes bit-identically under the other
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if p.nnodes > 1:  # torchrun's shared store breaks restarts across nodes (pytorch#135712)
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if p.world_size == 1:
        return run_here(argv)
    run_dir = Path(str(compose(argv, with_hydra=True).hydra.run.dir)).absolute()  # as the workers will name it
    try:
        rundir.check_creatable(run_dir)
    except BadInput as e:
        print(f"dtrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(f"dtrain.launch: {p.nproc_per_node} process(es) x {p.nnodes} node(s), rendezvous {p.rdzv_endpoint} "
          f"id {p.rdzv_id}, run folder {run_dir}", flush=True)
    return run_workers(argv, cfg, p)


def run_here(argv: list[str]) -> int:
    """One process: training itself, in this process (the Python API's path: runs.train_composed)."""
    from dtrain import runs
    try:
        runs.train_composed(compose(argv, with_hydra=True))
    except runs.TrainingFailed as e:
        return e.code
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
