"""Dataset loading of sgcompress.data: digits, idx folders, CIFAR folders, image folders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sgcompress.data import KNOWN_STATS, DataBundle, ImageDataset, load_data
from sgcompress.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _indices(ds) -> set[int]:
    assert isinstance(ds, ImageDataset)
    return set(ds.indices)


# --------------------------------------------------------------------------- digits


def test_digits_bundle_shapes_classes_and_disjoint_splits():
    b = load_data("digits", seed=0)
    assert isinstance(b, DataBundle)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("digits", 10, 1, (8, 8))
    # 1797 images: 20 % test = round(359.4) -> 360 (stratified split rounds up),
    # the other 1437: 10 % val = round(143.7) = 144, train 1293
    assert (len(b.train), len(b.val), len(b.test)) == (1293, 144, 360)
    tr, va, te = _indices(b.train), _indices(b.val), _indices(b.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr | va | te) == 1797
    x, y = b.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10
    assert sorted(set(b.val.targets)) == list(range(10))  # stratified: every class in val


def test_digits_deterministic_and_seeded():
    a, b = load_data("digits", seed=0), load_data("digits", seed=0)
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert torch.equal(a.val[3][0], b.val[3][0])
    c = load_data("digits", seed=1)
    assert c.val.indices != a.val.indices  # the seed picks another validation split ...
    assert c.test.indices == a.test.indices  # ... but the test set never changes
    assert a.mean == c.mean or abs(a.mean[0] - c.mean[0]) < 0.01


def test_digits_values_scaled_to_unit_range():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    b = load_data("digits", mean=(0.0,), std=(1.0,), augment=False)
    i = b.train.indices[0]
    x, _ = b.train[0]
    # 0..16 -> 0..255 (uint8, rounded) -> /255: 16 -> 1.0, 8 -> 128/255
    expected = torch.from_numpy(np.round(raw[i] * 255 / 16) / 255).float()
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0


def test_normalization_uses_computed_stats():
    b = load_data("digits", augment=False)
    xs = torch.stack([b.train[i][0] for i in range(len(b.train))])
    # stats come from (at most 2000) training images, i.e. all 1293 here: mean ~0, std ~1
    assert abs(float(xs.mean())) < 0.01
    assert abs(float(xs.std()) - 1.0) < 0.01


def test_val_and_test_never_augmented_train_is():
    b = load_data("digits", seed=0, augment=True)
    torch.manual_seed(0)
    assert torch.equal(b.val[0][0], b.val[0][0])
    assert torch.equal(b.test[5][0], b.test[5][0])
    draws = [b.train[0][0] for _ in range(20)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = load_data("digits", seed=0, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])


def test_limit_is_seeded_and_class_balanced():
    b = load_data("digits", limit=100, seed=3)
    assert len(b.train) + len(b.val) == 100 and len(b.val) == 10
    assert len(b.test) == 360  # the test set is always complete
    again = load_data("digits", limit=100, seed=3)
    assert b.train.indices == again.train.indices
    counts = np.bincount(b.train.targets + b.val.targets, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11


def test_channel_conversion_and_resize():
    b = load_data("digits", input_shape=(3, 16, 16), augment=False)
    assert b.in_channels == 3 and b.image_size == (16, 16) and len(b.mean) == 3
    x, _ = b.train[0]
    assert x.shape == (3, 16, 16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray replicated


# --------------------------------------------------------------------------- idx folders


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    n, h, w = images.shape
    img_bytes = struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()
    lab_bytes = struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()
    for name, data in ((f"{prefix}-images-idx3-ubyte", img_bytes), (f"{prefix}-labels-idx1-ubyte", lab_bytes)):
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)


def _tiny_images(n: int, h: int = 6, w: int = 6) -> tuple[np.ndarray, np.ndarray]:
    # image k: a bright (255) column at position k % w on black, label k % 3
    imgs = np.zeros((n, h, w), np.uint8)
    for k in range(n):
        imgs[k, :, k % w] = 255
    return imgs, np.arange(n) % 3


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path, gz):
    imgs, labels = _tiny_images(30)
    _write_idx(tmp_path, "train", imgs, labels, gz)
    _write_idx(tmp_path, "t10k", imgs[:9], labels[:9], gz)
    b = load_data(str(tmp_path), val_fraction=0.2, mean=(0.0,), std=(1.0,), augment=False)
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 1, (6, 6))
    assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 9)
    assert b.name.startswith("idx:")
    # the pixels survive the round trip exactly: column k % 6 is 1.0, the rest 0.0
    for ds in (b.train, b.val):
        for j in range(len(ds)):
            x, y = ds[j]
            k = ds.indices[j]
            assert y == k % 3
            expected = torch.zeros(1, 6, 6)
            expected[0, :, k % 6] = 1.0
            assert torch.equal(x, expected)
    assert [b.test[j][1] for j in range(9)] == [0, 1, 2] * 3


def test_idx_folder_without_test_files_and_raw_subfolder(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    imgs, labels = _tiny_images(20)
    _write_idx(raw, "train", imgs, labels, gz=True)
    b = load_data(str(tmp_path), input_shape=(3, 12, 12))
    assert b.test is None
    assert b.train[0][0].shape == (3, 12, 12)


def test_idx_mismatched_counts(tmp_path):
    imgs, labels = _tiny_images(10)
    _write_idx(tmp_path, "train", imgs, labels[:7], gz=False)
    with pytest.raises(DataError, match="10 images but .* 7"):
        load_data(str(tmp_path))


def test_idx_missing_labels(tmp_path):
    imgs, labels = _tiny_images(10)
    _write_idx(tmp_path, "train", imgs, labels, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_data(str(tmp_path))


# --------------------------------------------------------------------------- CIFAR python folders


def _py2_style_pickle(obj: dict) -> bytes:
    """Pickle ``obj`` with its str keys stored as Python 2 byte strings, as the CIFAR files are.

    Loading with ``encoding='bytes'`` then gives ``b'data'`` keys (as for the real files)
    and with ``encoding='latin1'`` (what torchvision does) ``'data'``.
    """
    raw = pickle.dumps(obj, protocol=2)
    for key in obj:
        k = key.encode()
        raw = raw.replace(b"X" + struct.pack("<I", len(k)) + k, b"U" + bytes([len(k)]) + k, 1)
    return raw


def _write_cifar10(root: Path, per_batch: int = 6, test: int = 5) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int, offset: int) -> dict:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, :1024] = 200  # red plane constant 200, green/blue random
        return {"data": data, "labels": [int((offset + i) % 10) for i in range(n)], "batch_label": "x"}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(_py2_style_pickle(batch(per_batch, i * per_batch)))
    (folder / "test_batch").write_bytes(_py2_style_pickle(batch(test, 0)))
    (folder / "batches.meta").write_bytes(
        _py2_style_pickle({"label_names": [f"class{i}" for i in range(10)]})
    )
    return folder


def test_fake_pickles_look_like_cifar(tmp_path):
    folder = _write_cifar10(tmp_path)
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"data", b"labels", b"batch_label"}
    assert entry[b"data"].shape == (6, 3072)


@pytest.mark.parametrize("give", ["parent", "folder"])
def test_cifar10_folder(tmp_path, give):
    folder = _write_cifar10(tmp_path)
    spec = tmp_path if give == "parent" else folder
    b = load_data(str(spec), val_fraction=0.2, augment=False)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("cifar10", 10, 3, (32, 32))
    assert (b.mean, b.std) == KNOWN_STATS["cifar10"]
    assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 5)
    assert not (_indices(b.train) & _indices(b.val))
    x, _ = b.train[0]
    assert x.shape == (3, 32, 32)
    # red plane 200/255 normalized with the CIFAR-10 red mean/std everywhere
    red = (200 / 255 - 0.4914) / 0.2470
    assert torch.allclose(x[0], torch.full((32, 32), red), atol=1e-5)


def test_cifar10_to_grayscale_small(tmp_path):
    _write_cifar10(tmp_path)
    b = load_data(str(tmp_path), input_shape=(1, 28, 28), augment=True)
    assert b.in_channels == 1 and b.image_size == (28, 28) and len(b.mean) == 1
    assert b.train[0][0].shape == (1, 28, 28) and b.test[0][0].shape == (1, 28, 28)


def test_cifar_missing_batch(tmp_path):
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_data(str(tmp_path))


def test_cifar100_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 40), ("test", 10)):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n}
        (folder / name).write_bytes(_py2_style_pickle(entry))
    b = load_data(str(folder), val_fraction=0.25)
    assert (b.name, b.num_classes) == ("cifar100", 100)
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 10)


# --------------------------------------------------------------------------- image folders


def _png(path: Path, color, size=(10, 12), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), color).save(path)  # PIL takes (width, height)


def _write_image_folder(root: Path) -> None:
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}
    for cls, color in colors.items():
        for i in range(4):
            _png(root / "train" / cls / f"{i}.png", color)
    for cls in ("cat", "eel"):  # val holds a subset of the classes
        _png(root / "val" / cls / "0.png", colors[cls])


def test_image_folder(tmp_path):
    _write_image_folder(tmp_path)
    b = load_data(str(tmp_path), val_fraction=0.25, mean=(0, 0, 0), std=(1, 1, 1), augment=False)
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 3, (10, 12))
    assert (len(b.train), len(b.val), len(b.test)) == (9, 3, 2)
    # val/ used as the test set, with the TRAIN class indices (cat=0, dog=1, eel=2)
    assert sorted(b.test[i][1] for i in range(2)) == [0, 2]
    for i in range(2):
        x, y = b.test[i]
        assert x.shape == (3, 10, 12)
        expected = {0: (1.0, 0.0, 0.0), 2: (0.0, 1.0, 0.0)}[y]
        assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected))
    assert sorted(set(b.val.targets)) == [0, 1, 2]


def test_image_folder_grayscale_and_resize(tmp_path):
    _write_image_folder(tmp_path)
    b = load_data(str(tmp_path), input_shape=(1, 8, 8), mean=(0,), std=(1,), augment=False)
    x, y = b.test[0]
    assert x.shape == (1, 8, 8) and y == 0
    # red (255, 0, 0) -> luma 0.299 * 255 = 76 -> 76/255
    assert torch.allclose(x, torch.full((1, 8, 8), 76 / 255), atol=1.5 / 255)


def test_image_folder_gray_pngs_are_one_channel(tmp_path):
    for cls, v in (("a", 30), ("b", 220)):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", v, size=(9, 9), mode="L")
    b = load_data(str(tmp_path), val_fraction=0.34)
    assert b.in_channels == 1 and b.test is None and b.image_size == (9, 9)
    assert b.train[0][0].shape == (1, 9, 9)


def test_image_folder_mixed_sizes_need_input_shape(tmp_path):
    _png(tmp_path / "a" / "0.png", (1, 2, 3), size=(10, 10))
    _png(tmp_path / "a" / "1.png", (1, 2, 3), size=(20, 16))
    _png(tmp_path / "b" / "0.png", (1, 2, 3), size=(10, 10))
    _png(tmp_path / "b" / "1.png", (1, 2, 3), size=(10, 10))
    with pytest.raises(DataError, match="different sizes.*input_shape"):
        load_data(str(tmp_path), val_fraction=0.5)
    b = load_data(str(tmp_path), val_fraction=0.5, input_shape=(3, 8, 8))
    assert all(b.train[i][0].shape == (3, 8, 8) for i in range(len(b.train)))


def test_image_folder_test_classes_must_exist_in_train(tmp_path):
    _write_image_folder(tmp_path)
    _png(tmp_path / "val" / "yak" / "0.png", (9, 9, 9))
    with pytest.raises(DataError, match="yak"):
        load_data(str(tmp_path))


# --------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist.*accepted"):
        load_data(str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        load_data(str(tmp_path))


def test_unrecognised_folder_names_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="notes.txt.*accepted data specs"):
        load_data(str(tmp_path))


def test_class_folders_without_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.txt").write_text("no image")
    with pytest.raises(DataError, match="no image files"):
        load_data(str(tmp_path))


def test_zero_classes(tmp_path):
    (tmp_path / "train").mkdir()
    _png(tmp_path / "train" / "loose.png", (0, 0, 0))
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(str(tmp_path))


def test_single_class(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "only" / f"{i}.png", (0, 0, 0))
    with pytest.raises(DataError, match="only one class"):
        load_data(str(tmp_path))


def test_file_instead_of_folder(tmp_path):
    imgs, labels = _tiny_images(4)
    _write_idx(tmp_path, "train", imgs, labels, gz=True)
    with pytest.raises(DataError, match="pass the folder"):
        load_data(str(tmp_path / "train-images-idx3-ubyte.gz"))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(input_shape=(2, 8, 8)), ConfigError, "C=1 or C=3"),
        (dict(input_shape=(1, 8)), ConfigError, "three positive integers"),
        (dict(input_shape=(1, 0, 8)), ConfigError, "three positive integers"),
        (dict(input_shape=(1, 224, 224)), DataError, "at most 64x64"),
        (dict(val_fraction=0.0), ConfigError, "val_fraction"),
        (dict(val_fraction=1.5), ConfigError, "val_fraction"),
        (dict(limit=1), ConfigError, "limit"),
        (dict(mean=(0.5,)), ConfigError, "both mean and std"),
        (dict(mean=(0.5, 0.5), std=(1.0, 1.0)), ConfigError, "1 channels"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_data("digits", **kwargs)


# --------------------------------------------------------------------------- the real Fashion-MNIST


@pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    b = load_data(str(FASHION), seed=0)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("fashion-mnist", 10, 1, (28, 28))
    assert (len(b.train), len(b.val), len(b.test)) == (54_000, 6_000, 10_000)
    assert (b.mean, b.std) == KNOWN_STATS["fashion-mnist"]
    assert np.bincount(b.val.targets, minlength=10).tolist() == [600] * 10  # stratified
    assert np.bincount(b.test.source.targets.numpy(), minlength=10).tolist() == [1000] * 10
    x, y = b.test[0]
    assert x.shape == (1, 28, 28) and y == 9  # the first test image is an ankle boot


def test_damaged_idx_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00garbage")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(DataError, match="cannot read idx file .*train-images"):
        load_data(str(tmp_path))


def test_damaged_cifar_pickle(tmp_path):
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read CIFAR folder"):
        load_data(str(tmp_path))
