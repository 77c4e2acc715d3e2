"""CIFAR-10's python pickle archive: looked up (``data_dir``, ``$EVA_OPTAX_CIFAR10``, the cache;
never downloaded), read from the ``.tar.gz`` or its extracted directory
(:func:`cifar10`). See :mod:`examples.harness.datasets`.
"""

from __future__ import annotations

import os
import pickle
import posixpath
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from examples.harness.datasets.fashion_mnist_files import Split, search_roots

CIFAR10_ENV_VAR = "EVA_OPTAX_CIFAR10"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)

_CIFAR10_SIDE = 32
_CIFAR10_ROW = 3 * _CIFAR10_SIDE * _CIFAR10_SIDE  # 3072 bytes: the R, G then B 32x32 planes
_CIFAR10_TEST_BATCH = "test_batch"
_CIFAR10_TRAIN_BATCH = re.compile(r"data_batch_(\d+)")


def cifar10_cache_dir() -> Path:
  """The per-user directory searched last for CIFAR-10 (``~/.cache/eva_optax/cifar10``)."""
  return Path.home() / ".cache" / "eva_optax" / "cifar10"


def _check_split(split: str) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _is_cifar10_batch(name: str, split: Split) -> bool:
  """Whether the file name ``name`` is a batch of ``split``."""
  if split == "test":
    return name == _CIFAR10_TEST_BATCH
  return _CIFAR10_TRAIN_BATCH.fullmatch(name) is not None


def _cifar10_batch_names(names: Iterable[str], split: Split) -> list[str]:
  """The batch names of ``split`` among ``names``, in order (``data_batch_1``, ``_2``, ...).

  Empty when ``split`` is incomplete: no ``test_batch``, or no ``data_batch_*`` at all.
  """
  found = sorted({n for n in names if _is_cifar10_batch(n, split)})
  if split == "train":
    found.sort(key=lambda n: int(n.rsplit("_", 1)[1]))
  return found


def _cifar10_locations(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, bool]]:
  """Every place searched, in order, as ``(path, is_archive)``.

  For each directory (``data_dir``, ``$EVA_OPTAX_CIFAR10``, the cache): its
  ``cifar-10-batches-py/`` subdirectory, the directory itself, then the ``.tar.gz`` in it.
  ``data_dir`` (or the env var) may also name the archive file itself.
  """
  roots = search_roots(data_dir, CIFAR10_ENV_VAR, cifar10_cache_dir())
  locations: list[tuple[Path, bool]] = []
  for root in roots:
    if root.is_file():
      locations.append((root, True))
    else:
      locations.append((root / CIFAR10_SUBDIR, False))
      locations.append((root, False))
      locations.append((root / CIFAR10_ARCHIVE, True))
  return locations


def _cifar10_not_found_message(split: Split, searched: Sequence[Path]) -> str:
  wanted = "test_batch" if split == "test" else "data_batch_1 ... data_batch_5"
  where = "\n".join(f"  - {p}" for p in searched)
  return (
    f"CIFAR-10 ({split} split: {wanted}) not found.\n"
    f"Searched:\n{where}\n"
    f"Nothing is downloaded. Get the python version of the archive,\n"
    f"  {CIFAR10_URL}\n"
    f"and either put {CIFAR10_ARCHIVE} (or its extracted {CIFAR10_SUBDIR}/ directory) in\n"
    f"{cifar10_cache_dir()}, or point at the directory holding it with\n"
    f"--data-dir (data_dir=...) or {CIFAR10_ENV_VAR}=/that/directory."
  )


def find_cifar10(split: Split = "train", data_dir: str | os.PathLike[str] | None = None) -> Path:
  """Return where CIFAR-10's ``split`` lies: an extracted directory or the ``.tar.gz``.

  A directory counts only when it holds the batches of ``split`` (``test_batch``, or at
  least one ``data_batch_*``); an archive counts as soon as the file exists (its members
  are checked when it is read, by :func:`cifar10`).

  Raises:
    FileNotFoundError: nowhere; the message names every searched path and how to get the
      archive.
  """
  _check_split(split)
  searched: list[Path] = []
  for location, is_archive in _cifar10_locations(data_dir):
    searched.append(location)
    if is_archive:
      if location.is_file():
        return location
    elif location.is_dir():
      names = [p.name for p in location.iterdir() if p.is_file()]
      if _cifar10_batch_names(names, split):
        return location
  raise FileNotFoundError(_cifar10_not_found_message(split, searched))


def _unpickle(f: IO[bytes], origin: str) -> object:
  """``pickle.load`` of one batch (bytes keys, as in the official archive); errors name it."""
  try:
    return pickle.load(f, encoding="bytes")
  except Exception as exc:  # a corrupt or foreign file can fail in many ways
    raise ValueError(
      f"{origin}: cannot unpickle a CIFAR-10 batch ({type(exc).__name__}: {exc})"
    ) from exc


