"""Each batched augmentation is torchvision's transform, per image, with the parameters it drew; the list
in config picks them by name, in order, and refuses what it does not know."""

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import make_config, make_trainer
from dtrain import augment, data
from dtrain import world as w
from dtrain.errors import ConfigError

pytestmark = pytest.mark.unit  # in-process and fast: `pytest -m unit`


def images(n: int = 16, channels: int = 3, size: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def drawn(op, x: torch.Tensor, seed: int = 1):
    """The op's output for `x` and the parameters it drew."""
    params = op.params(len(x), torch.Generator().manual_seed(seed), x.device)
    return op.apply(x, params), params


def test_rotate_is_torchvisions_rotation_by_the_angle_each_image_drew():
    x = images()
    out, params = drawn(augment.Affine(degrees=30), x)
    angles = params[:, 0]
    assert angles.abs().max() <= 30 and angles.std() > 5  # each image its own angle
    theirs = torch.stack([TF.rotate(img, float(a), interpolation=InterpolationMode.NEAREST)
                          for img, a in zip(x, angles)])
    assert (out != theirs).float().mean() < 0.002  # a pixel exactly between two others may round either way


def test_scale_is_torchvisions_affine_zoom_by_the_factor_each_image_drew():
    x = images(channels=1)
    out, params = drawn(augment.Affine(scale=(0.7, 1.3)), x)
    scales = params[:, 1]
    assert 0.7 <= scales.min() and scales.max() <= 1.3 and params[:, 0].abs().max() == 0
    theirs = torch.stack([TF.affine(img, angle=0.0, translate=[0, 0], scale=float(s), shear=[0.0, 0.0])
                          for img, s in zip(x, scales)])
    assert (out != theirs).float().mean() < 0.002


def test_crop_and_flip_are_torchvisions_crop_of_the_padded_image_and_horizontal_flip():
    x = images()
    cropped, offsets = drawn(augment.Crop(4), x)
    padded = TF.pad(x, [4])
    for i in range(len(x)):
        top, left = offsets[:, i].tolist()
        assert torch.equal(cropped[i], TF.crop(padded[i], top, left, 20, 20))
    flipped, flips = drawn(augment.Flip(), x)
    assert 0 < flips.sum() < len(x)
    for img, out, f in zip(x, flipped, flips):
        assert torch.equal(out, TF.horizontal_flip(img) if f else img)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_is_torchvisions_brightness_contrast_and_saturation_with_the_factors_drawn(channels):
    x = images(channels=channels)
    out, factors = drawn(augment.Jitter(0.4), x)
    assert 0.6 <= factors.min() and factors.max() <= 1.4
    theirs = []
    for img, (b, c, s) in zip(x, factors.tolist()):
        img = TF.adjust_contrast(TF.adjust_brightness(img, b), c)
        theirs.append(TF.adjust_saturation(img, s) if channels == 3 else img)
    diff = (out.int() - torch.stack(theirs).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float rounding at integer edges


def test_presets_expand_in_place_and_the_list_is_applied_in_order():
    cfg = make_config("data.augment=[jitter,tutorial]").data
    ops = augment.build(cfg).ops
    assert [type(op).__name__ for op in ops] == ["Jitter", "Affine", "Affine", "Crop", "Flip"]
    assert ops[1].degrees == cfg.rotate_degrees and ops[2].scale == tuple(cfg.scale_range)
    assert augment.build(make_config().data) is None  # nothing by default (cifar10 picks [cifar])
    assert [type(op).__name__ for op in augment.build(make_config("data=cifar10").data).ops] == ["Crop", "Flip"]


def test_an_unknown_augmentation_or_bad_parameter_is_refused_naming_what_is_allowed(tmp_path, quiet_logs):
    with pytest.raises(ConfigError, match=r"data.augment='rotation' is not allowed: choose one of cifar, crop, "
                                          r"flip, jitter, rotate, scale, tutorial"):
        make_config("data.augment=[flip,rotation]")
    with pytest.raises(ConfigError, match="data.scale_range"):
        make_config("data.scale_range=[1.2,0.8]")
    with pytest.raises(ConfigError, match=r"data.augment=\['flip'\] transforms images, but data=regression"):
        make_trainer(tmp_path, "model=linear", "data=regression", "data.augment=[flip]")


def test_the_tutorial_set_augments_training_images_on_the_device_path_and_repeats_for_the_same_stream():
    cfg = make_config("data.augment=[tutorial]", "data.rotate_degrees=20")
    splits = data.build(cfg.data, w.World())
    loader = data.DeviceLoader(splits.train, w.World(), 32, train=True, seed=3)
    first, again = next(iter(loader)), next(iter(loader))
    plain = splits.train.take(slice(None))
    plain.augment = None
    order = loader.order()[:32]
    assert torch.equal(first[0], again[0])  # the same (seed, rank, epoch, batch): the same images
    assert not torch.allclose(first[0], plain.batch(order)[0])  # ...and they are augmented
    assert splits.val.augment is None  # validation images are never augmented
