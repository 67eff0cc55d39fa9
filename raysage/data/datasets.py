"""Datasets as plain in-memory arrays.

Every dataset is returned as an :class:`ArrayDataset` holding uint8 HWC
images and int64 labels. Keeping raw uint8 (not normalised floats) makes the
arrays four times smaller in Ray's object store; normalisation and
augmentation happen per batch in :mod:`raysage.data.transforms`.

CIFAR can be read from the standard "python version" pickles or from a
``.npz`` file. Pickles can execute code when loaded, so they go through a
restricted unpickler that only lets numpy rebuild arrays.
"""

from __future__ import annotations

import errno
import importlib
import pickle
import sys
import threading
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from raysage.errors import DataError

# The paper normalises every dataset with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3

_DATA_DIR_HINT = (
    "pass --data-dir pointing at the folder that holds cifar-10-batches-py / "
    "cifar-100-python, or at a .npz file with x_train, y_train, x_test, y_test"
)


@dataclass(frozen=True)
class ArrayDataset:
    """A train/test split of 32x32 RGB images (or token sequences, for the language task).

    Images are indexed by arrays of indices, ``x_train[idx]``; they are numpy
    arrays in memory, or :class:`SyntheticImages` made when indexed.
    """

    name: str
    x_train: np.ndarray | SyntheticImages  # uint8, (N, 32, 32, 3), HWC RGB
    y_train: np.ndarray  # int64, (N,)
    x_test: np.ndarray | SyntheticImages  # uint8, (M, 32, 32, 3)
    y_test: np.ndarray  # int64, (M,)
    num_classes: int
    mean: tuple[float, float, float]  # per channel, in [0, 1] pixel units
    std: tuple[float, float, float]


# --------------------------------------------------------------------------
# Synthetic dataset
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _SynthSpec:
    """Knobs of the synthetic generator (tuned so raw-pixel linear models
    are clearly above chance but far from perfect, while a CNN does well)."""

    classes: int = 10
    templates_per_class: int = 4
    max_freq: int = 2  # spatial frequencies 0..max_freq cycles per image: smooth blobs
    # Shifts (wrapping around) are what defeat per-pixel linear models; a
    # CNN is translation-equivariant and shrugs them off.
    max_shift: int = 5  # pixels, each direction, applied to both templates
    max_mix: float = 0.45  # weight of the other class's template, uniform in [0, max_mix]
    contrast: tuple[float, float] = (0.7, 1.1)
    brightness: tuple[float, float] = (-0.1, 0.1)  # in [0, 1] pixel units
    # Pixel noise: raw random bytes read as int8 (uniform in [-128, 127])
    # times this factor. Raw bytes are ~10x faster to draw than bounded
    # integers or normals, and noise is most of the generation cost.
    noise_scale: float = 0.4


_SYNTH = _SynthSpec()


