"""Macro F1 and AUC-ROC are exact (torchmetrics agrees), counted once per sample across ranks, and reach
metrics.jsonl, summary.json and best.pt's choice."""

import json
import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_auroc, multiclass_f1_score

from conftest import make_config, make_trainer
from dtrain.errors import ConfigError
from dtrain.tasks import TASKS, EpochSums, macro_auc, macro_f1


def confusion(y: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.bincount(y * classes + predicted, minlength=classes * classes).view(classes, classes)


@pytest.mark.unit
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


@pytest.mark.unit
def test_auc_is_one_for_a_perfect_ranking_zero_for_a_reversed_one_and_a_half_for_ties():
    y = torch.tensor([0, 0, 1, 1])
    ranked = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert macro_auc(ranked, y) == 1.0
    assert macro_auc(ranked.flip(1), y) == 0.0
    assert macro_auc(torch.full((4, 2), 0.5), y) == 0.5


@pytest.mark.unit
def test_classes_that_never_occur_are_left_out_of_the_averages():
    y = torch.tensor([0, 0, 1, 1])  # class 2 never occurs and is never predicted
    scores = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    assert macro_auc(scores, y) == 1.0
    assert macro_f1(confusion(y, scores.argmax(1), 3)) == 1.0
    assert math.isnan(macro_auc(scores[:2], y[:2]))  # one class only: no AUC is defined


def recomputed(model, loader, classes: int) -> dict:
    """Accuracy, macro F1 and macro AUC of `model` over `loader`'s samples, by torchmetrics (per class) and
    the averaging rule dtrain states: F1 over the classes that occur as a label or a prediction, AUC over
    the classes with both positive and negative samples."""
    outs, labels = [], []
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            outs.append(model(x).float())
            labels.append(y)
    out, y = torch.cat(outs), torch.cat(labels)
    predicted, positives = out.argmax(1), torch.bincount(y, minlength=classes)
    f1 = multiclass_f1_score(predicted, y, classes, average=None)
    auc = multiclass_auroc(out.softmax(1), y, classes, average=None)
    occurs = (positives + torch.bincount(predicted, minlength=classes)) > 0
    ranked = (positives > 0) & (positives < len(y))
    return {"samples": len(y), "acc": (predicted == y).double().mean().item(), "f1": f1[occurs].mean().item(),
            "auc": auc[ranked].mean().item(), "absent": int((~ranked).sum())}


@pytest.mark.filterwarnings("ignore:No positive samples in targets")  # the absent classes, left out here
def test_f1_and_auc_reach_metrics_jsonl_and_the_summary_for_validation_and_test(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "data=synthetic", "data.num_samples=300", "data.batch_size=30",
                           "data.eval_batch_size=30", "trainer.epochs=2", "logger.plots=false")
    summary = trainer.fit()
    trainer.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_f1", "val_auc"} <= line.keys() and "train_f1" not in line
    # The final model's outputs, recomputed here and scored by torchmetrics, give what was reported.
    val, test = (recomputed(trainer.model, loader, 10) for loader in (trainer.loaders.val, trainer.loaders.test))
    assert val["samples"] == summary["val_samples"] == 30 and test["samples"] == 30
    assert val["absent"] > 0 and test["absent"] > 0  # 10 classes, 30 samples: AUC leaves classes out
    for split, expected in (("val", val), ("test", test)):
        for key in ("acc", "f1", "auc"):
            assert summary[f"{split}_{key}"] == pytest.approx(expected[key], abs=1e-6), f"{split}_{key}"
    for key in ("val_acc", "val_f1", "val_auc"):  # the last epoch's line holds the same final validation
        assert line[key] == pytest.approx(summary[key], abs=1e-12), key


@pytest.mark.unit
def test_best_pt_can_follow_f1_or_auc_but_a_regression_has_neither():
    from dtrain import tasks
    reported = tuple(f"val_{m}" for m in TASKS["classification"].eval_metrics)
    assert tasks.monitor(make_config("checkpoint.monitor=val_auc").checkpoint.monitor, TASKS["classification"],
                         reported) == "val_auc"
    with pytest.raises(ConfigError, match=r"checkpoint.monitor=val_f1 is not a metric this run reports; choose one of "
                                          r"val_loss \(a regression task, with your metrics\)"):
        tasks.monitor(make_config("checkpoint.monitor=val_f1").checkpoint.monitor, TASKS["regression"], ("val_loss",))
    with pytest.raises(ConfigError, match="checkpoint.monitor=acc is not allowed: a validation metric, val_NAME"):
        make_config("checkpoint.monitor=acc")


def batch_by_batch(task, batches) -> torch.Tensor:
    """[loss sum, count, *extras] summed one batch at a time, as Task.batch_sums gives them."""
    return sum(task.batch_sums(task.loss(out, y), out, y) for out, y in batches)


@pytest.mark.unit
@pytest.mark.parametrize("hold_bytes", [1, 500, 1 << 20])  # fold every batch, every few, once
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_epoch_sums_equal_the_batch_by_batch_sums_however_many_batches_they_hold(task, hold_bytes):
    g = torch.Generator().manual_seed(0)
    classes = 4 if task == "classification" else 1
    batches = []
    for size in (8, 8, 8, 3, 8, 8, 5):  # a short last batch mid-way, as a resumed epoch has
        out = torch.randn(size, classes, generator=g)
        y = torch.randint(0, 4, (size,), generator=g) if task == "classification" else torch.randn(size, 1, generator=g)
        batches.append((out, y))
    sums = EpochSums(TASKS[task], torch.device("cpu"), hold_bytes=hold_bytes)
    for out, y in batches[:4]:
        sums.add(TASKS[task].loss(out, y), out, y)
    assert torch.allclose(sums.value(), batch_by_batch(TASKS[task], batches[:4]), rtol=1e-12)
    assert torch.equal(sums.value(), sums.value())  # reading twice adds nothing
    for out, y in batches[4:]:
        sums.add(TASKS[task].loss(out, y), out, y)
    assert torch.allclose(sums.value(), batch_by_batch(TASKS[task], batches), rtol=1e-12)


@pytest.mark.unit
def test_epoch_sums_keep_batches_whose_outputs_do_not_concatenate_and_hold_only_what_fits():
    task = TASKS["classification"]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, t, generator=g), torch.randint(0, 3, (6, t), generator=g)) for t in (5, 7, 5)]
    sums = EpochSums(task, torch.device("cpu"), hold_bytes=1 << 20)  # sequences of 5, 7, 5 steps
    for out, y in batches:
        sums.add(task.loss(out, y), out, y)
    assert len(sums.outputs) == 3
    assert torch.allclose(sums.value(), batch_by_batch(task, batches), rtol=1e-12)
    held = EpochSums(task, torch.device("cpu"), hold_bytes=2 * (6 * 3 * 5 * 4 + 6 * 5 * 8))
    for out, y in batches[:1] * 5:
        held.add(task.loss(out, y), out, y)
    assert len(held.outputs) == 1  # folded on reaching two batches' bytes, then one more held
    held.reset()
    assert held.value().tolist() == [0.0, 0.0, 0.0, 0.0] and not held.outputs  # loss, units, samples, acc


@pytest.mark.unit
def test_epoch_sums_count_what_held_outputs_keep_alive_and_never_hold_one_batch_over_the_limit():
    task = TASKS["classification"]
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 1000, generator=g)  # a model that returns a view of a larger tensor
    out, y = logits[:, :3], torch.randint(0, 3, (8,), generator=g)
    sums = EpochSums(task, torch.device("cpu"), hold_bytes=8 * 1000 * 4)
    sums.add(task.loss(out, y), out, y)
    assert not sums.outputs  # its 32 kB storage, not its 96 bytes, reached the limit: folded at once
    big = torch.randn(64, 3, generator=g)
    sums.add(task.loss(big, y.repeat(8)), big, y.repeat(8))
    assert len(sums.outputs) == 1
    assert torch.allclose(sums.value(), batch_by_batch(task, [(out, y), (big, y.repeat(8))]), rtol=1e-12)
