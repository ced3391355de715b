"""Every workload builds from the data's shape, runs forward and backward, and refuses data it cannot take."""

import pytest
import torch

from dtrain import models
from dtrain.config import ConfigError

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", ["mlp", "mlp3", "lenet", "convnet", "resnet18"])
def test_classifier_runs_forward_and_backward_on_mnist_and_cifar_shapes(name, shape):
    model = models.build(name, "classification", shape, 10, "test")
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mlp_and_lenet_have_the_tutorial_layer_sizes():
    mlp = models.build("mlp", "classification", (1, 28, 28), 10, "test")
    assert [tuple(m.weight.shape) for m in mlp if hasattr(m, "weight")] == [(128, 784), (10, 128)]
    mlp3 = models.build("mlp3", "classification", (1, 28, 28), 10, "test")
    assert [tuple(m.weight.shape) for m in mlp3 if hasattr(m, "weight")] == [(128, 784), (64, 128), (10, 64)]
    lenet = models.build("lenet", "classification", (3, 32, 32), 10, "test")
    linears = [m for m in lenet.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(120, 16 * 5 * 5), (84, 120), (10, 84)]


def test_resnet18_uses_a_small_image_stem():
    net = models.build("resnet18", "classification", (3, 32, 32), 10, "test")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_linear_regression_maps_features_to_one_target():
    model = models.build("linear", "regression", (8,), 1, "regression")
    assert model(torch.randn(5, 8)).shape == (5, 1)


@pytest.mark.parametrize("name,task,shape,match", [
    ("lenet", "classification", (8,), "needs C x H x W images"),
    ("mlp", "regression", (8,), "solves classification"),
    ("linear", "classification", (1, 28, 28), "solves regression"),
    ("lenet", "classification", (1, 8, 8), "cannot take"),
])
def test_a_model_that_cannot_pair_with_the_data_is_a_config_error(name, task, shape, match):
    with pytest.raises(ConfigError, match=match):
        models.build(name, task, shape, 10, "somedata")
