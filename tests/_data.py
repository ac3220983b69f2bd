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
