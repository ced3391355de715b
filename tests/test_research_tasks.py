"""The tasks research brings: segmentation (a class per pixel, mean IoU) and language modelling (the next token,
perplexity), each chosen by data.task, selectable as checkpoint.monitor, checked against an oracle computed
here from the trained model; and validation every N steps."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import dtrain
from dtrain.config import DataConfig
from dtrain.data import split_indices


class Squares(Dataset):
    """8x8 images with one bright square; the mask marks it (1) on a background (0); the border is ignored."""
    num_classes = 2

    def __init__(self, n: int = 240):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.zeros(n, 1, 8, 8), torch.zeros(n, 8, 8, dtype=torch.long)
        for i in range(n):
            r, c = torch.randint(0, 5, (2,), generator=g).tolist()
            self.y[i, r:r + 3, c:c + 3] = 1
        self.x = self.y[:, None].float() + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
        self.y[:, 0, :] = -100  # the top row is ignored

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TinySegmenter(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, num_classes, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_segmentation_reports_pixel_accuracy_and_mean_iou_as_computed_from_the_model(tmp_path, quiet_logs):
    data = Squares()
    summary = dtrain.fit(TinySegmenter, data, overrides=[
        "data.task=segmentation", "trainer.epochs=6", "data.batch_size=16", "optim.lr=0.01", "logger.plots=false",
        "checkpoint.monitor=val_miou", f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["val_miou"] > 0.8 and summary["monitor"] == "val_miou"
    # the oracle: IoU per class over the validation split's pixels that are not ignored, by hand
    model = dtrain.load_model(tmp_path / "run" / "checkpoints" / "latest", model=TinySegmenter(2)).net
    _, val = split_indices(len(data), DataConfig())
    with torch.no_grad():
        predicted = model(data.x[val]).argmax(1)
    target = data.y[val]
    valid = target != -100
    ious = [((predicted == c) & (target == c) & valid).sum() / (((predicted == c) | (target == c)) & valid).sum()
            for c in (0, 1)]
    assert summary["val_miou"] == pytest.approx(float(sum(ious) / 2), abs=1e-6)
    assert summary["val_acc"] == pytest.approx(float((predicted == target)[valid].float().mean()), abs=1e-6)
    assert summary["val_samples"] == len(val)  # images, though a pixel is the unit of the loss and accuracy
    report = dtrain.evaluate(tmp_path / "run" / "checkpoints" / "latest", split="val", data=data)
    assert report["per_class_iou"] == pytest.approx([float(i) for i in ious], abs=1e-6)


TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


class Characters(Dataset):
    """Character windows of a text: input ids [T], targets the next ids [T]; its vocabulary as vocab_size."""

    def __init__(self, block: int = 16):
        chars = sorted(set(TEXT))
        self.vocab_size, self.block = len(chars), block
        self.ids = torch.tensor([chars.index(c) for c in TEXT])

    def __len__(self):
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i):
        start = i * self.block
        return self.ids[start:start + self.block], self.ids[start + 1:start + self.block + 1]


class Bigram(nn.Module):
    """The next character from the current one: what a bigram model learns."""

    def __init__(self, num_classes: int, vocab_size: int):
        super().__init__()
        assert num_classes == vocab_size  # the vocabulary, offered under both names
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, ids):
        return self.table(ids)


def test_language_modelling_reports_perplexity_below_the_unigram_and_tokens_per_second(tmp_path, quiet_logs):
    data = Characters()
    summary = dtrain.fit(Bigram, data, overrides=[
        "data.task=language_modeling", "trainer.epochs=8", "data.batch_size=8", "optim.lr=0.1",
        "logger.plots=false", f"hydra.run.dir={tmp_path / 'run'}"])
    counts = torch.bincount(data.ids, minlength=data.vocab_size).double()
    unigram = math.exp(-(counts / counts.sum() * (counts / counts.sum()).clamp_min(1e-12).log()).sum().item())
    assert summary["val_perplexity"] < 0.6 * unigram and summary["monitor"] == "val_perplexity"
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-9)
    last = lines(tmp_path / "run")[-1]
    assert last["tokens_per_sec"] == pytest.approx(16 * last["samples_per_sec"], rel=1e-9)  # 16 tokens a window
    assert summary["tokens_per_sec"] > 0 and 0 <= summary["val_acc"] <= 1


def test_validation_every_n_steps_writes_a_line_and_chooses_the_best_each_time(tmp_path, quiet_logs):
    data = Squares(480)
    summary = dtrain.fit(TinySegmenter, data, overrides=[
        "data.task=segmentation", "trainer.epochs=2", "data.batch_size=16", "optim.lr=0.01", "logger.plots=false",
        "trainer.val_every_n_steps=10", "checkpoint.keep_last=20", f"hydra.run.dir={tmp_path / 'run'}"])
    steps = [line["step"] for line in lines(tmp_path / "run")]
    assert steps == [10, 20, 27, 30, 40, 50, 54]  # every 10 steps, and each epoch's end (27 steps an epoch)
    assert all("val_miou" in line for line in lines(tmp_path / "run"))
    best = max(lines(tmp_path / "run"), key=lambda line: line["val_miou"])
    from dtrain import checkpoint as ckpt
    assert ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == best["step"]
    assert summary["best"] == pytest.approx(best["val_miou"])


class DeclaredSquares(Squares):
    task = "segmentation"  # the data set says its task itself


def test_a_data_sets_own_task_attribute_chooses_the_task_and_a_wrong_one_is_one_line(tmp_path, capsys, quiet_logs):
    summary = dtrain.fit(TinySegmenter, DeclaredSquares(96), overrides=[
        "trainer.max_steps=2", "data.batch_size=16", "logger.plots=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["monitor"] == "val_miou"  # segmentation's own choice
    misnamed = DeclaredSquares(96)
    misnamed.task = "segmantation"
    with pytest.raises(dtrain.runs.TrainingFailed) as failed:
        dtrain.fit(TinySegmenter, misnamed, overrides=["trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert failed.value.code == 2
    err = capsys.readouterr().err  # the registered tasks follow (other tests may have registered more)
    assert "data: test_research_tasks.DeclaredSquares's attribute task='segmantation' is not allowed: choose " \
        "one of " in err and "segmentation" in err.rsplit("choose one of", 1)[1]
