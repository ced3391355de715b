"""A callback with state: the validation loss of every epoch, kept in dtrain's checkpoints, so a run that
was stopped and resumed ends with the whole history."""

import json


class LossHistory:
    def __init__(self, filename: str = "val_loss_history.json"):
        self.filename = filename
        self.history: list[float] = []

    def on_validation_end(self, trainer, metrics: dict) -> None:
        self.history.append(round(metrics["loss"], 6))

    def on_fit_end(self, trainer, summary: dict) -> None:
        summary["epochs_seen_by_callback"] = len(self.history)
        if trainer.world.is_main:  # every rank runs the hooks; one writes files
            (trainer.run.path / self.filename).write_text(json.dumps(self.history) + "\n")

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
