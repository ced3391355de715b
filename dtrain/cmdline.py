"""Hydra's command line in any order. Hydra's own parser takes its flags (`--config-dir DIR`, `--config-name
NAME`, `-m`, ...) only before the key=value overrides; a user types them anywhere, as the README's own
`dtrain-launch launcher.nproc_per_node=2 --config-dir DIR model=...` does. `python -m dtrain`, its workers
and the launcher all read their arguments through `split`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# Hydra's flags that take a value (hydra/_internal/utils.py: get_args_parser), long and short
WITH_VALUE = frozenset({"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c",
                        "--package", "-p", "--experimental-rerun"})
INFO = ("--info", "-i")  # its value is optional: one of these
INFO_TOPICS = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})


@dataclass
class Args:
    flags: list[str] = field(default_factory=list)  # Hydra's flags, each followed by its value where it has one
    overrides: list[str] = field(default_factory=list)  # key=value, +key=value, ~key, in their order

    def in_hydra_order(self) -> list[str]:
        return [*self.flags, *self.overrides]

    def values(self, *names: str) -> list[str]:
        """The values given to a flag by any of its names (`--config-dir D` or `--config-dir=D`), in order."""
        found, args = [], iter(self.flags)
        for arg in args:
            name, eq, value = arg.partition("=")
            if name in names:
                found.append(value if eq else next(args, ""))
        return found

    def has(self, *names: str) -> bool:
        return any(arg.partition("=")[0] in names for arg in self.flags)


def split(argv: Sequence[str]) -> Args:
    """Hydra's flags apart from the overrides, each keeping its own order."""
    out, argv, i = Args(), list(argv), 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("-"):
            out.overrides.append(arg)
            continue
        name, eq, _ = arg.partition("=")
        if name in INFO and not eq and not (i < len(argv) and argv[i] in INFO_TOPICS):
            arg = f"{name}=all"  # bare: placed before an override, Hydra would take that for its topic
        out.flags.append(arg)
        takes = (name in WITH_VALUE or name in INFO and i < len(argv) and argv[i] in INFO_TOPICS) and not eq
        if takes and i < len(argv):
            out.flags.append(argv[i])
            i += 1
    return out
