"""Macro F1 and AUC-ROC are exact (torchmetrics agrees), counted once per sample across ranks, and reach
metrics.jsonl, summary.json and best.pt's choice."""

import json
import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_auroc, multiclass_f1_score

from conftest import make_config, make_trainer
from dtrain.errors import ConfigError
from dtrain.tasks import TASKS, macro_auc, macro_f1


def confusion(y: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.bincount(y * classes + predicted, minlength=classes * classes).view(classes, classes)


@pytest.mark.parametrize("seed", range(3))
def test_macro_f1_and_auc_equal_torchmetrics_on_scores_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n, classes = 500, 5
    y = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) + 2 * torch.nn.functional.one_hot(y, classes)
    scores = (logits.softmax(1) * 20).round() / 20  # coarse scores: many ties
    predicted = logits.argmax(1)
    assert macro_f1(confusion(y, predicted, classes)) == pytest.approx(
        multiclass_f1_score(predicted, y, classes, average="macro").item(), abs=1e-6)
    assert macro_auc(scores, y) == pytest.approx(multiclass_auroc(scores, y, classes, average="macro").item(),
                                                 abs=1e-6)


def test_auc_is_one_for_a_perfect_ranking_zero_for_a_reversed_one_and_a_half_for_ties():
    y = torch.tensor([0, 0, 1, 1])
    ranked = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert macro_auc(ranked, y) == 1.0
    assert macro_auc(ranked.flip(1), y) == 0.0
    assert macro_auc(torch.full((4, 2), 0.5), y) == 0.5


def test_classes_that_never_occur_are_left_out_of_the_averages():
    y = torch.tensor([0, 0, 1, 1])  # class 2 never occurs and is never predicted
    scores = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    assert macro_auc(scores, y) == 1.0
    assert macro_f1(confusion(y, scores.argmax(1), 3)) == 1.0
    assert math.isnan(macro_auc(scores[:2], y[:2]))  # one class only: no AUC is defined


def test_f1_and_auc_reach_metrics_jsonl_and_the_summary_for_validation_and_test(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "data=synthetic", "data.num_samples=300", "data.batch_size=30",
                           "data.eval_batch_size=30", "trainer.epochs=2", "logger.plots=false")
    summary = trainer.fit()
    trainer.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_f1", "val_auc"} <= line.keys() and "train_f1" not in line
    for key in ("val_f1", "val_auc", "test_f1", "test_auc"):
        assert 0 <= summary[key] <= 1, key
    assert summary["val_auc"] == pytest.approx(trainer.evaluate(trainer.loaders.val)["auc"])


def test_best_pt_can_follow_f1_or_auc_but_a_regression_has_neither():
    assert TASKS["classification"].monitor_for(make_config("checkpoint.monitor=val_auc").checkpoint.monitor,
                                               "mnist_sample") == "val_auc"
    with pytest.raises(ConfigError, match="checkpoint.monitor=val_f1 but data=regression is a regression task"):
        TASKS["regression"].monitor_for(make_config("checkpoint.monitor=val_f1").checkpoint.monitor, "regression")
