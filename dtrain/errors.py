"""The errors dtrain reports to the user as one line, and the exit codes they map to.

The bottom floor of the package: it imports nothing from dtrain, so every module can raise these
without import cycles. Each `BadInput` message names what is wrong and what to do.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a rank failed: its message, prefixed [rank R], says why
EXIT_BAD_INPUT = 2  # config, data, checkpoint or world cannot work
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and it resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (after a checkpoint, when checkpointing is on)


class BadInput(Exception):
    """Input that cannot work; exit 2, nothing of the user's lost."""
    same_on_every_rank = False  # True: every rank raises it, so only the main rank reports it


class ConfigError(BadInput, ValueError):
    """A config value that cannot work (the same on every rank, so reported once)."""
    same_on_every_rank = True


class DataError(BadInput, RuntimeError):
    """A data set that is missing or unreadable; the message says which files to put where."""


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what to do."""


class WorldError(BadInput, RuntimeError):
    """The process world cannot be formed as asked."""


class Preempted(Exception):
    """A stop signal arrived on some rank; every rank stops after the same step and leaves with `code`."""

    def __init__(self, signum: int, code: int):
        super().__init__(signum)
        self.signum, self.code = signum, code
