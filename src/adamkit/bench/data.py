"""Data for the workloads: offline sets, readers for MNIST IDX and CIFAR-10 python batches, downloads.

Offline, always available:
  digits     scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn)
  MNIST-1D   generated here (see ``make_mnist1d``)
  stdlib     the Python standard library's own source files, as a character corpus

Provided by the user (``--data-dir``), or downloaded when asked (``--download``) and online:
  MNIST      the four IDX files, optionally gzipped
  CIFAR-10   the python batches (``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``)

Every split is deterministic: held-out sets never depend on the training seed, so runs with
different seeds are scored on the same examples.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
import sysconfig
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataNotFoundError, UsageError

DEFAULT_DATA_DIR = os.environ.get("ADAMKIT_DATA_DIR", os.path.join("~", ".cache", "adamkit", "data"))


@dataclass
class ArraySplit:
    """Train and held-out arrays of one classification data set (inputs keep their stored dtype)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int


# --------------------------------------------------------------------------------------------
# Offline data sets
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def load_digits_split(val_fraction: float = 0.2) -> ArraySplit:
    """scikit-learn's digits, pixels scaled to [0, 1], a fixed stratified 80/20 split (cached; do not modify)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    rng = np.random.RandomState(0)
    val_index = []
    for label in range(10):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        val_index.extend(members[: int(round(len(members) * val_fraction))])
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[np.asarray(val_index)] = True
    return ArraySplit(x[~val_mask], y[~val_mask], x[val_mask], y[val_mask], 10)


# Ten hand-drawn 12-point templates, one per class. They play the role of MNIST-1D's digit-like
# templates (Greydanus 2020), but they are this project's own shapes.
_MNIST1D_TEMPLATES = np.array([
    [0.0, 0.6, 1.0, 1.0, 0.6, 0.0, 0.0, -0.6, -1.0, -1.0, -0.6, 0.0],   # one full wave
    [0.0, 0.0, 0.0, 0.0, 0.2, 1.0, 1.0, 0.2, 0.0, 0.0, 0.0, 0.0],       # narrow spike
    [-0.8, -0.8, -0.8, -0.8, -0.8, -0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], # step up
    [0.0, 0.8, 1.0, 0.8, 0.0, -0.2, -0.2, 0.0, 0.8, 1.0, 0.8, 0.0],     # two bumps
    [-1.0, -0.6, -0.2, 0.2, 0.6, 1.0, -1.0, -0.6, -0.2, 0.2, 0.6, 1.0], # sawtooth
    [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, -0.8, -0.8, -0.8, -0.8, -0.8, -0.8], # step down
    [1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0], # square wave
    [0.0, -0.3, -0.8, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -0.8, -0.3, 0.0], # wide dip
    [-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0],  # ramp
    [1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],      # early wiggle
], dtype=np.float64)


@functools.lru_cache(maxsize=4)
def make_mnist1d(n_train: int = 4000, n_val: int = 1000, length: int = 40, seed: int = 0) -> ArraySplit:
    """A locally generated MNIST-1D-style data set: 10 classes of 1-D signals of ``length`` samples.

    Following the idea of MNIST-1D (Greydanus 2020), not its exact generator: each example takes its
    class's 12-point template, stretches it to a random width of 14 to 26 samples by linear
    interpolation, scales it by a random factor in [0.7, 1.3], places it at a random offset in a
    zero signal of ``length`` samples, adds a random linear trend (shear), smooth correlated noise
    and white noise. Classes are balanced; the data depend only on ``seed`` (cached; do not modify).
    """
    rng = np.random.RandomState(seed)
    total = n_train + n_val
    labels = np.arange(total) % 10
    rng.shuffle(labels)
    signals = np.zeros((total, length), dtype=np.float64)
    positions = np.arange(length, dtype=np.float64)
    kernel = np.exp(-0.5 * (np.arange(-4, 5) / 2.0) ** 2)
    kernel /= kernel.sum()
    for i, label in enumerate(labels):
        width = rng.randint(14, 27)
        template = _MNIST1D_TEMPLATES[label]
        stretched = np.interp(np.linspace(0, len(template) - 1, width), np.arange(len(template)), template)
        stretched *= rng.uniform(0.7, 1.3)
        offset = rng.randint(0, length - width + 1)
        signals[i, offset:offset + width] = stretched
        signals[i] += rng.uniform(-0.6, 0.6) * (positions / length - 0.5)
        signals[i] += 0.5 * np.convolve(rng.randn(length + 8), kernel, mode="valid")
        signals[i] += 0.1 * rng.randn(length)
    signals = signals.astype(np.float32)
    labels = labels.astype(np.int64)
    return ArraySplit(signals[:n_train], labels[:n_train], signals[n_train:], labels[n_train:], 10)


@functools.lru_cache(maxsize=2)
def make_bag_of_words(vocab: int = 10000, n_train: int = 6000, n_val: int = 2000, length: int = 20,
                      num_classes: int = 4, seed: int = 0) -> ArraySplit:
    """Bags of ``length`` token ids drawn from a Zipf(1) distribution over ``vocab`` tokens, 4 classes.

    Every token has a hidden score per class (standard normal); an example's class is the argmax of
    its tokens' summed scores plus Gaussian noise (standard deviation 2), each class's column
    centred on its median so that the classes are about balanced. Most tokens are rare, so a
    mini-batch touches few rows of an embedding table: the setting of sparse-gradient optimizers.
    Inputs are int64 token ids of shape (n, length); the data depend only on ``seed`` (cached).
    """
    rng = np.random.RandomState(seed)
    frequency = 1.0 / np.arange(1, vocab + 1)
    tokens = rng.choice(vocab, size=(n_train + n_val, length), p=frequency / frequency.sum())
    scores = rng.randn(vocab, num_classes)
    logits = scores[tokens].sum(axis=1) + 2.0 * rng.randn(n_train + n_val, num_classes)
    logits -= np.median(logits, axis=0)  # the frequent tokens' scores would otherwise pick one class
    labels = logits.argmax(axis=1).astype(np.int64)
    tokens = tokens.astype(np.int64)
    return ArraySplit(tokens[:n_train], labels[:n_train], tokens[n_train:], labels[n_train:], num_classes)


@functools.lru_cache(maxsize=2)
def stdlib_corpus(max_chars: int = 1_000_000) -> str:
    """The Python standard library's top-level ``*.py`` files, in name order, up to ``max_chars``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise UsageError(f"no Python source files found in {stdlib}; give a text corpus with --data FILE")
    parts, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def read_text_corpus(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """A user text file for ``charlm --data FILE`` (UTF-8; undecodable bytes become U+FFFD)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise UsageError(f"cannot read --data file {path}: {error.strerror or error}") from None
    if max_chars is not None:
        text = text[:max_chars]
    if len(text) < 200:
        raise UsageError(f"--data file {path} has {len(text)} characters; charlm needs at least 200")
    return text


# --------------------------------------------------------------------------------------------
# MNIST (IDX files)
# --------------------------------------------------------------------------------------------

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "val_x": "t10k-images-idx3-ubyte",
    "val_y": "t10k-labels-idx1-ubyte",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not: magic 0 0 <dtype> <ndim>, big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UsageError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UsageError(f"{path} is truncated or corrupt: {len(raw) - header} data bytes, expected {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _mnist_search_dirs(data_dir: Path) -> list[Path]:
    return [data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"]


def find_mnist(data_dir: str | os.PathLike) -> dict[str, Path] | None:
    """Paths of the four MNIST files under ``data_dir`` (or its ``mnist/`` or ``MNIST/raw/``), or None."""
    data_dir = Path(data_dir).expanduser()
    for folder in _mnist_search_dirs(data_dir):
        found = {}
        for key, name in MNIST_FILES.items():
            for candidate in (folder / name, folder / (name + ".gz")):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def mnist_missing_message(data_dir: str | os.PathLike, workload: str) -> str:
    names = ", ".join(name + "[.gz]" for name in MNIST_FILES.values())
    return (
        f"workload {workload!r} needs the MNIST IDX files {names} in {Path(data_dir).expanduser()} "
        f"(or its mnist/ or MNIST/raw/ subfolder). Download them from {MNIST_MIRRORS[0]} "
        f"(or http://yann.lecun.com/exdb/mnist/) into that folder, point --data-dir at a folder that "
        f"has them, or rerun with --download on a machine that is online."
    )


def load_mnist(data_dir: str | os.PathLike, workload: str = "mnist", download: bool = False) -> ArraySplit:
    """MNIST as uint8 images (N, 784) and int64 labels; the held-out split is the official test set."""
    files = find_mnist(data_dir)
    if files is None and download:
        download_mnist(data_dir)
        files = find_mnist(data_dir)
    if files is None:
        raise DataNotFoundError(mnist_missing_message(data_dir, workload))
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "val"):
        x, y = arrays[split + "_x"], arrays[split + "_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UsageError(f"MNIST files in {files[split + '_x'].parent} have inconsistent shapes {x.shape} / {y.shape}")
    return ArraySplit(
        arrays["train_x"].reshape(len(arrays["train_x"]), -1).astype(np.uint8),
        arrays["train_y"].astype(np.int64),
        arrays["val_x"].reshape(len(arrays["val_x"]), -1).astype(np.uint8),
        arrays["val_y"].astype(np.int64),
        10,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)
# --------------------------------------------------------------------------------------------

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def find_cifar10(data_dir: str | os.PathLike) -> Path | None:
    """The folder holding CIFAR-10's python batches: ``data_dir/cifar-10-batches-py`` or ``data_dir``."""
    data_dir = Path(data_dir).expanduser()
    for folder in (data_dir / "cifar-10-batches-py", data_dir):
        if all((folder / name).is_file() for name in CIFAR10_TRAIN + (CIFAR10_TEST,)):
            return folder
    return None


def cifar10_missing_message(data_dir: str | os.PathLike, workload: str) -> str:
    names = ", ".join(CIFAR10_TRAIN + (CIFAR10_TEST,))
    return (
        f"workload {workload!r} needs CIFAR-10's python batches {names} in "
        f"{Path(data_dir).expanduser() / 'cifar-10-batches-py'} (or directly in that folder). "
        f"Download and unpack {CIFAR10_URL} there, point --data-dir at a folder that has them, "
        f"or rerun with --download on a machine that is online."
    )


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: uint8 images (N, 3, 32, 32) and int64 labels."""
    with open(path, "rb") as handle:
        try:
            batch = pickle.load(handle, encoding="bytes")
        except Exception as error:  # a corrupt pickle raises many kinds of errors
            raise UsageError(f"{path} is not a CIFAR-10 python batch: {error}") from None
    if not isinstance(batch, dict):
        raise UsageError(f"{path} is not a CIFAR-10 python batch (not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise UsageError(f"{path} is not a CIFAR-10 python batch (no data/labels keys)")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UsageError(f"{path} has shape {data.shape} and {len(labels)} labels; expected (N, 3072) and N")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(data_dir: str | os.PathLike, workload: str = "cifar10", download: bool = False) -> ArraySplit:
    """CIFAR-10 as uint8 images (N, 3, 32, 32); the held-out split is the official test batch."""
    folder = find_cifar10(data_dir)
    if folder is None and download:
        download_cifar10(data_dir)
        folder = find_cifar10(data_dir)
    if folder is None:
        raise DataNotFoundError(cifar10_missing_message(data_dir, workload))
    parts = [read_cifar_batch(folder / name) for name in CIFAR10_TRAIN]
    test_x, test_y = read_cifar_batch(folder / CIFAR10_TEST)
    return ArraySplit(
        np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), test_x, test_y, 10
    )


# --------------------------------------------------------------------------------------------
# Downloads (only with --download; never attempted by tests)
# --------------------------------------------------------------------------------------------

def _fetch(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` through a temporary file in the same folder."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix="." + destination.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        os.chmod(temporary, 0o644)
        os.replace(temporary, destination)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def download_mnist(data_dir: str | os.PathLike) -> None:
    """Fetch the four gzipped MNIST IDX files into ``data_dir/mnist/``."""
    folder = Path(data_dir).expanduser() / "mnist"
    for name in MNIST_FILES.values():
        target = folder / (name + ".gz")
        if target.is_file():
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                _fetch(mirror + name + ".gz", target)
                break
            except OSError as error:
                errors.append(f"{mirror}: {error}")
        else:
            raise UsageError(f"could not download {name}.gz: " + "; ".join(errors))


def download_cifar10(data_dir: str | os.PathLike) -> None:
    """Fetch CIFAR-10's python archive into ``data_dir`` and unpack ``cifar-10-batches-py/``."""
    folder = Path(data_dir).expanduser()
    archive = folder / "cifar-10-python.tar.gz"
    try:
        if not archive.is_file():
            _fetch(CIFAR10_URL, archive)
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
            tar.extractall(folder, members=members, filter="data")
    except (OSError, tarfile.TarError) as error:
        raise UsageError(f"could not download CIFAR-10 from {CIFAR10_URL}: {error}") from None
