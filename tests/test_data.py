"""Data sets load from their official formats, split deterministically, and fail with a clear message."""

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain import augment, data
from dtrain import world as w
from dtrain.config import DataPath
from dtrain.errors import ConfigError
from dtrain.errors import DataError
from conftest import make_config

SINGLE = w.World()


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: magic (0, 0, type 0x08 = ubyte, rank), big-endian sizes, bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=60, n_test=20) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_cifar10(root, per_batch=10, n_test=10) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in np.arange(n) % 10], "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))


@pytest.mark.unit
def test_bundled_mnist_sample_splits_9000_train_1000_val_the_same_way_every_time():
    cfg = make_config().data
    a, b = data.build(cfg, SINGLE), data.build(cfg, SINGLE)
    assert (len(a.train), len(a.val), a.test) == (9000, 1000, None)
    assert (a.shape, a.out, a.task) == ((1, 28, 28), 10, "classification")
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.val.y, b.val.y)
    x, y = a.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and 0 <= int(y) < 10
    assert abs(float(a.train.batch(slice(0, 512))[0].mean())) < 0.2  # normalised


@pytest.mark.unit
def test_full_mnist_loads_the_official_idx_files(tmp_path):
    write_mnist(tmp_path)
    splits = data.build(make_config("data=mnist", f"data.root={tmp_path}", "data.download=false").data, SINGLE)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54, 6, 20)
    assert splits.test[3][0].shape == (1, 28, 28) and int(splits.test[3][1]) == 3


@pytest.mark.unit
def test_cifar10_loads_the_official_python_batches(tmp_path):
    write_cifar10(tmp_path)
    cfg = make_config("data=cifar10", f"data.root={tmp_path}", "data.download=false",
                      "data.verify_checksums=false").data
    splits = data.build(cfg, SINGLE)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 10)
    assert (splits.shape, splits.out) == ((3, 32, 32), 10)
    assert splits.test[4][0].shape == (3, 32, 32) and int(splits.test[4][1]) == 4


@pytest.mark.unit
def test_cifar10_files_that_fail_their_checksums_are_reported(tmp_path):
    write_cifar10(tmp_path)
    cfg = make_config("data=cifar10", f"data.root={tmp_path}", "data.download=false").data
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        data.build(cfg, SINGLE)


@pytest.mark.unit
def test_cifar10_augmentation_crops_and_flips_training_images_only(tmp_path):
    write_cifar10(tmp_path)
    cfg = make_config("data=cifar10", f"data.root={tmp_path}", "data.download=false",
                      "data.verify_checksums=false").data
    splits = data.build(cfg, SINGLE)
    torch.manual_seed(0)
    augmented = [splits.train[0][0] for _ in range(8)]
    assert all(a.shape == (3, 32, 32) for a in augmented)
    assert any(not torch.equal(augmented[0], a) for a in augmented[1:])  # random crop/flip
    torch.manual_seed(1)
    first = splits.val[0][0]
    torch.manual_seed(2)
    assert torch.equal(first, splits.val[0][0])  # evaluation is not augmented: the same image whatever the RNG


@pytest.mark.unit
@pytest.mark.parametrize("name,files", [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")])
def test_a_missing_data_set_offline_names_the_files_and_where_to_put_them(tmp_path, name, files):
    cfg = make_config(f"data={name}", f"data.root={tmp_path}", "data.download=false").data
    with pytest.raises(DataError, match=files) as err:
        data.build(cfg, SINGLE)
    assert str(tmp_path) in str(err.value)


@pytest.mark.unit
def test_a_data_root_that_does_not_exist_is_a_config_error(tmp_path):
    cfg = make_config("data=mnist", f"data.root={tmp_path}/nope").data
    with pytest.raises(ConfigError, match=r"data.root=.*does not exist"):
        data.build(cfg, SINGLE)


def test_imagefolder_reads_class_folders_through_worker_processes(tmp_path):
    for split, n in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (i * 40, 100 if label == "cat" else 200, 50)).save(folder / f"{i}.png")
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.batch_size=4",
                      "data.eval_batch_size=4", "data.num_workers=2")
    splits = data.build(cfg.data, SINGLE)
    assert (len(splits.train), len(splits.val), splits.out, splits.shape) == (12, 4, 2, (3, 32, 32))
    loader = data.train_loader(splits.train, cfg, SINGLE)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 32, 32)


