"""dist.strategy=fsdp with trainer.precision=bf16: bf16 parameters for compute, fp32 gradient reduction, and
norms with running statistics (batch norm) kept in fp32, whose buffers are fp32."""

import math

import pytest

from conftest import run_cli

BF16 = ("dist.strategy=fsdp", "trainer.precision=bf16", "data.batch_size=32", "data.eval_batch_size=100",
        "trainer.epochs=1", "trainer.max_steps=3", "debug.limit_batches=3", "logger.plots=false", "dist.timeout_s=60")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["convnet", "resnet18"])
def test_a_model_with_batch_norm_trains_sharded_in_bf16(tmp_path, model):
    run = run_cli(tmp_path / "run", f"model={model}", *BF16, nproc=2, timeout=300)
    assert run.code == 0, run
    assert "expected scalar type" not in run.err, run
    assert run.metrics[-1]["step"] == 3
    assert math.isfinite(run.metrics[-1]["train_loss"]) and math.isfinite(run.metrics[-1]["val_loss"]), run
