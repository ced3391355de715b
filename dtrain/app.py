"""The one start-up path every entry point takes: typed config -> world -> process group -> run -> exit code.

    python -m dtrain            dtrain/__main__.py   train
    python -m dtrain.evaluate   dtrain/evaluate.py   evaluate a checkpoint

An entry says how to make its `Config` and what to run with it; `start` does the rest the same way for
all: the world is read from the launcher, checked against the config, the process group formed and always
torn down, and every error becomes one line naming the rank and an exit code (`errors.EXIT_*`).
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from dtrain import augment, config, logs, optim, strategy, validate
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, BadInput, ConfigError, Diverged, Preempted,
                           record_exit_code)


def conf_dir() -> str:
    """conf/: inside the installed package (a wheel or `pip install .`), else at the repository root
    (an editable install), where it stays for people reading and editing the repository."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = conf_dir()
CONFIG_NAME = "config"  # the primary config; --config-name picks another (in dtrain's folder or the user's)
config.register()


def compose(overrides: Sequence[str], hydra: bool = False, search: Sequence[Path] = (),
            name: str = CONFIG_NAME) -> DictConfig:
    """The config `python -m dtrain *overrides` runs, composed without running anything or making a folder
    (`hydra`: with Hydra's own node, which says where the run folder will be; `search`: the user's own
    config folders, searched after dtrain's). Hydra's errors (an unknown key or option, a wrong type)
    become one-line ConfigErrors, an unknown key with the closest one there is."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            if search:
                _search_also(search)
            return hydra_compose(name, overrides=list(overrides), return_hydra_config=hydra)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        line = f"{str(e).splitlines()[0].rstrip('.')}{cause}"
        unknown = re.match(r"Could not override '([^']+)'", line)
        raise ConfigError(line + (validate.closest_key(unknown.group(1)) if unknown else "")) from None


def _search_also(folders: Sequence[Path]) -> None:
    """Hydra's search path as `python -m dtrain --config-dir DIR` makes it: dtrain's folder first (its names
    win), the user's after it, the primary config (--config-name) found in either. Only Hydra's internals
    build that search path: `hydra.searchpath=[...]` does not reach the primary config."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    path = create_config_search_path(CONF_DIR)
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"--config-dir {folder}: no such folder; give the folder holding your config groups "
                              "(model/NAME.yaml, ...)")
        path.prepend("command-line", f"file://{Path(folder).absolute()}", SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()  # inside initialize_config_dir, which restores the one before on exit
    Hydra.create_main_hydra2("app", path)


def make_config(dcfg: DictConfig, given: frozenset[str] = frozenset()) -> Config:
    """A composed DictConfig as the typed, validated Config, checked against the registries' names.
    `given`: the parts dtrain.fit passes as objects."""
    choices = {"optim": optim.OPTIMIZERS, "sched": optim.SCHEDULES, "data.augment": augment.NAMES}
    cfg = validate.to_config(dcfg, choices, {"model": config.BUILTIN_MODELS, "data": config.BUILTIN_DATA}, given)
    optim.check(cfg.optim, sharded=strategy.resolve(cfg.dist.strategy).shards_parameters)
    return cfg


def start(make: Callable[[], Config], body: Callable[[Config, w.World], Any]) -> int:
    """Make the config, form the world and its process group, run `body(cfg, world)`; the exit code."""
    def setup_and_run() -> int:
        cfg = make()
        world = w.from_env(cfg.trainer.device, cfg.dist.backend)
        validate.check_world(cfg, world)

        def run() -> None:  # what `body` returns is its result, not an exit code
            body(cfg, world)

        with w.process_group(world, cfg.dist.timeout_s):
            # Caught inside the group's block, so the traceback and all it holds (model, optimizer,
            # loader) die before the group is torn down; recorded before the teardown too, which may wait
            # on a peer still inside a collective (the stop watchdog then ends this process).
            code = exit_code(run, world, cfg.dist.timeout_s)
            record_exit_code(code)
            return code

    code = EXIT_FAILED
    try:
        code = exit_code(setup_and_run, w.from_launcher())
        return code
    finally:
        logs.close_console()
        record_exit_code(code)


def exit_code(fn: Callable[[], int | None], world: w.World, timeout_s: float = 0) -> int:
    """Run `fn` (which may return an exit code), turning any exception into an exit code and a message
    that names this rank."""
    try:
        return fn() or 0
    except Preempted as e:
        return e.code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: nothing to save
        report(f"{prefix(world)}dtrain: interrupted")
        return EXIT_INTERRUPTED
    except Diverged as e:  # each rank says where its loss went, in one line: no traceback helps here
        report(f"{prefix(world)}dtrain: error: {e}")
        return EXIT_FAILED
    except BadInput as e:
        if world.is_main or not e.same_on_every_rank:  # say once what every rank found
            report(f"{'' if e.same_on_every_rank else prefix(world)}dtrain: error: {e}")
        return EXIT_BAD_INPUT
    except Exception as e:
        failure = w.collective_failure(e) if world.distributed else None
        if failure:  # this rank is fine; say what happened to the others, not this rank's traceback
            why = {"peer died": "another rank died (its connection closed mid-collective; see its own message "
                                "or the launcher's)",
                   "timeout": f"a collective did not complete within dist.timeout_s={timeout_s:g}: another "
                              "rank is stuck (see its own message)"}[failure]
            report(f"{prefix(world)}dtrain: {why}; {type(e).__name__}: {str(e).splitlines()[0]}")
        else:
            report(f"{prefix(world)}dtrain: {type(e).__name__}: {e}", traceback.format_exc())
        return EXIT_FAILED


def prefix(world: w.World) -> str:
    return f"[rank {world.rank}] " if world.distributed else ""


def report(line: str, detail: str = "") -> None:
    with contextlib.suppress(Exception):  # the run folder may be the thing that failed (a full disk)
        logs.to_file(line + (f"\n{detail.rstrip()}" if detail else ""))
    print(line, file=sys.stderr, flush=True)
    if detail:
        print(detail, file=sys.stderr, flush=True)


def key_value_main(doc: str, defaults: dict[str, Any], body: Callable[[dict[str, Any]], Any],
                   argv: list[str] | None = None) -> int:
    """A small command's entry (`python -m dtrain.predict ckpt=... input=...`): key=value arguments typed
    by `defaults` (None: required), then `body(args)`; bad input is one line and exit 2."""
    def parse() -> None:
        args = dict(defaults)
        for item in sys.argv[1:] if argv is None else argv:
            if item in ("-h", "--help"):
                print(doc)
                return
            key, sep, value = item.partition("=")
            if not sep or key not in defaults:
                raise ConfigError(f"{item!r}: expected key=value with a key among {', '.join(defaults)}")
            kind = type(defaults[key]) if defaults[key] is not None else str
            try:
                args[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: not a {kind.__name__}") from None
        missing = [k for k, v in args.items() if v is None]
        if missing:
            raise ConfigError(f"{', '.join(f'{k}=' for k in missing)} required (see --help)")
        body(args)

    try:
        return exit_code(parse, w.World())
    finally:
        logs.close_console()