def _synthetic_templates(seed: int, spec: _SynthSpec = _SYNTH) -> np.ndarray:
    """Class templates, uint8 (classes * templates_per_class, 32, 32, 3).

    Template ``cls * templates_per_class + k`` is the k-th template of class
    ``cls``. Seeded by ``seed`` alone so train and test share the classes.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    freqs = np.arange(spec.max_freq + 1)
    fy, fx = (f.ravel() for f in np.meshgrid(freqs, freqs, indexing="ij"))
    shape = (spec.classes * spec.templates_per_class, fy.size, 3)
    # Amplitudes fall off with frequency so the templates stay smooth.
    amp = rng.normal(size=shape) / (1.0 + fy + fx)[None, :, None]
    phase = rng.uniform(0.0, 2 * np.pi, size=shape)
    grid = np.arange(32) / 32.0
    # Integer frequencies make every template periodic on the 32-pixel
    # grid, so shifting by wrapping around never creates a seam.
    angle = 2 * np.pi * (fy[:, None, None] * grid[None, :, None] + fx[:, None, None] * grid[None, None, :])
    waves = np.cos(angle[None, :, :, :, None] + phase[:, :, None, None, :])  # (T, F, 32, 32, 3)
    templates = np.einsum("tfc,tfyxc->tyxc", amp, waves)
    # Stretch each template to [0, 255] so all classes have the same contrast.
    lo = templates.min(axis=(1, 2, 3), keepdims=True)
    hi = templates.max(axis=(1, 2, 3), keepdims=True)
    return np.round((templates - lo) / (hi - lo) * 255).astype(np.uint8)


def _all_shifts(templates: np.ndarray) -> np.ndarray:
    """View (T, 32, 32, 32, 32, 3): ``[t, dy, dx]`` is template t rolled up by dy, left by dx.

    Windows into the template tiled 2x2 cost no memory, and indexing them
    copies each sample's pixels in one go.
    """
    tiled = np.tile(templates, (1, 2, 2, 1))
    windows = np.lib.stride_tricks.sliding_window_view(tiled, (32, 32), axis=(1, 2))  # (T, 33, 33, 3, 32, 32)
    return windows[:, :32, :32].transpose(0, 1, 2, 4, 5, 3)


class SyntheticImages:
    """The synthetic images of one split, generated when indexed.

    ``images[idx]`` (an index array or a slice) returns uint8 (len, 32, 32, 3)
    exactly as if every image had been drawn up front, but only the images
    asked for are made. Per image the object keeps its template indices,
    shift and affine coefficients (about 20 bytes instead of 3,072), so a
    million-image split costs tens of MB and a client's batch is generated
    where it is trained.

    The draws follow one seeded stream: every per-image parameter first, then
    the pixel noise as raw bytes, image after image. Image j's noise is
    therefore a fixed stretch of that byte stream, which PCG64 reaches by
    jumping ahead (``advance``) without drawing what comes before it.
    """

    NOISE_WORDS = _PIXELS // 8      # 64-bit PCG outputs of noise per image

    def __init__(self, templates: np.ndarray, n: int, rng: np.random.Generator,
                 spec: _SynthSpec = _SYNTH):
        k = spec.templates_per_class
        # Balanced labels: round-robin, then shuffled.
        labels = rng.permutation(np.arange(n) % spec.classes)
        other_cls = (labels + rng.integers(1, spec.classes, size=n)) % spec.classes  # never the own class
        own = labels * k + rng.integers(0, k, size=n)
        other = other_cls * k + rng.integers(0, k, size=n)
        dy, dx = rng.integers(-spec.max_shift, spec.max_shift + 1, size=(2, n)) % 32
        mix = rng.uniform(0.0, spec.max_mix, size=n)
        contrast = rng.uniform(*spec.contrast, size=n)
        brightness = rng.uniform(*spec.brightness, size=n)
        # pixel = 255 * (contrast * ((1-mix)*own + mix*other - 0.5) + 0.5 + brightness)
        # with own/other in [0, 1]; the templates hold 255*own, so per sample this
        # is one affine map a*own + b*other + c (the +0.5 rounds on the uint8 cast).
        self.a = (contrast * (1 - mix)).astype(np.float32)
        self.b = (contrast * mix).astype(np.float32)
        self.c = (255 * (0.5 + brightness - 0.5 * contrast) + 0.5).astype(np.float32)
        self.own, self.other = own.astype(np.int16), other.astype(np.int16)
        self.dy, self.dx = dy.astype(np.uint8), dx.astype(np.uint8)
        self.labels = labels.astype(np.int64)
        self.templates = templates
        self.noise_scale = np.float32(spec.noise_scale)
        # Where the noise bytes begin: the stream's state after the parameters,
        # including the half of a 64-bit output a 32-bit draw may have left.
        self.noise_start = rng.bit_generator.state
        assert sys.byteorder == "little", "noise words are read as little-endian bytes"
        self._shifted = self._bits = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), 32, 32, 3)

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def nbytes(self) -> int:
        """Bytes this object holds (not the images it stands for)."""
        return (sum(a.nbytes for a in (self.a, self.b, self.c, self.own, self.other, self.dy,
                                      self.dx, self.labels)) + self.templates.nbytes)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shifted"] = state["_bits"] = None     # rebuilt where they are used
        return state

    def _noise_into(self, out: np.ndarray, idx: np.ndarray) -> None:
        """Write images idx's noise words into out (len(idx), words * 2 uint32), read off
        the stream without drawing what precedes each image."""
        local = self._bits
        if local is None:
            local = self._bits = threading.local()
        if not hasattr(local, "pcg"):
            # One generator per thread, moved from image to image by jumps (which
            # wrap around the 2^128 period, so they go back as well as forward).
            local.pcg = np.random.PCG64(0)
            local.pcg.state = {**self.noise_start, "has_uint32": 0, "uinteger": 0}
            local.at = 0                       # 64-bit outputs drawn since the start
        pcg, words, at = local.pcg, self.NOISE_WORDS, local.at
        # Bytes are drawn as 32-bit words, two per 64-bit output, low half first. If
        # the parameters left half an output over, the stream's first word is that
        # half, and image j then starts at the high half of output words * j - 1.
        leftover = self.noise_start["has_uint32"]
        for row, j in zip(out, idx.tolist()):
            if not leftover:
                pcg.advance((words * j - at) % 2**128)
                row[:] = pcg.random_raw(words).view(np.uint32)
                at = words * j + words
            elif j == 0:
                pcg.advance(-at % 2**128)
                row[0] = self.noise_start["uinteger"]
                row[1:] = pcg.random_raw(words).view(np.uint32)[:2 * words - 1]
                at = words
            else:
                pcg.advance((words * j - 1 - at) % 2**128)
                row[:] = pcg.random_raw(words + 1).view(np.uint32)[1:2 * words + 1]
                at = words * j + words
        local.at = at

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        idx = np.asarray(index)
        if idx.ndim != 1:
            raise IndexError("synthetic images are indexed by a 1-d array of indices or a slice")
        if self._shifted is None:
            self._shifted = _all_shifts(self.templates)
        shifted = self._shifted
        dy, dx = self.dy[idx], self.dx[idx]
        img = shifted[self.own[idx], dy, dx] * self.a[idx, None, None, None]
        img += shifted[self.other[idx], dy, dx] * self.b[idx, None, None, None]
        img += self.c[idx, None, None, None]
        noise = np.empty((len(idx), _PIXELS // 4), np.uint32)
        self._noise_into(noise, idx)
        img += noise.view(np.int8).reshape(img.shape) * self.noise_scale
        # Clip to [0, 255] (np.clip, but without its per-call error-state bookkeeping).
        np.minimum(np.maximum(img, 0, out=img), 255, out=img)
        return img.astype(np.uint8)  # truncating cast; c already holds the +0.5


def _load_synthetic(data_dir: str | None, num_train: int | None, num_test: int | None, seed: int) -> ArrayDataset:
    """10-class class-conditional images; ``data_dir`` is ignored."""
    num_train = 10_000 if num_train is None else num_train
    num_test = 1_000 if num_test is None else num_test
    templates = _synthetic_templates(seed)
    train = SyntheticImages(templates, num_train, np.random.default_rng(np.random.SeedSequence([seed, 0])))
    test = SyntheticImages(templates, num_test, np.random.default_rng(np.random.SeedSequence([seed, 1])))
    return ArrayDataset("synthetic", train, train.labels, test, test.labels, _SYNTH.classes,
                        IMAGENET_MEAN, IMAGENET_STD)


# --------------------------------------------------------------------------
# Restricted unpickling of CIFAR batches
# --------------------------------------------------------------------------


def _numpy_global(module: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; resolve directly so that old
    # pickles (numpy.core...) load without touching the deprecated alias.
    for candidate in ("numpy._core." + module, "numpy.core." + module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    entries: dict[tuple[str, str], Callable[[], Any]] = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }
    for prefix in ("numpy.core", "numpy._core"):
        entries[(f"{prefix}.multiarray", "_reconstruct")] = lambda: _numpy_global("multiarray", "_reconstruct")
        # Pickle protocol 5 rebuilds contiguous arrays through _frombuffer.
        entries[(f"{prefix}.numeric", "_frombuffer")] = lambda: _numpy_global("numeric", "_frombuffer")
    return entries


_ALLOWED_GLOBALS = _allowed_globals()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, never call other code."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise DataError(f"refusing to unpickle global {module}.{name} in {self._path}: not a CIFAR batch")
        return factory()


# Everything a malformed pickle stream can raise while being parsed.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    ImportError,
    OverflowError,
    MemoryError,
    RecursionError,
)


def _unpickle_batch(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return _CifarUnpickler(f, path).load()
    except FileNotFoundError:
        raise DataError(f"CIFAR batch file {path} not found; {_DATA_DIR_HINT}") from None
    except OSError as e:
        raise DataError(f"cannot read CIFAR batch file {path}: {e.strerror or e}") from None
    except _PICKLE_ERRORS as e:
        raise DataError(f"CIFAR batch file {path} is truncated or corrupt ({type(e).__name__}: {e}); re-download it") from None


def _field(batch: dict, key: str) -> Any:
    # Python 2 pickles read with encoding="bytes" have bytes keys; pickles
    # written by Python 3 usually have str keys. Accept both.
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 HWC images, int64 labels), validated."""
    batch = _unpickle_batch(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, expected a CIFAR batch dict; re-download it")
    data, labels = _field(batch, "data"), _field(batch, label_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise DataError(f"{path} lacks 'data' or '{label_key}' (has {keys}); is it a {num_classes}-class CIFAR batch?")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is a {desc}, expected uint8 of shape (N, {_PIXELS}); re-download it")
    y = _validated_labels(labels, data.shape[0], num_classes, f"{path}: '{label_key}'")
    # Rows are CHW row-major; the rest of raysage uses HWC.
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def _validated_labels(labels: Any, n: int, num_classes: int, what: str) -> np.ndarray:
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError):
        raise DataError(f"{what} is not a list of integer labels; re-download the dataset") from None
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DataError(f"{what} should be a 1-D list of integers, got {y.dtype} of shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{what} has {y.shape[0]} labels for {n} images; the file is corrupt")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what} has labels in [{y.min()}, {y.max()}], expected 0..{num_classes - 1}; wrong dataset?")
    return y.astype(np.int64)


