"""Any model, any batch: a model's own training_step and validation_step, batches of dicts and tuples, a
collate function of one's own, and each contract broken in one line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dtrain
from conftest import ROOT, assert_same_weights, run_cli
from dtrain.runs import TrainingFailed

QUICK = ["trainer.epochs=2", "data.batch_size=16", "logger.plots=false"]


def points(n: int = 160) -> TensorDataset:
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x[:, 0] > 0).long())


class TinyVAE(nn.Module):
    """A variational autoencoder: its loss needs its own internals (the KL term), so it has its own steps."""

    def __init__(self, input_shape=(6,), latent: int = 2):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(input_shape[0], 2 * latent), nn.Linear(latent, input_shape[0])

    def forward(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return self.decoder(z), mean, log_var

    def training_step(self, batch):
        x, _ = batch
        recon, mean, log_var = self(x)
        reconstruction = F.mse_loss(recon, x)
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(1).mean()
        return {"loss": reconstruction + 0.1 * kl, "recon": reconstruction, "kl": kl}

    def validation_step(self, batch):
        x, _ = batch
        mean, _ = self.encoder(x).chunk(2, dim=1)
        return {"recon": F.mse_loss(self.decoder(mean), x), "latent_norm": mean.norm(dim=1).mean()}


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_model_with_its_own_steps_trains_and_reports_what_they_return(tmp_path, quiet_logs):
    data = points()
    summary = dtrain.fit(TinyVAE, data, overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    last = lines(tmp_path / "run")[-1]
    assert {"train_loss", "train_recon", "train_kl", "val_recon", "val_latent_norm"} <= set(last)
    assert "val_acc" not in last and "train_acc" not in last  # the task's metrics are not the model's
    assert summary["monitor"] == "val_loss" or "val_loss" not in last
    # validation_step's values are batch means, weighted by each batch's samples: the mean over the split
    model = dtrain.load_model(tmp_path / "run" / "checkpoints" / "latest", model=TinyVAE()).net
    from dtrain.data import split_indices
    from dtrain.config import DataConfig
    _, val = split_indices(len(data), DataConfig())
    x = data.tensors[0][val]
    with torch.no_grad():
        mean = model.encoder(x).chunk(2, dim=1)[0]
        expected = F.mse_loss(model.decoder(mean), x, reduction="none").mean(1).mean().item()
    assert last["val_recon"] == pytest.approx(expected, rel=1e-5)
    # evaluate reports what validation_step returns too, on the data set given as fit was given it
    report = dtrain.evaluate(tmp_path / "run" / "checkpoints" / "latest", "val", data=data)
    assert report["recon"] == pytest.approx(expected, rel=1e-5) and "latent_norm" in report


class StepOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.fc(x), y)


def test_without_a_validation_step_validation_reports_the_training_steps_loss(tmp_path, quiet_logs):
    summary = dtrain.fit(StepOnly, points(), overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    assert set(k for k in summary if k.startswith("val_")) == {"val_loss", "val_samples"}
    assert summary["val_samples"] == 16 and summary["monitor"] == "val_loss" and summary["best"] is not None


class Tokens(Dataset):
    """Variable-length token sequences with a dict as input: ({"ids": [T], "mask": [T]}, label)."""

    def __len__(self):
        return 400

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        length = 3 + i % 5
        ids = torch.randint(1, 20, (length,), generator=g)
        return {"ids": ids, "mask": torch.ones(length, dtype=torch.bool)}, int(ids.float().mean() > 10)

    num_classes = 2


def pad(items):
    """A user's collate: pad ids and mask to the batch's longest sequence."""
    inputs, labels = zip(*items)
    longest = max(len(i["ids"]) for i in inputs)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for k, i in enumerate(inputs):
        ids[k, :len(i["ids"])], mask[k, :len(i["mask"])] = i["ids"], i["mask"]
    return {"ids": ids, "mask": mask}, torch.tensor(labels)


class BagOfTokens(nn.Module):
    """A model called with keyword arguments: forward(ids, mask)."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, num_classes)

    def forward(self, ids, mask):
        summed = (self.embed(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(summed)


def test_dict_inputs_call_the_model_with_keywords_and_a_collate_pads_them(tmp_path, quiet_logs):
    summary = dtrain.fit(BagOfTokens, Tokens(), collate=pad,
                         overrides=[*QUICK, "trainer.epochs=5", "optim.lr=0.05", f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["val_acc"] >= 0.8  # the label says whether the mean token is above 10: a bag of tokens learns it


def test_variable_lengths_without_a_collate_are_one_line_naming_data_collate(tmp_path, capsys, quiet_logs):
    with pytest.raises(TrainingFailed) as failed:
        dtrain.fit(BagOfTokens, Tokens(), overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert failed.value.code == 2 and err.count("\n") == 1, err
    assert "the items of a batch do not stack into one tensor" in err and "data.collate" in err, err


class Broken(nn.Module):
    def __init__(self, returns):
        super().__init__()
        self.fc, self.returns = nn.Linear(6, 2), returns

    def training_step(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.fc(x), y, reduction="none")
        return {"none": lambda: {"accuracy": 1.0}, "vector": lambda: loss, "no-grad": lambda: loss.mean().detach(),
                "not-scalar": lambda: {"loss": loss.mean(), "per_sample": loss}}[self.returns]()


@pytest.mark.parametrize("returns,message", [
    ("none", "model: training_step returned a dict without a loss"),
    ("vector", "model: training_step returned a tensor of shape [16]; a loss returns a scalar"),
    ("no-grad", "model: training_step returned a tensor without a gradient"),
    ("not-scalar", "model: training_step returned 'per_sample' of shape [16]; each value is a scalar"),
])
def test_a_training_step_that_breaks_its_contract_is_one_line(tmp_path, capsys, quiet_logs, returns, message):
    with pytest.raises(TrainingFailed) as failed:
        dtrain.fit(Broken(returns), points(), overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert failed.value.code == 2 and message in err and err.count("\n") == 1, err


OWN_STEP_JOB = ("data=synthetic", "data.num_samples=320", "data.shape=[1,6,6]", "data.batch_size=32",
                "trainer.max_steps=12", "trainer.epochs=2", "seed=5", "logger.plots=false", "checkpoint.format=file",
                "model._target_=any_batch_models.OwnStepNet", "model.name=ownstep", "~model.dropout")


@pytest.mark.slow
def test_ddp_and_fsdp_reach_the_same_weights_for_a_model_with_its_own_training_step(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "tests")}
    ddp = run_cli(tmp_path / "ddp", *OWN_STEP_JOB, nproc=2, env=env, timeout=300)
    fsdp = run_cli(tmp_path / "fsdp", *OWN_STEP_JOB, "dist.strategy=fsdp", "model.blocks=[Linear]", nproc=2, env=env,
                   timeout=300)
    assert ddp.code == 0, ddp
    assert fsdp.code == 0, fsdp
    from dtrain import checkpoint as ckpt
    weights = [ckpt.weights(ckpt.load(r.dir / "checkpoints" / "latest")) for r in (ddp, fsdp)]
    assert_same_weights(*weights, rtol=1e-4, atol=1e-4)
    assert math.isfinite(fsdp.summary["val_loss"]) and "val_margin" in fsdp.summary
