"""The metric sinks: metrics go through `MetricLogger` to the sinks the `logger.*` flags turn on (console,
metrics.jsonl, TensorBoard, wandb), on the main rank only; each sink is one entry in SINKS. The plots are a
callback (dtrain.callbacks.Plots) drawn from what these sinks wrote."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from dtrain.config import LoggerConfig
from dtrain.logs import duration, fmt, log
from dtrain.rundir import RunDir, as_json
from dtrain.world import World

# -- metric sinks --------------------------------------------------------------------------------------

class Sink(Protocol):
    def write(self, kind: str, metrics: dict) -> None: ...  # kind: "step" | "epoch"
    def close(self) -> None: ...
    # optional: rewind(step), summary(summary)


def tags(kind: str, metrics: dict) -> dict[str, float]:
    """Metric names as TensorBoard and wandb show them: train/loss, val/acc, step/lr, epoch/lr, ..."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or v is None:
            continue
        if kind == "epoch" and k.startswith(("train_", "val_")):
            out[k.replace("_", "/", 1)] = v
        else:
            out[f"{kind}/{k}"] = v
    return out


class JsonlSink:
    """metrics.jsonl: one JSON object per epoch, appended and flushed as it happens."""

    def __init__(self, run: RunDir, cfg: LoggerConfig, context: "Context"):
        self.run, self.path = run, run.metrics  # written on the first epoch: a run failing before has none

    def write(self, kind: str, metrics: dict) -> None:
        if kind == "epoch":
            self.run.write_text(self.path, as_json(metrics, "metrics") + "\n", append=True)

    def rewind(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run logs those epochs again)."""
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if len(kept) != len(lines):
                self.run.write_text(self.path, "".join(kept))

    def close(self) -> None:
        pass


class ConsoleSink:
    """Epoch lines always; step lines as a progress bar on a terminal, else as periodic log lines."""

    def __init__(self, run: RunDir, cfg: LoggerConfig, context: "Context"):
        self.context = context
        self.show_bar = sys.stdout.isatty() if cfg.progress_bar is None else cfg.progress_bar
        self.train_bar = None

    def write(self, kind: str, metrics: dict) -> None:
        c = self.context
        head = f"epoch {metrics['epoch']} step {metrics['step']}"
        if kind == "epoch":
            rest = " ".join(f"{k} {fmt(v)}" for k, v in metrics.items() if k not in ("epoch", "step"))
            log.info(f"{head} | {rest}")
        elif self.train_bar is not None:
            self.train_bar.set_postfix({k: fmt(v) for k, v in metrics.items() if k not in ("epoch", "step")},
                                       refresh=False)
        else:
            rest = " ".join(f"{k} {fmt(v)}" for k, v in metrics.items()
                            if k not in ("epoch", "step", "steps_per_sec"))
            if metrics.get("steps_per_sec"):
                rest += f" eta {duration((c.total_steps - metrics['step']) / metrics['steps_per_sec'])}"
            log.info(f"  {head}/{c.total_steps} {rest}")

    def advance(self, step: int, epoch: int) -> None:
        if not self.show_bar:
            return
        if self.train_bar is None:
            self.train_bar = bar(None, "train", self.context.total_steps, initial=step, unit="step")
        self.train_bar.set_description(f"epoch {epoch + 1}/{self.context.epochs}", refresh=False)
        self.train_bar.update(step - self.train_bar.n)

    def close(self) -> None:
        if self.train_bar is not None:
            self.train_bar.close()
            self.train_bar = None


def bar(iterable: Optional[Iterable], desc: str, total: int, **kwargs):
    from tqdm import tqdm  # only when a bar is shown
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)


class TensorBoardSink:
    """<run>/tensorboard/: scalars per logged step and per epoch, and at the end the run's hyper-parameters
    with its final metrics (TensorBoard's HPARAMS tab). A resumed run purges the steps it runs again."""

    def __init__(self, run: RunDir, cfg: LoggerConfig, context: "Context"):
        self.run, self.folder, self.context = run, run.path / "tensorboard", context
        self.purge_step: Optional[int] = None
        self.writer = None

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = self.run.write(self.folder, lambda: SummaryWriter(str(self.folder),
                                                                            purge_step=self.purge_step))
        return self.writer

    def rewind(self, step: int) -> None:
        self.purge_step = step + 1

    def write(self, kind: str, metrics: dict) -> None:
        writer = self._writer()
        for tag, value in tags(kind, metrics).items():
            writer.add_scalar(tag, value, metrics["step"])
        writer.flush()

    def summary(self, summary: dict) -> None:
        final = {f"final/{k}": v for k, v in summary.items()
                 if k.startswith(("val_", "test_", "train_")) and isinstance(v, (int, float))}
        self._writer().add_hparams(flat_hparams(self.context.config), final, run_name=".",
                                   global_step=summary["steps"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flat_hparams(config: dict, prefix: str = "") -> dict[str, Any]:
    """The config as TensorBoard's hparams take it: dotted keys, scalars (lists and None as text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class WandbSink:
    """Weights & Biases on the main rank: one run per job, named by the run folder, the resolved config
    attached. Its id is saved in the checkpoint (MetricLogger.state_dict), so a resumed job continues the
    same wandb run. Started on the first metric, after a resume has set the id. Without a key or a network
    it records offline and says so, instead of stopping or stalling training."""

    def __init__(self, run: RunDir, cfg: LoggerConfig, context: "Context"):
        self.run, self.cfg, self.context = run, cfg, context
        self.wandb_run = None

    def _start(self):
        if self.wandb_run is not None:
            return self.wandb_run
        import wandb
        mode = os.environ.get("WANDB_MODE") or self.cfg.wandb_mode.value
        folder = self.run.path / "wandb"
        if mode != "disabled":
            self.run.write(folder, lambda: folder.mkdir(exist_ok=True))

        def init(mode: str):
            return wandb.init(project=self.cfg.wandb_project, entity=self.cfg.wandb_entity,
                              name=f"{self.context.name}/{self.run.path.name}", id=self.context.wandb_id,
                              resume="allow", dir=str(self.run.path), config=self.context.config, mode=mode,
                              settings=wandb.Settings(init_timeout=self.cfg.wandb_init_timeout_s, silent=True,
                                                      console="off"))
        try:
            self.wandb_run = init(mode)
        except Exception as e:
            if mode != "online":
                raise
            log.warning(f"wandb: could not start online ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        f"recording offline in {folder} instead (`wandb sync` uploads it later)")
            self.wandb_run = init("offline")
        self.wandb_run.define_metric("step")
        self.wandb_run.define_metric("*", step_metric="step")
        if self.wandb_run.settings.mode == "offline":
            where = Path(self.wandb_run.dir).parent
            log.info(f"wandb: offline run {self.wandb_run.id} in {where} (`wandb sync {where}` uploads it)")
        return self.wandb_run

    def write(self, kind: str, metrics: dict) -> None:
        # Our own step as the x axis: a resumed run logs the steps after its checkpoint again, which
        # wandb's internal step would refuse as going backwards.
        self._start().log({"step": metrics["step"], **tags(kind, metrics)})

    def summary(self, summary: dict) -> None:
        self._start().summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


SINKS: dict[str, Callable[[RunDir, LoggerConfig, "Context"], Sink]] = {
    "console": ConsoleSink,
    "jsonl": JsonlSink,
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
}


class Context:
    """What sinks need to know about the job."""

    def __init__(self, name: str, config: dict, epochs: int, total_steps: int, samples_per_step: int):
        self.name, self.config, self.epochs = name, config, epochs
        self.total_steps, self.samples_per_step = total_steps, samples_per_step
        self.wandb_id = _new_id()


def _new_id() -> str:
    import secrets
    return secrets.token_hex(4)


class MetricLogger:
    """Fans metrics out to the configured sinks; holds none on non-main ranks. Adds the throughput
    since the last logged step to step metrics."""

    def __init__(self, world: World, run: RunDir, cfg: LoggerConfig, context: Context):
        names = [n for n in SINKS if getattr(cfg, n, False)] if world.is_main else []
        self.context = context
        self.sinks: list[Sink] = [SINKS[n](run, cfg, context) for n in names]
        self.console = next((s for s in self.sinks if isinstance(s, ConsoleSink)), None)
        self._since: Optional[tuple[float, int]] = None  # (time, step) of the last step log
        self.last_epoch: Optional[dict] = None  # the last epoch's record (its train_loss goes into the summary)

    def rewind(self, step: int) -> None:
        for s in self.sinks:
            if hasattr(s, "rewind"):
                s.rewind(step)

    def advance(self, step: int, epoch: int) -> None:
        """Every optimizer step: moves the progress bar, if one is shown (no device sync)."""
        if self.console is not None:
            self.console.advance(step, epoch)

    def bar(self, iterable: Iterable, desc: str, total: int) -> Iterable:
        """`iterable` with a transient progress bar where the console shows one (evaluation)."""
        if self.console is None or not self.console.show_bar:
            return iterable
        return bar(iterable, desc, total, leave=False, unit="batch")

    def step(self, metrics: dict) -> None:
        now, step = time.perf_counter(), metrics["step"]
        if self._since is not None and step > self._since[1]:
            steps_per_sec = (step - self._since[1]) / max(now - self._since[0], 1e-9)
            metrics = {**metrics, "samples_per_sec": steps_per_sec * self.context.samples_per_step,
                       "steps_per_sec": steps_per_sec}
        self._since = (now, step)
        for s in self.sinks:
            s.write("step", metrics)

    def epoch(self, metrics: dict) -> None:
        self.last_epoch = metrics
        self.validation(metrics)

    def validation(self, metrics: dict) -> None:
        """A validation's line (an epoch's, or one within an epoch: trainer.val_every_n_steps)."""
        self._since = None  # the next interval starts after evaluation
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        for s in self.sinks:
            s.write("epoch", metrics)

    def summary(self, summary: dict) -> None:
        for s in self.sinks:
            if hasattr(s, "summary"):
                s.summary(summary)

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.context.wandb_id, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.context.wandb_id = state.get("wandb_run_id") or self.context.wandb_id
        self.last_epoch = state.get("last_epoch")

    def close(self) -> None:
        for s in self.sinks:
            s.close()