# --------------------------------------------------------------------------
# .npz files
# --------------------------------------------------------------------------

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npz(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arrays = _read_npz_arrays(path)
    x_train = _validated_images(arrays["x_train"], f"{path}: x_train")
    x_test = _validated_images(arrays["x_test"], f"{path}: x_test")
    y_train = _validated_labels(arrays["y_train"], len(x_train), num_classes, f"{path}: y_train")
    y_test = _validated_labels(arrays["y_test"], len(x_test), num_classes, f"{path}: y_test")
    return x_train, y_train, x_test, y_test


_ZIP_MAGIC = b"PK\x03\x04"


def _read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as f:
            magic = f.read(len(_ZIP_MAGIC))
        # np.load guesses the format from the first bytes and, for anything
        # that is not a zip, complains about pickles; say what is wrong instead.
        if magic != _ZIP_MAGIC and not magic.startswith(b"\x93NUM"):
            raise DataError(f"{path} is not a .npz (zip) archive; re-create it with numpy.savez or re-download it")
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array, expected a .npz archive with {', '.join(_NPZ_KEYS)}")
        with loaded:
            missing = [k for k in _NPZ_KEYS if k not in loaded.files]
            if missing:
                raise DataError(f"{path} lacks arrays {missing} (has {loaded.files}); expected {', '.join(_NPZ_KEYS)}")
            # NpzFile is lazy: decompress inside the try so corrupt members are caught here.
            return {k: loaded[k] for k in _NPZ_KEYS}
    except FileNotFoundError:
        raise DataError(f"dataset file {path} not found; {_DATA_DIR_HINT}") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path} is a truncated or corrupt .npz archive ({type(e).__name__}: {e}); re-create or re-download it") from None


