"""Contracts a user's code and config must keep, each broken one refused in one line that names it."""

import pytest
from torch import nn

from dtrain import models, perf
from dtrain.errors import ConfigError

pytestmark = pytest.mark.unit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def test_a_shard_class_that_names_no_submodule_is_refused_naming_the_classes_there_are():
    model = nn.Sequential(Block(), Block())
    assert len(models.blocks_of(model, ["Block"])) == 2
    with pytest.raises(ConfigError, match=r"dist.fsdp.shard=\['Blok'\]: Sequential has no submodule of class 'Blok'; "
                                          r"its classes are Block, Linear") as err:
        models.blocks_of(model, ["Blok"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no submodule of class 'Blok'"):
        perf.checkpoint_activations(model, ["Blok"])  # activation checkpointing reads the same classes


def test_a_record_holds_strict_json_with_null_for_nan_and_refuses_a_tensor_naming_its_key():
    import json

    import torch

    from dtrain.rundir import CallbackError, as_json
    text = as_json({"val_loss": float("nan"), "best": float("inf"), "nested": {"x": [1.0, float("-inf")]}}, "summary")
    assert json.loads(text) == {"val_loss": None, "best": None, "nested": {"x": [1.0, None]}}
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(CallbackError, match=r"summary\['my_norm'\] is a Tensor, which JSON cannot hold; a callback "
                                            r"adding it must add numbers, strings, lists or dicts"):
        as_json({"steps": 3, "my_norm": torch.tensor(1.5)}, "summary")
