"""Harness workloads, data readers and metrics: every workload builds and trains a few steps."""
import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch

from adamkit.bench import data, functions, workloads
from adamkit.bench.errors import DataNotFoundError, UsageError
from adamkit.bench.metrics import classification_metrics
from adamkit.bench.runner import TrainConfig, run_training


# ---- tiny data sets in the real on-disk formats ----------------------------------------------

def write_idx(path, array, compress=False):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_fake_mnist(folder, n_train=64, n_test=32, compress=True):
    rng = np.random.RandomState(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", rng.randint(0, 256, (n_train, 28, 28)), compress)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(n_train) % 10, compress)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.randint(0, 256, (n_test, 28, 28)), compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, compress)


def make_fake_cifar(folder, per_batch=20):
    rng = np.random.RandomState(1)
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": list(rng.randint(0, 10, per_batch)),
                 b"data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
                 b"filenames": [b"x.png"] * per_batch}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", images)
    write_idx(tmp_path / "b-idx3-ubyte", images, compress=True)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a-idx3-ubyte"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UsageError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(UsageError, match="truncated"):
        data.read_idx(tmp_path / "short")


def test_mnist_loader_finds_files_in_subfolder(tmp_path):
    make_fake_mnist(tmp_path / "MNIST" / "raw", compress=False)
    split = data.load_mnist(tmp_path)
    assert split.train_x.shape == (64, 784) and split.train_x.dtype == np.uint8
    assert split.val_x.shape == (32, 784)
    np.testing.assert_array_equal(split.train_y, np.arange(64) % 10)


def test_cifar_loader_reads_python_batches(tmp_path):
    make_fake_cifar(tmp_path)
    split = data.load_cifar10(tmp_path)
    assert split.train_x.shape == (100, 3, 32, 32) and split.val_x.shape == (20, 3, 32, 32)
    assert split.train_y.dtype == np.int64 and split.num_classes == 10


def test_missing_data_message_names_files_folder_and_how_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        data.load_mnist(tmp_path, "logreg-mnist")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path) in message and "--download" in message and "http" in message
    with pytest.raises(DataNotFoundError) as info:
        workloads.get("resnet18-cifar10").check_data(str(tmp_path))
    assert "data_batch_1" in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)


def test_mnist1d_is_deterministic_balanced_and_learnable_shape():
    a, b = data.make_mnist1d(), data.make_mnist1d()
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert a.train_x.shape == (4000, 40) and a.val_x.shape == (1000, 40)
    counts = np.bincount(np.concatenate([a.train_y, a.val_y]), minlength=10)
    assert counts.min() == counts.max() == 500
    other = data.make_mnist1d(seed=1)
    assert not np.array_equal(other.train_x, a.train_x)


def test_digits_split_is_fixed_and_disjoint():
    split = data.load_digits_split()
    assert len(split.train_y) + len(split.val_y) == 1797
    assert 350 <= len(split.val_y) <= 370
    assert split.train_x.max() <= 1.0


def test_stdlib_corpus_is_python_source():
    text = data.stdlib_corpus(max_chars=50_000)
    assert len(text) == 50_000 and "def " in text and "import " in text


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
    rng = np.random.RandomState(0)
    y = rng.randint(0, 5, 200)
    p = np.where(rng.rand(200) < 0.6, y, rng.randint(0, 5, 200))
    p[p == 4] = 3  # class 4 is never predicted: precision 0 for it
    ours = classification_metrics(p, y, 10)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert ours["precision"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    assert ours["recall"] == pytest.approx(recall_score(y, p, average="macro", zero_division=0))
    assert ours["f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_reddi_problem_definition():
    assert functions.reddi_coefficient(1) == 1010 and functions.reddi_coefficient(102) == 1010
    assert functions.reddi_coefficient(2) == -10 and functions.reddi_coefficient(101) == -10
    assert functions.reddi_expected_regret(-1.0) == 0
    assert functions.reddi_expected_regret(1.0) == pytest.approx(20 / 101)
    task = workloads.get("reddi").build(workloads.BuildContext())
    loss = task.loss(0)  # t = 1: the large gradient, at x = 0
    loss.backward()
    assert task.model.x.grad.item() == 1010
    with torch.no_grad():
        task.model.x.fill_(5.0)
    task.after_step(0)
    assert task.model.x.item() == 1.0  # projected onto [-1, 1]
    assert task.evaluate()["average_regret"] == pytest.approx(1010.0)  # 1010 * (0 - (-1)) over one step


def test_two_d_functions_have_their_minimum_where_documented():
    for spec in functions.FUNCTIONS_2D.values():
        assert float(spec.fn(torch.tensor(spec.minimum, dtype=torch.float64))) == pytest.approx(0, abs=1e-12)
        assert float(spec.fn(torch.tensor(spec.start, dtype=torch.float64))) > 0.1


OFFLINE = [name for name, w in workloads.WORKLOADS.items() if w.data is None]
PAPER = [name for name, w in workloads.WORKLOADS.items() if w.data is not None]


def _few_steps(name, tmp_path, **extra):
    config = TrainConfig(workload=name, optimizer="adam", steps=3, quiet=True, eval_every=3, **extra)
    if workloads.get(name).kind == "model":
        config.batch_size = 8
    return run_training(config)


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_workload_builds_and_trains(name, tmp_path):
    summary = _few_steps(name, tmp_path)
    assert summary["steps"] == 3 and not summary["diverged"]
    assert math.isfinite(summary["final"]["loss"])
    assert [h["step"] for h in summary["history"]] == [0, 3]
    if workloads.get(name).report_metrics and "accuracy" in workloads.get(name).report_metrics:
        assert 0.0 <= summary["final"]["accuracy"] <= 1.0


@pytest.mark.parametrize("name", PAPER)
def test_paper_workload_builds_and_trains_on_files_in_the_real_format(name, tmp_path):
    if workloads.get(name).data == "mnist":
        make_fake_mnist(tmp_path / "mnist")
    else:
        make_fake_cifar(tmp_path, per_batch=8)
    summary = _few_steps(name, tmp_path, data_dir=str(tmp_path))
    assert summary["steps"] == 3 and math.isfinite(summary["final"]["loss"])
    assert set(summary["final"]) >= {"loss", "accuracy", "precision", "recall", "f1"}


def test_charlm_trains_on_a_user_text_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    summary = _few_steps("charlm", tmp_path, data_file=str(corpus))
    assert summary["final"]["bits_per_char"] == pytest.approx(summary["final"]["loss"] / math.log(2))
    assert summary["final"]["bits_per_char"] < math.log2(len(set(corpus.read_text()))) + 1


def test_unknown_workload_lists_valid_names():
    with pytest.raises(UsageError) as info:
        workloads.get("nope")
    assert "rosenbrock" in str(info.value) and "resnet18-cifar10" in str(info.value)