def _validated_images(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{what} is {x.dtype} of shape {x.shape}, expected uint8 of shape (N, 32, 32, 3) HWC")
    return np.ascontiguousarray(x)


# --------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    name: str
    num_classes: int
    batches_dir: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str


_CIFAR10 = _CifarLayout(
    "cifar10", 10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels"
)
_CIFAR100 = _CifarLayout("cifar100", 100, "cifar-100-python", ("train",), "test", "fine_labels")


def _find_npz(directory: Path, name: str) -> Path | None:
    """The one .npz in ``directory`` named for this dataset, if any.

    ``cifar10.npz`` or ``cifar10_subset.npz`` match ``cifar10``;
    ``cifar100_subset.npz`` does not.
    """
    matches = sorted(
        p
        for p in directory.glob("*.npz")
        if p.stem == name or any(p.stem.startswith(name + sep) for sep in ("_", "-", "."))
    )
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"{directory} holds several {name} files ({names}); pass --data-dir pointing at one of them")
    return matches[0] if matches else None


def _resolve_cifar_source(layout: _CifarLayout, data_dir: str | None) -> Path:
    """Return a .npz file or a directory holding the pickled batches."""
    if data_dir is None:
        raise DataError(f"dataset {layout.name} needs a data directory; {_DATA_DIR_HINT}")
    root = Path(data_dir).expanduser()
    if root.is_file():
        if root.suffix != ".npz":
            raise DataError(f"{root} is a file but not a .npz; {_DATA_DIR_HINT}")
        return root
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; {_DATA_DIR_HINT}")
    if (root / layout.batches_dir).is_dir():
        return root / layout.batches_dir
    if (root / layout.test_file).is_file():
        return root  # the batches directory itself
    npz = _find_npz(root, layout.name)
    if npz is not None:
        return npz
    raise DataError(f"no {layout.name} data in {root} (looked for {layout.batches_dir}/ and {layout.name}*.npz); {_DATA_DIR_HINT}")


