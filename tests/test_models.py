"""Every workload builds from the data's shape, runs forward and backward, and refuses data it cannot take."""

import pytest
import torch

from dtrain import models
from dtrain.errors import ConfigError

pytestmark = pytest.mark.unit  # in-process and fast: `pytest -m unit`

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", ["mlp", "mlp3", "lenet", "convnet", "resnet18"])
def test_classifier_runs_forward_and_backward_on_mnist_and_cifar_shapes(name, shape):
    model = models.build(models.builtin(name), "classification", shape, 10, "test")
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_mlps_lenet_and_convnet_have_the_tutorials_layer_names_and_sizes():
    def shapes(name, shape, **options):
        net = models.build(models.builtin(name, **options), "classification", shape, 10, "test")
        return {k: tuple(v.shape) for k, v in net.state_dict().items() if k.endswith("weight")}

    assert shapes("mlp", (1, 28, 28)) == {"fc1.weight": (128, 784), "fc2.weight": (10, 128)}
    assert shapes("mlp3", (1, 28, 28)) == {"fc1.weight": (128, 784), "fc2.weight": (64, 128), "fc3.weight": (10, 64)}
    assert shapes("lenet", (3, 32, 32)) == {"conv1.weight": (6, 3, 5, 5), "conv2.weight": (16, 6, 5, 5),
                                            "fc1.weight": (120, 400), "fc2.weight": (84, 120), "fc3.weight": (10, 84)}
    assert shapes("convnet", (3, 32, 32), batchnorm=False) == {
        "conv1.weight": (64, 3, 3, 3), "conv2.weight": (128, 64, 3, 3), "fc1.weight": (256, 8192),
        "fc2.weight": (10, 256)}
    assert {"bn1.weight", "bn2.weight"} <= shapes("convnet", (3, 32, 32)).keys()  # BatchNorm by default


def test_resnet18_uses_a_small_image_stem():
    net = models.build(models.builtin("resnet18"), "classification", (3, 32, 32), 10, "test")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_linear_regression_maps_features_to_one_target():
    model = models.build(models.builtin("linear"), "regression", (8,), 1, "regression")
    assert model(torch.randn(5, 8)).shape == (5, 1)


@pytest.mark.parametrize("name,task,shape,match", [
    ("lenet", "classification", (8,), "needs C x H x W images"),
    ("mlp", "regression", (8,), "solves classification"),
    ("linear", "classification", (1, 28, 28), "solves regression"),
    ("lenet", "classification", (1, 8, 8), "cannot take"),
])
def test_a_model_that_cannot_pair_with_the_data_is_a_config_error(name, task, shape, match):
    with pytest.raises(ConfigError, match=match):
        models.build(models.builtin(name), task, shape, 10, "somedata")