@pytest.mark.unit
@pytest.mark.parametrize("mode,suffix,decoder", [
    ("RGB", ".png", "torchvision"), ("L", ".png", "torchvision"), ("RGBA", ".png", "torchvision"),
    ("P", ".png", "torchvision"), ("RGB", ".jpg", "torchvision"), ("L", ".jpg", "torchvision"),
    ("I;16", ".png", "PIL"),  # torchvision reads 16 bits
    ("RGB", ".bmp", "PIL"), ("P", ".bmp", "PIL"), ("RGB", ".webp", "PIL"), ("P", ".gif", "PIL"),
])
def test_an_image_file_reads_as_the_rgb_pixels_pil_sees_whichever_decoder_reads_it(tmp_path, monkeypatch, mode,
                                                                                 suffix, decoder):
    import torchvision.io
    decoded = []
    real = torchvision.io.decode_image
    monkeypatch.setattr(torchvision.io, "decode_image", lambda *a, **k: decoded.append(real(*a, **k)) or decoded[-1])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode) if mode != "I;16" else \
        Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))
    image.save(tmp_path / f"x{suffix}")
    expected = torch.from_numpy(np.asarray(Image.open(tmp_path / f"x{suffix}").convert("RGB")).copy())
    got = data.read_rgb(str(tmp_path / f"x{suffix}"))
    assert got.dtype == torch.uint8 and got.shape == (3, 20, 30)
    assert (decoder == "torchvision") == any(got is d for d in decoded)
    # JPEG: libjpeg builds may round a few values differently (inverse DCT); the rest are exact
    assert (got.permute(1, 2, 0).int() - expected.int()).abs().max() <= (1 if suffix == ".jpg" else 0)


@pytest.mark.unit
def test_an_animated_gif_named_like_a_png_reads_as_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(tmp_path / "x.png", format="GIF", save_all=True, append_images=frames[1:])
    got = data.read_rgb(str(tmp_path / "x.png"))
    assert got.shape == (3, 6, 8) and got[:, 0, 0].tolist() == [200, 0, 0]


@pytest.mark.unit
def test_synthetic_data_takes_any_shape_and_class_count():
    cfg = make_config("data=synthetic", "data.shape=[5]", "data.num_classes=3", "data.num_samples=100").data
    splits = data.build(cfg, SINGLE)
    assert splits.shape == (5,) and splits.out == 3
    assert len(splits.train) + len(splits.val) + len(splits.test) == 100
    assert set(splits.train.y.tolist()) <= {0, 1, 2}


@pytest.mark.unit
def test_regression_data_is_one_linear_relation_across_splits_with_the_noise_asked_for():
    def least_squares(cfg):
        splits = data.build(cfg, SINGLE)
        def ones(x):
            return torch.cat([x.flatten(1), torch.ones(len(x), 1)], 1).double()

        w = torch.linalg.lstsq(ones(splits.train.x), splits.train.y.double()).solution  # fitted on train only
        return [(ones(s.x) @ w - s.y.double()).std().item() for s in (splits.train, splits.val, splits.test)]

    exact = make_config("data=regression", "data.noise=0", "data.shape=[8]", "data.num_samples=400").data
    assert max(least_squares(exact)) < 1e-4  # val and test follow the relation fitted on train
    noisy = make_config("data=regression", "data.noise=0.5", "data.shape=[8]", "data.num_samples=4000").data
    assert all(0.45 < r < 0.55 for r in least_squares(noisy))


# -- sharding -------------------------------------------------------------------------------------

def ranks(n):
    return [w.World(rank=r, world_size=n) for r in range(n)]


@pytest.mark.unit
@pytest.mark.parametrize("drop_last", [True, False])
def test_training_shards_are_disjoint_cover_the_data_and_reshuffle_each_epoch(drop_last):
    ds = list(range(103))
    samplers = [data.TrainSampler(len(ds), r, shuffle=True, seed=0, drop_last=drop_last) for r in ranks(4)]
    shards = [list(s) for s in samplers]
    seen = [i for shard in shards for i in shard]
    if drop_last:  # 103 -> 25 per rank; the 3 left over are dropped, nothing is repeated
        assert len(seen) == len(set(seen)) == 100
    else:  # padded with repeats so every rank has 26
        assert set(seen) == set(ds) and all(len(s) == 26 for s in shards)
    for s in samplers:
        s.set_position(1, 0)
    assert [list(s) for s in samplers] != shards