def _batch_field(batch: dict[object, object], name: str, origin: str) -> object:
  """``batch[b'name']`` (the official format), or ``batch['name']``."""
  for key in (name.encode(), name):
    if key in batch:
      return batch[key]
  raise ValueError(
    f"{origin}: the batch has no {name.encode()!r} entry (keys: {sorted(map(repr, batch))})"
  )


def _decode_cifar10_batch(batch: object, origin: str) -> tuple[np.ndarray, np.ndarray]:
  """Check one unpickled batch; return uint8 NHWC images and int32 labels.

  A row of ``data`` holds the 1024 red values of the image (row-major, 32x32), then the
  1024 green ones, then the 1024 blue ones, so
  ``images[i, h, w, c] == data[i, c * 1024 + h * 32 + w]``.
  """
  if not isinstance(batch, dict):
    raise ValueError(f"{origin}: expected a pickled dict, got {type(batch).__name__}")
  data = np.asarray(_batch_field(batch, "data", origin))
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR10_ROW:
    raise ValueError(
      f"{origin}: 'data' must be a uint8 array of shape (N, {_CIFAR10_ROW}), "
      f"got {data.dtype} of shape {data.shape}"
    )
  labels = np.asarray(_batch_field(batch, "labels", origin))
  n = data.shape[0]
  if labels.shape != (n,):
    raise ValueError(f"{origin}: {n} images but 'labels' has shape {labels.shape}")
  if n and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{origin}: 'labels' must be integers, got {labels.dtype}")
  bad = (labels < 0) | (labels >= len(CIFAR10_CLASSES)) if n else np.zeros(0, bool)
  if bad.any():
    raise ValueError(
      f"{origin}: labels must lie in 0..{len(CIFAR10_CLASSES) - 1}; "
      f"{int(bad.sum())} do not, e.g. {labels[bad][:5].tolist()} "
      f"(at indices {np.flatnonzero(bad)[:5].tolist()})"
    )
  images = data.reshape(n, 3, _CIFAR10_SIDE, _CIFAR10_SIDE).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def _read_cifar10_directory(directory: Path, split: Split) -> list[tuple[np.ndarray, np.ndarray]]:
  names = _cifar10_batch_names((p.name for p in directory.iterdir() if p.is_file()), split)
  parts = []
  for name in names:
    path = directory / name
    with open(path, "rb") as f:
      parts.append(_decode_cifar10_batch(_unpickle(f, str(path)), str(path)))
  return parts


def _read_cifar10_archive(archive: Path, split: Split) -> list[tuple[np.ndarray, np.ndarray]]:
  """The batches of ``split`` in a tar archive, read in one pass without extracting."""
  found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  try:
    with tarfile.open(archive, "r:*") as tar:
      for member in tar:
        name = posixpath.basename(member.name)
        if not member.isfile() or not _is_cifar10_batch(name, split):
          continue
        if name in found:
          raise ValueError(f"{archive}: holds two members named {name}")
        origin = f"{archive}:{member.name}"
        f = tar.extractfile(member)
        assert f is not None  # a regular file member
        with f:
          found[name] = _decode_cifar10_batch(_unpickle(f, origin), origin)
  except (tarfile.TarError, OSError, EOFError) as exc:
    raise ValueError(
      f"{archive}: cannot read the tar archive ({type(exc).__name__}: {exc})"
    ) from exc
  names = _cifar10_batch_names(found, split)
  if not names:
    wanted = _CIFAR10_TEST_BATCH if split == "test" else "data_batch_* member"
    raise ValueError(f"{archive}: the archive holds no {wanted} ({split} split)")
  return [found[n] for n in names]


def cifar10(
  split: Split = "train",
  data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Load a CIFAR-10 split from the official python archive (never downloaded).

  The data is looked up in ``data_dir``, then in ``$EVA_OPTAX_CIFAR10``, then in
  ``~/.cache/eva_optax/cifar10``; in each, as an extracted ``cifar-10-batches-py/``
  subdirectory, as batch files directly in the directory, or as ``cifar-10-python.tar.gz``
  (read member by member, nothing is extracted to disk). ``data_dir`` may also name the
  archive itself. The training split concatenates every ``data_batch_<k>`` present
  (five in the official archive), in the order of ``k``.

  Security: the batches are Python pickles, and unpickling can run arbitrary code. Only
  load archives you trust (the official one from :data:`CIFAR10_URL`).

  Args:
    split: ``'train'`` (50000 images in the official archive) or ``'test'`` (10000).
    data_dir: a directory (or the archive) to look in first.

  Returns:
    ``(images, labels)``: uint8 images of shape (N, 32, 32, 3) (NHWC, RGB) and int32
    labels of shape (N,) in 0..9 (names in :data:`CIFAR10_CLASSES`).

  Raises:
    FileNotFoundError: the data is nowhere (the message says how to provide it).
    ValueError: a batch or the archive is malformed (the message names the file).
  """
  location = find_cifar10(split, data_dir)
  if location.is_file():
    parts = _read_cifar10_archive(location, split)
  else:
    parts = _read_cifar10_directory(location, split)
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  return np.ascontiguousarray(images), labels
