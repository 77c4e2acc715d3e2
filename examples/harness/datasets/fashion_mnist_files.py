"""Fashion-MNIST's IDX files: looked up (``data_dir``, ``$EVA_OPTAX_DATA``, the Debian package's
directory, the cache), downloaded into the cache when missing, and read
(:func:`read_idx`, :func:`fashion_mnist`). See :mod:`examples.harness.datasets`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

ENV_VAR = "EVA_OPTAX_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 10.0

Split = Literal["train", "test"]

_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_EXPECTED_COUNT: dict[str, int] = {"train": 60000, "test": 10000}
_IMAGE_SHAPE = (28, 28)

# IDX magic: two zero bytes, the data type code (0x08 = unsigned byte), the number of dims.
_MAGIC_IMAGES = 0x00000803
_MAGIC_LABELS = 0x00000801


def cache_dir() -> Path:
  """The per-user cache directory for downloaded Fashion-MNIST files."""
  return Path.home() / ".cache" / "eva_optax" / "fashion-mnist"


def _file_stems(split: Split) -> tuple[str, str]:
  """Base names (without ``.gz``) of the image and label files of ``split``."""
  if split not in _PREFIX:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  prefix = _PREFIX[split]
  return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
  """The directories searched, in order (explicit argument, env var, system, cache)."""
  return search_roots(data_dir, ENV_VAR, SYSTEM_DIR, cache_dir())


def search_roots(
  data_dir: str | os.PathLike[str] | None, env_var: str, *defaults: Path
) -> list[Path]:
  """``data_dir``, then ``$env_var`` (each when set), then ``defaults``, in that order."""
  roots: list[Path] = []
  if data_dir is not None:
    roots.append(Path(data_dir).expanduser())
  env = os.environ.get(env_var)
  if env:
    roots.append(Path(env).expanduser())
  roots.extend(defaults)
  return roots


def _locate(directory: Path, stem: str) -> Path | None:
  """The path of ``stem`` (raw) or ``stem.gz`` in ``directory``, if either exists."""
  for name in (stem, stem + ".gz"):
    path = directory / name
    if path.is_file():
      return path
  return None


def _find_in(directory: Path, split: Split) -> tuple[Path, Path] | None:
  """Image and label paths of ``split`` in ``directory``, or None if one is missing."""
  images_stem, labels_stem = _file_stems(split)
  images = _locate(directory, images_stem)
  labels = _locate(directory, labels_stem)
  if images is None or labels is None:
    return None
  return images, labels


def _download(directory: Path, split: Split, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
  """Download the gzip files of ``split`` into ``directory`` (atomically per file).

  Raises:
    OSError: on any network or file-system failure.
  """
  directory.mkdir(parents=True, exist_ok=True)
  for stem in _file_stems(split):
    target = directory / (stem + ".gz")
    if target.is_file():
      continue
    with urllib.request.urlopen(BASE_URL + stem + ".gz", timeout=timeout) as response:
      with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
        shutil.copyfileobj(response, tmp)
    os.replace(tmp.name, target)


def _not_found_message(split: Split, searched: Sequence[Path], download_error: str) -> str:
  images_stem, labels_stem = _file_stems(split)
  where = "\n".join(f"  - {d}" for d in searched)
  return (
    f"Fashion-MNIST ({split} split: {images_stem}[.gz], {labels_stem}[.gz]) not found.\n"
    f"Searched:\n{where}\n"
    f"Download from {BASE_URL} failed: {download_error}\n"
    f"To provide the data, either\n"
    f"  - install the Debian package: apt-get install {DEBIAN_PACKAGE}\n"
    f"    (files under {SYSTEM_DIR}), or\n"
    f"  - put the IDX files in a directory and set {ENV_VAR}=/that/directory,\n"
    f"    or pass data_dir=... (--data-dir in the examples)."
  )


def find_fashion_mnist(
  split: Split = "train",
  data_dir: str | os.PathLike[str] | None = None,
  *,
  download: bool = True,
) -> tuple[Path, Path]:
  """Return the (images, labels) file paths of ``split``, downloading if needed.

  Raises:
    FileNotFoundError: the files are nowhere and could not be downloaded.
  """
  searched = _candidate_dirs(data_dir)
  for directory in searched:
    found = _find_in(directory, split)
    if found is not None:
      return found
  error = "download disabled"
  if download:
    try:
      _download(cache_dir(), split)
    except Exception as exc:  # any network/file-system failure: report, don't crash
      error = f"{type(exc).__name__}: {exc}"
    else:
      found = _find_in(cache_dir(), split)
      if found is not None:
        return found
      error = "files missing after download"
  raise FileNotFoundError(_not_found_message(split, searched, error))


def _read_bytes(path: Path) -> bytes:
  """The content of ``path``, decompressed when it is gzip (by magic, not by name)."""
  with open(path, "rb") as f:
    head = f.read(2)
  opener = gzip.open if head == b"\x1f\x8b" else open
  try:
    with opener(path, "rb") as f:
      return f.read()
  except (OSError, EOFError) as exc:
    raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
  """Read an unsigned-byte IDX file (gzip or raw) into a uint8 array.

  Args:
    path: the file.
    expected_magic: if given, the required magic number (0x801 labels, 0x803 images).

  Raises:
    ValueError: bad magic number, unsupported data type, or a size that does not match the
      header. The message names the file.
  """
  path = Path(path)
  data = _read_bytes(path)
  if len(data) < 4:
    raise ValueError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
  magic = int.from_bytes(data[:4], "big")
  if expected_magic is not None and magic != expected_magic:
    raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
  if data[0:2] != b"\x00\x00" or data[2] != 0x08:
    raise ValueError(
      f"{path}: bad IDX magic number 0x{magic:08x} (only unsigned-byte IDX files, "
      "0x000008NN, are supported)"
    )
  ndim = data[3]
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  expected_size = int(np.prod(shape, dtype=np.int64))
  body = data[header_len:]
  if len(body) != expected_size:
    raise ValueError(
      f"{path}: IDX header announces shape {shape} ({expected_size} bytes) "
      f"but the file holds {len(body)} bytes of data"
    )
  return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Read and cross-check an images/labels file pair."""
  images = read_idx(images_path, _MAGIC_IMAGES)
  labels = read_idx(labels_path, _MAGIC_LABELS)
  if images.shape[1:] != _IMAGE_SHAPE:
    raise ValueError(
      f"{images_path}: images have shape {images.shape[1:]}, expected {_IMAGE_SHAPE}"
    )
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
      f"{labels.shape[0]} labels"
    )
  return images, labels


def fashion_mnist(
  split: Split = "train",
  data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Load a Fashion-MNIST split.

  Args:
    split: ``'train'`` (60000 samples) or ``'test'`` (10000 samples).
    data_dir: a directory to look in first (see the module docstring for the search order).

  Returns:
    ``(images, labels)``: uint8 arrays of shapes (N, 28, 28) and (N,).

  Raises:
    FileNotFoundError: the data is not available (the message says how to provide it).
    ValueError: a file is not a valid IDX file of the expected kind.
  """
  images_path, labels_path = find_fashion_mnist(split, data_dir)
  return _load_pair(images_path, labels_path)
