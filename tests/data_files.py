"""Tiny data files in the real formats (IDX, the CIFAR-10 pickle archive), written by
hand, for the tests of the loaders and of the examples."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
  """Serialise a uint8 array in IDX format."""
  header = bytes([0, 0, 0x08, array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, data: bytes, compress: bool) -> Path:
  if compress:
    path = path.with_name(path.name + ".gz")
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return path


def write_split(
  directory: Path, split: str, n: int, *, compress: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
  prefix = {"train": "train", "test": "t10k"}[split]
  write_file(directory / f"{prefix}-images-idx3-ubyte", idx_bytes(images), compress)
  write_file(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), compress)
  return images, labels


def cifar_batch(n: int, seed: int) -> dict[bytes, object]:
  """A batch in the official format: uint8 data (n, 3072) and a list of int labels."""
  rng = np.random.default_rng(seed)
  return {
    b"batch_label": f"batch {seed}".encode(),
    b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
    b"labels": [int(x) for x in rng.integers(0, 10, size=n)],
    b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
  }


def write_cifar_tar(path: Path, batches: dict[str, dict[bytes, object]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for name, batch in batches.items():
      data = pickle.dumps(batch, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