@pytest.mark.unit
def test_global_batches_hold_the_same_samples_whatever_the_world_size():
    ds, global_batch = list(range(64)), 8

    def batches(n):
        shards = []
        for r in ranks(n):
            s = data.TrainSampler(len(ds), r, shuffle=True, seed=3, drop_last=True)
            s.set_position(2, 0)
            shards.append(list(s))
        per = global_batch // n
        return [sorted(i for shard in shards for i in shard[b * per:(b + 1) * per]) for b in range(64 // global_batch)]

    assert batches(1) == batches(2) == batches(4)


@pytest.mark.unit
def test_a_sampler_resumed_mid_epoch_continues_from_the_saved_global_position():
    ds = list(range(40))
    full = data.TrainSampler(len(ds), SINGLE, shuffle=True, seed=0, drop_last=True)
    full.set_position(1, 0)
    order = list(full)
    halves = [data.TrainSampler(len(ds), r, shuffle=True, seed=0, drop_last=True) for r in ranks(2)]
    for h in halves:
        h.set_position(1, 16)  # 16 global samples done, now on 2 ranks
    assert sorted(i for h in halves for i in h) == sorted(order[16:])


@pytest.mark.unit
def test_evaluation_shards_count_every_sample_exactly_once():
    shards = [list(data.ShardSampler(10, r)) for r in ranks(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


@pytest.mark.unit
@pytest.mark.parametrize("n,world_size,drop_last,shuffle", [(103, 4, True, True), (103, 4, False, True),
                                                            (10, 3, False, False), (2, 4, False, True),
                                                            (64, 2, True, True)])
def test_the_epoch_order_is_torchs_distributed_sampler_order(n, world_size, drop_last, shuffle):
    from torch.utils.data import DistributedSampler
    for world in ranks(world_size):
        for epoch in (0, 3):
            theirs = DistributedSampler(range(n), world_size, world.rank, shuffle=shuffle, seed=5, drop_last=drop_last)
            theirs.set_epoch(epoch)
            ours = data.epoch_order(n, world, seed=5, epoch=epoch, shuffle=shuffle, drop_last=drop_last)
            assert ours.tolist() == list(theirs)


def both_paths(*overrides):
    """The device and the DataLoader path of the same config, for each of two ranks."""
    cfg = make_config("data.batch_size=16", "data.eval_batch_size=10", "data.drop_last=false", *overrides)
    ids = data.Tensors(torch.zeros(203, 1), torch.arange(203))  # each label names its sample
    out = {}
    for path in ("device", "stream"):
        cfg.data.loader = DataPath(path)
        out[path] = [(data.train_loader(ids, cfg, r), data.eval_loader(ids, cfg, r)) for r in ranks(2)]
    return out


@pytest.mark.unit
def test_the_device_path_and_the_dataloader_path_give_each_rank_the_same_batches():
    paths = both_paths()
    assert isinstance(paths["device"][0][0], data.DeviceLoader)
    assert isinstance(paths["stream"][0][0], data.StreamLoader)
    for rank in range(2):
        device, stream = paths["device"][rank], paths["stream"][rank]
        for epoch, done in ((0, 0), (1, 0), (2, 48)):  # 48: resumed after 3 global batches
            for loader in (device[0], stream[0]):
                loader.set_position(epoch, done)
            lengths = [len(device[0]), len(stream[0])]
            batches = [[y.tolist() for _, y in loader] for loader in (device[0], stream[0])]
            assert batches[0] == batches[1] and lengths == [len(batches[0])] * 2
        assert [y.tolist() for _, y in device[1]] == [y.tolist() for _, y in stream[1]]
    evaluated = sorted(i for rank in range(2) for _, y in paths["device"][rank][1] for i in y.tolist())
    assert evaluated == list(range(len(paths["device"][0][1].dataset)))  # every sample once


@pytest.mark.unit
def test_the_device_path_normalises_once_up_front_to_the_same_numbers_unless_it_augments():
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    ds = data.Tensors(images, torch.arange(40), data.ToFloat([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]))
    loader = data.DeviceLoader(ds, SINGLE, 8, train=True, seed=1)
    assert loader.dataset.x.dtype == torch.float32 and loader.dataset.to_float is None  # converted once
    for x, y in loader:
        assert torch.equal(x, ds.batch(y)[0])  # bit for bit what a per-batch conversion gives
    augmented = data.Tensors(images, torch.arange(40), ds.to_float, augment.Augment([augment.Flip()]))
    assert data.DeviceLoader(augmented, SINGLE, 8, train=True).dataset.x.dtype == torch.uint8
    assert ds.prepared(limit_bytes=images.numel() * 4 - 1) is ds  # too big as floats: stays uint8


@pytest.mark.unit
def test_auto_puts_in_memory_data_on_the_device_and_files_on_the_dataloader(tmp_path):
    cfg = make_config()
    assert isinstance(data.train_loader(data.build(cfg.data, SINGLE).train, cfg, SINGLE), data.DeviceLoader)
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.loader=device")
    with pytest.raises(ConfigError, match="data.loader=device needs a data set held in memory"):
        data.train_loader(torch.utils.data.TensorDataset(torch.zeros(100, 1)), cfg, SINGLE)


@pytest.mark.unit
def test_batched_crop_and_flip_cut_each_image_from_its_padded_self_and_a_resumed_epoch_repeats_them():
    images = torch.randint(0, 255, (32, 3, 8, 8), dtype=torch.uint8)
    ds = data.Tensors(images, torch.arange(32), augment=augment.Augment([augment.Crop(2), augment.Flip()]))
    loader = data.DeviceLoader(ds, SINGLE, 8, train=True, seed=1)
    loader.set_position(4, 0)
    epoch = [(x, y) for x, y in loader]
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for x, y in epoch:
        for image, i in zip(x, y.tolist()):
            crops = {(a, b): padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)}
            match = [f for c in crops.values() for f, view in ((0, c), (1, c.flip(-1))) if torch.equal(view, image)]
            assert match, f"image {i} is no crop of its padded self"
            flips += match[0]
    assert 0 < flips < 32
    loader.set_position(4, 16)  # resumed after two batches: the same crops for the same samples
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch[2:], loader))
