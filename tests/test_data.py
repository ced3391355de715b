"""Data sets load from their official formats, split deterministically, and fail with a clear message."""

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain import data
from dtrain import world as w
from dtrain.config import ConfigError
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


def test_bundled_mnist_sample_splits_9000_train_1000_val_the_same_way_every_time():
    cfg = make_config().data
    a, b = data.build(cfg, SINGLE), data.build(cfg, SINGLE)
    assert (len(a.train), len(a.val), a.test) == (9000, 1000, None)
    assert (a.shape, a.out, a.task) == ((1, 28, 28), 10, "classification")
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    x, y = a.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and 0 <= int(y) < 10
    assert abs(float(a.train.transform(a.train.images[:512]).mean())) < 0.2  # normalised


def test_full_mnist_loads_the_official_idx_files(tmp_path):
    write_mnist(tmp_path)
    splits = data.build(make_config("data=mnist", f"data.root={tmp_path}", "data.download=false").data, SINGLE)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54, 6, 20)
    assert splits.test[3][0].shape == (1, 28, 28) and int(splits.test[3][1]) == 3


def test_cifar10_loads_the_official_python_batches(tmp_path):
    write_cifar10(tmp_path)
    cfg = make_config("data=cifar10", f"data.root={tmp_path}", "data.download=false",
                      "data.verify_checksums=false").data
    splits = data.build(cfg, SINGLE)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 10)
    assert (splits.shape, splits.out) == ((3, 32, 32), 10)
    assert splits.test[4][0].shape == (3, 32, 32) and int(splits.test[4][1]) == 4


def test_cifar10_files_that_fail_their_checksums_are_reported(tmp_path):
    write_cifar10(tmp_path)
    cfg = make_config("data=cifar10", f"data.root={tmp_path}", "data.download=false").data
    with pytest.raises(data.DataError, match="cifar-10-batches-py"):
        data.build(cfg, SINGLE)


def test_cifar10_augmentation_crops_and_flips_training_images_only(tmp_path):
    write_cifar10(tmp_path)
    cfg = make_config("data=cifar10", f"data.root={tmp_path}", "data.download=false",
                      "data.verify_checksums=false").data
    splits = data.build(cfg, SINGLE)
    torch.manual_seed(0)
    x = splits.train.images[0]
    augmented = [splits.train.transform(x) for _ in range(8)]
    assert all(a.shape == (3, 32, 32) for a in augmented)
    assert any(not torch.equal(augmented[0], a) for a in augmented[1:])  # random crop/flip
    assert torch.equal(splits.val.transform(x), splits.val.transform(x))  # evaluation is deterministic


@pytest.mark.parametrize("name,files", [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")])
def test_a_missing_data_set_offline_names_the_files_and_where_to_put_them(tmp_path, name, files):
    cfg = make_config(f"data={name}", f"data.root={tmp_path}", "data.download=false").data
    with pytest.raises(data.DataError, match=files) as err:
        data.build(cfg, SINGLE)
    assert str(tmp_path) in str(err.value)


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


def test_synthetic_data_takes_any_shape_and_class_count():
    cfg = make_config("data=synthetic", "data.shape=[5]", "data.num_classes=3", "data.num_samples=100").data
    splits = data.build(cfg, SINGLE)
    assert splits.shape == (5,) and splits.out == 3
    assert len(splits.train) + len(splits.val) + len(splits.test) == 100
    assert set(splits.train.tensors[1].tolist()) <= {0, 1, 2}


def test_regression_data_follows_its_known_coefficients():
    cfg = make_config("data=regression", "data.noise=0").data
    splits = data.build(cfg, SINGLE)
    coef, bias = data.regression_truth(cfg)
    x, y = splits.train.tensors
    assert torch.allclose(x @ coef + bias, y, atol=1e-5)


# -- sharding -------------------------------------------------------------------------------------

def ranks(n):
    return [w.World(rank=r, world_size=n) for r in range(n)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_training_shards_are_disjoint_cover_the_data_and_reshuffle_each_epoch(drop_last):
    ds = list(range(103))
    samplers = [data.TrainSampler(ds, r, shuffle=True, seed=0, drop_last=drop_last) for r in ranks(4)]
    for s in samplers:
        s.set_epoch(0)
    shards = [list(s) for s in samplers]
    seen = [i for shard in shards for i in shard]
    if drop_last:  # 103 -> 25 per rank; the 3 left over are dropped, nothing is repeated
        assert len(seen) == len(set(seen)) == 100
    else:  # padded with repeats so every rank has 26
        assert set(seen) == set(ds) and all(len(s) == 26 for s in shards)
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != shards


def test_global_batches_hold_the_same_samples_whatever_the_world_size():
    ds, global_batch = list(range(64)), 8

    def batches(n):
        shards = []
        for r in ranks(n):
            s = data.TrainSampler(ds, r, shuffle=True, seed=3, drop_last=True)
            s.set_epoch(2)
            shards.append(list(s))
        per = global_batch // n
        return [sorted(i for shard in shards for i in shard[b * per:(b + 1) * per]) for b in range(64 // global_batch)]

    assert batches(1) == batches(2) == batches(4)


def test_a_sampler_resumed_mid_epoch_continues_from_the_saved_global_position():
    ds = list(range(40))
    full = data.TrainSampler(ds, SINGLE, shuffle=True, seed=0, drop_last=True)
    full.set_epoch(1)
    order = list(full)
    halves = [data.TrainSampler(ds, r, shuffle=True, seed=0, drop_last=True) for r in ranks(2)]
    for h in halves:
        h.set_position(1, 16)  # 16 global samples done, now on 2 ranks
    assert sorted(i for h in halves for i in h) == sorted(order[16:])


def test_evaluation_shards_count_every_sample_exactly_once():
    shards = [list(data.ShardSampler(10, r)) for r in ranks(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
