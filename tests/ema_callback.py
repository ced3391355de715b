"""A user's callback, as STYLE.md's example of an extension: an exponential moving average of the weights,
updated after every optimizer step, its shadow weights and update count kept in dtrain's checkpoints. It
also leaves a mark of `on_exception` and `teardown` in the run folder, for the tests to read."""

import torch


class EMA:
    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0

    def on_fit_start(self, trainer) -> None:
        if self.shadow is None:  # a resumed run has its shadow from the checkpoint already
            self.shadow = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, outputs) -> None:
        assert outputs["loss"].ndim == 0
        for name, p in trainer.model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        self.updates += 1

    def on_fit_end(self, trainer, summary) -> None:
        summary["ema_updates"] = self.updates
        if trainer.world.is_main:
            torch.save({"shadow": self.shadow, "updates": self.updates}, trainer.run.path / "ema.pt")

    def on_exception(self, trainer, error) -> None:
        (trainer.run.path / f"exception-rank{trainer.world.rank}.txt").write_text(type(error).__name__)

    def teardown(self, trainer) -> None:
        (trainer.run.path / f"teardown-rank{trainer.world.rank}.txt").write_text(str(trainer.progress.step))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.updates = state["shadow"], state["updates"]
