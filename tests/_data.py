"""Small datasets in the standard file formats, written by the tests (no download, no install)."""

import gzip
import struct

import numpy as np


def write_idx(path, array) -> None:
    """Write ``array`` (uint8) as a gzipped idx file, the format of MNIST and Fashion-MNIST."""
    array = np.asarray(array, np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_idx_dataset(root, n_train: int = 64, n_test: int = 32) -> str:
    """A directory with the four MNIST-style idx files of random 28x28 images and labels."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return str(root)


def class_pattern_images(labels, size: int = 28, channels: int = 0, seed: int = 0) -> np.ndarray:
    """uint8 images in which the class is visible: noise (0..80) plus a bright 6x6 square at one of ten
    class-specific places (and, for colour images, a class-specific colour). A model that has learnt
    anything separates them; an untrained one scores chance (1/10)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    shape = (len(labels), size, size) + ((channels,) if channels else ())
    images = rng.integers(0, 80, shape)
    step = (size - 6) // 4
    for k, c in enumerate(labels):
        r, col = (int(c) // 5) * (size // 2) + 3, (int(c) % 5) * step
        colour = ([255, 255 * (c % 2), 255 * (c % 3 == 0)][:channels] if channels else 255)
        images[k, r:r + 6, col:col + 6] = colour
    return images.astype(np.uint8)


def write_learnable_idx_dataset(root, n_train: int = 512, n_test: int = 200) -> str:
    """Like :func:`write_idx_dataset`, with :func:`class_pattern_images` (a learnable task)."""
    rng = np.random.default_rng(0)
    for k, (prefix, n) in enumerate((("train", n_train), ("t10k", n_test))):
        labels = rng.integers(0, 10, n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", class_pattern_images(labels, seed=k))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(root)


def write_learnable_cifar(root, n_per_batch: int = 100, n_test: int = 200) -> str:
    """CIFAR-10's python pickle format (``data_batch_1..5``, ``test_batch``; rows of 3072 bytes, channel
    first) holding :func:`class_pattern_images` in colour."""
    import pickle

    rng = np.random.default_rng(1)
    for k, (name, n) in enumerate([(f"data_batch_{i}", n_per_batch) for i in range(1, 6)]
                                  + [("test_batch", n_test)]):
        labels = rng.integers(0, 10, n)
        images = class_pattern_images(labels, size=32, channels=3, seed=10 + k)
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
                 b"labels": [int(c) for c in labels]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return str(root)