def _load_cifar(layout: _CifarLayout, data_dir: str | None) -> ArrayDataset:
    source = _resolve_cifar_source(layout, data_dir)
    if source.is_file():
        x_train, y_train, x_test, y_test = _read_npz(source, layout.num_classes)
    else:
        parts = [_read_cifar_batch(source / f, layout.label_key, layout.num_classes) for f in layout.train_files]
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
        x_test, y_test = _read_cifar_batch(source / layout.test_file, layout.label_key, layout.num_classes)
    return ArrayDataset(layout.name, x_train, y_train, x_test, y_test, layout.num_classes, IMAGENET_MEAN, IMAGENET_STD)


def _cifar_loader(layout: _CifarLayout) -> Callable[..., ArrayDataset]:
    def load(data_dir: str | None, num_train: int | None, num_test: int | None, seed: int) -> ArrayDataset:
        # seed is unused: a real dataset's first N images are always the same.
        return _truncate(_load_cifar(layout, data_dir), num_train, num_test)

    load.__doc__ = f"{layout.name} from pickled batches or a .npz; takes the first num_train/num_test images."
    return load


def _truncate(ds: ArrayDataset, num_train: int | None, num_test: int | None) -> ArrayDataset:
    def take(x: np.ndarray, y: np.ndarray, n: int | None, split: str, flag: str) -> tuple[np.ndarray, np.ndarray]:
        if n is None:
            return x, y
        if n > len(x):
            raise DataError(f"{ds.name} has {len(x)} {split} images, cannot take {n}; lower {flag}")
        return x[:n], y[:n]

    # The engine asks for clients * samples_per_client training images.
    x_train, y_train = take(ds.x_train, ds.y_train, num_train, "training", "--samples-per-client or --clients")
    x_test, y_test = take(ds.x_test, ds.y_test, num_test, "test", "--test-samples")
    return ArrayDataset(ds.name, x_train, y_train, x_test, y_test, ds.num_classes, ds.mean, ds.std)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------

Loader = Callable[[str | None, int | None, int | None, int], ArrayDataset]

DATASETS: dict[str, Loader] = {
    "synthetic": _load_synthetic,
    "cifar10": _cifar_loader(_CIFAR10),
    "cifar100": _cifar_loader(_CIFAR100),
}


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load dataset ``name``; ``num_train``/``num_test`` cap the split sizes.

    For CIFAR the first ``num_train``/``num_test`` images are kept; for
    ``synthetic`` they set how many are generated (``seed`` picks them).
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for what, value in (("num_train", num_train), ("num_test", num_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DataError(f"{what} must be a positive integer, got {value!r}")
    with out_of_memory_is_an_error(name, num_train, num_test):
        data = loader(data_dir, num_train, num_test, seed)
    check_splits(data, data_dir)
    return data


def check_splits(data: ArrayDataset, source: str | None) -> None:
    """Refuse a dataset that cannot train or be evaluated before anything runs: every
    round ends with an evaluation, which divides by the test samples."""
    where = f" in {source}" if source else ""
    for split, x in (("training", data.x_train), ("test", data.x_test)):
        if len(x) == 0:
            raise DataError(f"dataset {data.name}{where} has an empty {split} split (0 samples); "
                            f"give data with at least one {split} sample")


@contextmanager
def out_of_memory_is_an_error(name: str, num_train: int | None, num_test: int | None) -> Iterator[None]:
    """A dataset too large for this machine: one line naming what to lower, not a traceback."""
    sizes = ", ".join(f"{n:,} {what}" for n, what in ((num_train, "training"), (num_test, "test")) if n)
    asked = f" ({sizes} samples)" if sizes else ""
    hint = "lower --clients, --samples-per-client or --test-samples"
    try:
        yield
    except MemoryError as exc:
        raise DataError(f"not enough memory for dataset {name}{asked}: {exc or 'MemoryError'}; {hint}") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG):
            raise
        raise DataError(f"cannot hold dataset {name}{asked}: {exc.strerror or exc}; {hint}") from None

