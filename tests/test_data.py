"""Tests for raysage.data: datasets, partitioning, transforms (no Ray)."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from raysage.data import DATASETS, PARTITIONERS, ArrayDataset, load_dataset, make_batch, partition
from raysage.data.transforms import augment, to_float_batch
from raysage.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> ArrayDataset:
    return load_dataset("synthetic", seed=0)


def test_registry_names():
    assert set(DATASETS) == {"synthetic", "cifar10", "cifar100"}
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shards"}


def test_synthetic_shapes_and_dtypes(synthetic):
    ds = synthetic
    assert ds.x_train.shape == (10_000, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.y_train.shape == (10_000,) and ds.y_train.dtype == np.int64
    assert ds.x_test.shape == (1_000, 32, 32, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_test.shape == (1_000,) and ds.y_test.dtype == np.int64
    assert ds.num_classes == 10
    assert ds.mean == MEAN and ds.std == STD


def test_synthetic_custom_sizes():
    ds = load_dataset("synthetic", num_train=123, num_test=7, seed=3)
    assert len(ds.x_train) == 123 and len(ds.y_train) == 123
    assert len(ds.x_test) == 7


def test_synthetic_deterministic():
    a = load_dataset("synthetic", num_train=500, num_test=100, seed=5)
    b = load_dataset("synthetic", num_train=500, num_test=100, seed=5)
    c = load_dataset("synthetic", num_train=500, num_test=100, seed=6)
    assert a.x_train[:].tobytes() == b.x_train[:].tobytes()
    assert a.y_train.tobytes() == b.y_train.tobytes()
    assert a.x_test[:].tobytes() == b.x_test[:].tobytes()
    assert a.x_train[:].tobytes() != c.x_train[:].tobytes()
    # Train and test come from different streams.
    assert a.x_train[:100].tobytes() != a.x_test[:].tobytes()


# sha256 (first 16 hex digits) of x_train, y_train, x_test, y_test as the generator
# made them when it drew every image up front, before images were made on demand.
SYNTHETIC_DIGESTS = {
    (200, 2000, 300): ("04f97a9501412b12", "f87b6fd55e2e26aa", "bcbd7cd3ccd8bfc2",
                       "7971f11af2d2ab56"),
    (11, 150, 200): ("56fd93cec07fdef1", "ca610b1a72067acc", "3ff0b118a38f638f",
                     "4d4426a06a62ea9c"),
    (7, 1025, 5): ("ee0533ffdf803e69", "0fb19447ca1867b5", "2405756b672b35ac",
                   "3b1c60d8b2843fca"),
}


@pytest.mark.parametrize("seed, n, m", sorted(SYNTHETIC_DIGESTS))
def test_synthetic_images_made_on_demand_are_the_ones_drawn_up_front(seed, n, m):
    import hashlib

    ds = load_dataset("synthetic", num_train=n, num_test=m, seed=seed)
    arrays = (ds.x_train[np.arange(n)], ds.y_train, ds.x_test[:], ds.y_test)
    digests = tuple(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
                    for a in arrays)
    assert digests == SYNTHETIC_DIGESTS[(seed, n, m)]


def test_synthetic_images_are_random_access_and_compact():
    ds = load_dataset("synthetic", num_train=1500, num_test=10, seed=3)
    whole = ds.x_train[:]
    picks = np.array([1499, 0, 512, 511, 513, 7, 7])
    np.testing.assert_array_equal(ds.x_train[picks], whole[picks])
    np.testing.assert_array_equal(ds.x_train[10:20], whole[10:20])
    assert ds.x_train[np.array([], np.int64)].shape == (0, 32, 32, 3)
    # A million images cost tens of bytes each, not 3,072.
    big = load_dataset("synthetic", num_train=1_000_000, num_test=10, seed=3)
    assert big.x_train.shape == (1_000_000, 32, 32, 3)
    assert big.x_train.nbytes < 30 * 2**20
    # Pickled (sent to a worker) it is as small, and makes the same images there.
    import pickle

    again = pickle.loads(pickle.dumps(ds.x_train))
    np.testing.assert_array_equal(again[picks], whole[picks])


def test_synthetic_balanced_labels(synthetic):
    assert np.bincount(synthetic.y_train).tolist() == [1000] * 10
    assert np.bincount(synthetic.y_test).tolist() == [100] * 10
    # Shuffled, not round-robin order.
    assert synthetic.y_train[:10].tolist() != list(range(10))


def test_synthetic_learnable_but_not_trivial(synthetic):
    ds = synthetic
    xtr = ds.x_train[:].reshape(len(ds.x_train), -1).astype(np.float32)
    xte = ds.x_test[:].reshape(len(ds.x_test), -1).astype(np.float32)
    means = np.stack([xtr[ds.y_train == c].mean(axis=0) for c in range(10)])
    dist = (xte**2).sum(1)[:, None] - 2 * xte @ means.T + (means**2).sum(1)[None, :]
    acc = (dist.argmin(1) == ds.y_test).mean()
    assert 0.20 < acc < 0.95, acc


# --------------------------------------------------------------------------
# CIFAR from the shared .npz subset
# --------------------------------------------------------------------------


def _need_shared() -> None:
    if not (SHARED_DATA / "cifar10_subset.npz").is_file():
        pytest.skip(f"../shared/data not found: {SHARED_DATA} has no cifar10_subset.npz")


def test_cifar10_npz_from_directory():
    _need_shared()
    ds = load_dataset("cifar10", str(SHARED_DATA))
    assert ds.x_train.shape == (5482, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (1017, 32, 32, 3)
    assert ds.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert ds.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10


def test_cifar_npz_file_and_truncation():
    _need_shared()
    ds = load_dataset("cifar10", str(SHARED_DATA / "cifar10_subset.npz"), num_train=100, num_test=10)
    assert len(ds.x_train) == 100 and len(ds.y_test) == 10
    assert ds.y_test.tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    with pytest.raises(DataError, match="5482 training images, cannot take 6000"):
        load_dataset("cifar10", str(SHARED_DATA), num_train=6000)


def test_cifar100_npz_from_directory():
    _need_shared()
    if not (SHARED_DATA / "cifar100_subset.npz").is_file():
        pytest.skip(f"../shared/data not found: {SHARED_DATA} has no cifar100_subset.npz")
    ds = load_dataset("cifar100", str(SHARED_DATA))
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes) == (1117, 916, 100)


# --------------------------------------------------------------------------
# CIFAR python pickles
# --------------------------------------------------------------------------


def _fake_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> None:
    batch = {b"batch_label": b"fake batch", label_key: labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    with path.open("wb") as f:
        pickle.dump(batch, f)


def _write_cifar10(root: Path, per_batch: int = 4, n_test: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _write_batch(d / f"data_batch_{i}", _fake_rows(per_batch, i), [(i + j) % 10 for j in range(per_batch)])
    _write_batch(d / "test_batch", _fake_rows(n_test, 0), [j % 10 for j in range(n_test)])
    return d


def test_cifar10_pickles_chw_to_hwc(tmp_path):
    batches = _write_cifar10(tmp_path)
    for data_dir in (tmp_path, batches):  # parent folder or the batches folder itself
        ds = load_dataset("cifar10", str(data_dir))
        assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (20, 32, 32, 3)
        assert ds.y_train[:6].tolist() == [1, 2, 3, 4, 2, 3]  # batch 1 then batch 2
        rows = _fake_rows(20, 0)
        # CHW row-major: channel c, row y, column x sits at c*1024 + y*32 + x.
        assert ds.x_test[3, 5, 7, 2] == rows[3, 2 * 1024 + 5 * 32 + 7]
        assert ds.x_test[0, 0, 1, 0] == rows[0, 1]
        assert ds.x_test[0, 0, 0, 1] == rows[0, 1024]
        np.testing.assert_array_equal(ds.x_test[9], rows[9].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar100_pickles_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _write_batch(d / "train", _fake_rows(6, 1), [0, 99, 5, 6, 7, 8], b"fine_labels")
    _write_batch(d / "test", _fake_rows(3, 2), [42, 1, 2], b"fine_labels")
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.y_train.tolist() == [0, 99, 5, 6, 7, 8] and ds.y_test.tolist() == [42, 1, 2]
    assert ds.num_classes == 100


class _Malicious:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    batches = _write_cifar10(tmp_path)
    marker = tmp_path / "MARKER"
    with (batches / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Malicious(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"refusing to unpickle global .*system in .*test_batch: not a CIFAR batch"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_truncated_pickle(tmp_path):
    batches = _write_cifar10(tmp_path)
    full = (batches / "data_batch_3").read_bytes()
    (batches / "data_batch_3").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="data_batch_3 is truncated or corrupt"):
        load_dataset("cifar10", str(tmp_path))


def test_bad_batch_contents(tmp_path):
    batches = _write_cifar10(tmp_path)
    _write_batch(batches / "test_batch", _fake_rows(3, 0), [0, 1, 10])
    with pytest.raises(DataError, match="labels in \\[0, 10\\], expected 0..9"):
        load_dataset("cifar10", str(tmp_path))
    _write_batch(batches / "test_batch", np.zeros((3, 100), np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match="expected uint8 of shape \\(N, 3072\\)"):
        load_dataset("cifar10", str(tmp_path))
    _write_batch(batches / "test_batch", _fake_rows(3, 0), [0, 1])
    with pytest.raises(DataError, match="2 labels for 3 images"):
        load_dataset("cifar10", str(tmp_path))


def test_missing_batch_file(tmp_path):
    batches = _write_cifar10(tmp_path)
    (batches / "data_batch_2").unlink()
    with pytest.raises(DataError, match="data_batch_2 not found.*--data-dir"):
        load_dataset("cifar10", str(tmp_path))


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no cifar100 data"):
        load_dataset("cifar100", str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of synthetic, cifar10, cifar100"):
        load_dataset("mnist")


# --------------------------------------------------------------------------
# .npz files
# --------------------------------------------------------------------------


def _write_npz(path: Path, **overrides: np.ndarray) -> None:
    arrays = {
        "x_train": np.zeros((4, 32, 32, 3), np.uint8),
        "y_train": np.array([0, 1, 2, 3], np.int64),
        "x_test": np.zeros((2, 32, 32, 3), np.uint8),
        "y_test": np.array([4, 5], np.int64),
    }
    arrays.update(overrides)
    np.savez(path, **arrays)


def test_npz_ok_and_dir_lookup(tmp_path):
    _write_npz(tmp_path / "cifar10.npz")
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.y_test.tolist() == [4, 5] and ds.x_train.shape == (4, 32, 32, 3)


def test_npz_not_a_zip(tmp_path):
    bad = tmp_path / "cifar10.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="is not a .npz \\(zip\\) archive"):
        load_dataset("cifar10", str(bad))


def test_npz_truncated(tmp_path):
    path = tmp_path / "cifar10.npz"
    _write_npz(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt .npz"):
        load_dataset("cifar10", str(path))


def test_npz_wrong_contents(tmp_path):
    path = tmp_path / "c.npz"
    _write_npz(path, x_train=np.zeros((4, 3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="x_train is uint8 of shape \\(4, 3, 32, 32\\)"):
        load_dataset("cifar10", str(path))
    _write_npz(path, y_test=np.array([4, 10]))
    with pytest.raises(DataError, match="y_test"):
        load_dataset("cifar10", str(path))
    np.savez(path, x_train=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="lacks arrays"):
        load_dataset("cifar10", str(path))


# --------------------------------------------------------------------------
# partition
# --------------------------------------------------------------------------

LABELS_10x100 = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_sizes_distinct_deterministic(scheme):
    parts = partition(LABELS_10x100, 10, scheme, seed=1)
    assert [len(p) for p in parts] == [100] * 10
    assert all(p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == 1000  # every sample used exactly once
    again = partition(LABELS_10x100, 10, scheme, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS_10x100, 10, scheme, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_samples_per_client(scheme):
    parts = partition(LABELS_10x100, 7, scheme, samples_per_client=45, shards_per_client=4, seed=0)
    assert [len(p) for p in parts] == [45] * 7
    assert len(np.unique(np.concatenate(parts))) == 7 * 45


def test_partition_default_drops_remainder():
    parts = partition(np.arange(103) % 10, 10, "iid")
    assert [len(p) for p in parts] == [10] * 10


def _mean_tv(parts: list[np.ndarray], labels: np.ndarray) -> float:
    k = labels.max() + 1
    global_dist = np.bincount(labels, minlength=k) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - global_dist).sum() for p in parts]
    return float(np.mean(tvs))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 1000)
    tv = {a: _mean_tv(partition(labels, 20, "dirichlet", alpha=a, samples_per_client=200), labels) for a in (0.1, 1, 100)}
    assert tv[0.1] > tv[1] > tv[100]
    assert tv[0.1] > 0.6 and tv[100] < 0.15


def test_dirichlet_huge_alpha_two_classes_balanced():
    labels = np.repeat([0, 1], 1000)
    parts = partition(labels, 2, "dirichlet", alpha=1e6, samples_per_client=500)
    for p in parts:
        # p ~ (0.5, 0.5); binomial sd of the fraction is 0.022.
        assert 0.42 < labels[p].mean() < 0.58


def test_dirichlet_tiny_alpha_exhausts_classes():
    # Every sample must be handed out, so clients must fall back to other
    # classes once their favourite runs out.
    parts = partition(LABELS_10x100, 10, "dirichlet", alpha=1e-3, seed=3)
    assert [len(p) for p in parts] == [100] * 10
    assert len(np.unique(np.concatenate(parts))) == 1000


def test_shards_label_count():
    labels = np.repeat(np.arange(10), 20)  # sorted, 10 classes x 20
    parts = partition(labels, 10, "shards", shards_per_client=2, seed=4)
    assert [len(p) for p in parts] == [20] * 10
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == 200


def test_partition_errors():
    labels = np.arange(5482) % 10
    with pytest.raises(DataError, match="dataset has 5482 training samples, cannot give 10 clients 1000 each"):
        partition(labels, 10, "iid", samples_per_client=1000)
    with pytest.raises(DataError, match="too few for 6000 clients"):
        partition(labels, 6000, "iid")
    with pytest.raises(DataError, match="unknown partition scheme 'pareto'"):
        partition(labels, 10, "pareto")
    with pytest.raises(DataError, match="--alpha must be positive"):
        partition(labels, 10, "dirichlet", alpha=0.0)
    with pytest.raises(DataError, match="cannot cut 1 samples per client into 2 shards"):
        partition(labels, 10, "shards", samples_per_client=1)
    with pytest.raises(DataError, match="--clients must be at least 1"):
        partition(labels, 0, "iid")


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------


def test_make_batch_normalisation_by_hand():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[0, 1, 2] = (128, 64, 255)
    out = make_batch(x, MEAN, STD, train=False, generator=None)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    # (128/255 - 0.485)/0.229, (64/255 - 0.456)/0.224, (1 - 0.406)/0.225
    np.testing.assert_allclose(out[0, :, 1, 2].numpy(), [0.074061, -0.915266, 2.64], atol=1e-5)
    # A black pixel is -mean/std.
    np.testing.assert_allclose(out[1, :, 0, 0].numpy(), [-2.117904, -2.035714, -1.804444], atol=1e-5)
    assert out.is_contiguous()


def test_make_batch_read_only_input():
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = make_batch(x, MEAN, STD, train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32)
    torch.testing.assert_close(to_float_batch(x, MEAN, STD), make_batch(x, MEAN, STD, train=False, generator=None))


def _image_batch(n: int) -> torch.Tensor:
    # Values 1..255 so the zero padding is recognisable.
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))


def test_augment_flip_only():
    img = _image_batch(1)
    batch = img.repeat(64, 1, 1, 1)
    out = augment(batch, torch.Generator().manual_seed(0), padding=0, flip=True)
    same = (out == img).flatten(1).all(1)
    mirrored = (out == img.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 16 < int(mirrored.sum()) < 48  # p = 0.5 of 64
    # Column 0 of a mirrored image is column 31 of the original.
    k = int(mirrored.nonzero()[0])
    assert torch.equal(out[k, :, :, 0], img[0, :, :, 31])


def test_augment_crop_is_shifted_copy():
    x = _image_batch(8)
    out = augment(x, torch.Generator().manual_seed(1), padding=4, flip=False)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = []
    for i in range(8):
        found = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])]
        assert len(found) == 1
        offsets.append(found[0])
    assert any(o != (4, 4) for o in offsets)  # not all centred
    # A sample shifted by (dy, dx) shows 4 - dy rows of zero padding at the top.
    dy, _ = offsets[0]
    assert bool((out[0, :, : max(0, 4 - dy)] == 0).all())


def test_augment_deterministic():
    x = _image_batch(32)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_make_batch_train_pads_raw_image():
    x = _image_batch(16).permute(0, 2, 3, 1).numpy()
    out = make_batch(x, MEAN, STD, train=True, generator=torch.Generator().manual_seed(3))
    chw = augment(torch.from_numpy(x).permute(0, 3, 1, 2), torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, to_float_batch(chw.permute(0, 2, 3, 1), MEAN, STD))
    again = make_batch(x, MEAN, STD, train=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
