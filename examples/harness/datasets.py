"""Data for the examples and benchmarks: Fashion-MNIST, CIFAR-10 and a character-level corpus.

Nothing here needs a network except the optional Fashion-MNIST download; every loader
raises :class:`FileNotFoundError` naming the places it searched and how to provide the data.

Fashion-MNIST (IDX files, gzip or raw)
--------------------------------------

The data is looked up, in order, in

1. the ``data_dir`` argument, when given;
2. the directory named by the environment variable ``EVA_OPTAX_DATA``;
3. ``/usr/share/datasets/fashion-mnist`` (the Debian package ``dataset-fashion-mnist``);
4. the cache directory ``~/.cache/eva_optax/fashion-mnist``.

When none of them holds the files, they are downloaded from the official Fashion-MNIST
location into the cache directory (short timeout; this only works where a network exists).
If that fails too, :class:`FileNotFoundError` explains how to provide the data.

Each file may be stored gzip-compressed (``train-images-idx3-ubyte.gz``) or raw
(``train-images-idx3-ubyte``).

CIFAR-10 (the python pickle archive)
------------------------------------
:func:`cifar10` reads the official ``cifar-10-python.tar.gz`` (directly, without extracting
it) or its extracted ``cifar-10-batches-py/`` directory, looked up in the ``data_dir``
argument, then in ``$EVA_OPTAX_CIFAR10``, then in ``~/.cache/eva_optax/cifar10``. It is never
downloaded. The batches are pickles: only load archives you trust.

Character-level text corpus
---------------------------
:func:`text_corpus` reads a text file or a directory of them (``path`` argument, else
``$EVA_OPTAX_CORPUS``), by default the fortune cookies of the Debian package ``fortunes``
(``/usr/share/games/fortunes``). :func:`char_vocabulary`, :func:`encode`, :func:`decode`,
:func:`split_text` and :func:`sequence_batches` turn it into next-character training data.

Command line
------------
From the repository root, ``python -m examples.harness.datasets --check`` prints where
Fashion-MNIST was found and exits with status 1 (and the explanation) when it was not;
``--check-cifar10`` and ``--check-corpus`` do the same for CIFAR-10 and the text corpus.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Literal

import numpy as np

__all__ = [
  "ENV_VAR",
  "SYSTEM_DIR",
  "DEBIAN_PACKAGE",
  "fashion_mnist",
  "find_fashion_mnist",
  "batches",
  "read_idx",
  "CIFAR10_ENV_VAR",
  "CIFAR10_URL",
  "CIFAR10_CLASSES",
  "cifar10",
  "find_cifar10",
  "cifar10_cache_dir",
  "CORPUS_ENV_VAR",
  "FORTUNES_DIR",
  "FORTUNES_PACKAGE",
  "text_corpus",
  "char_vocabulary",
  "encode",
  "decode",
  "split_text",
  "sequence_batches",
  "sequence_batches_per_epoch",
]

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
  return _search_roots(data_dir, ENV_VAR, SYSTEM_DIR, cache_dir())


def _search_roots(
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


def batches(
  arrays: Sequence[np.ndarray],
  batch_size: int,
  *,
  rng: np.random.Generator | None = None,
  drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, ...]]:
  """Yield tuples of aligned minibatches of ``arrays`` (one pass = one epoch).

  Args:
    arrays: arrays with the same leading dimension.
    batch_size: samples per batch.
    rng: when given, the samples are visited in a random order drawn from it.
    drop_last: drop the final incomplete batch (keeps shapes static under ``jit``).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not arrays:
    raise ValueError("batches() needs at least one array")
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
  order = rng.permutation(n) if rng is not None else np.arange(n)
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    yield tuple(a[idx] for a in arrays)


HOLDOUT_SEED = 0


def holdout(
  arrays: Sequence[np.ndarray], fraction: float
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """Split aligned ``arrays`` into ``(train, validation)``: ``round(n * fraction)`` samples,
  drawn once with a fixed generator (``HOLDOUT_SEED``), are the validation split.

  The same samples are held out whatever the run's seed, so that every point of a
  hyperparameter search is scored on the same data; the order within each split is kept.

  Raises:
    ValueError: ``fraction`` not in (0, 1), or a split would be empty.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
  n = len(arrays[0])
  n_validation = int(round(n * fraction))
  if n_validation == 0 or n_validation == n:
    raise ValueError(
      f"a validation fraction of {fraction} of {n} samples leaves an empty "
      f"split ({n - n_validation} train, {n_validation} validation)"
    )
  held = np.zeros(n, dtype=bool)
  held[np.random.default_rng(HOLDOUT_SEED).permutation(n)[:n_validation]] = True
  return tuple(a[~held] for a in arrays), tuple(a[held] for a in arrays)


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle archive)
# --------------------------------------------------------------------------------------------

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
  if split not in _PREFIX:
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
  roots = _search_roots(data_dir, CIFAR10_ENV_VAR, cifar10_cache_dir())
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


# --------------------------------------------------------------------------------------------
# Character-level text corpus
# --------------------------------------------------------------------------------------------

CORPUS_ENV_VAR = "EVA_OPTAX_CORPUS"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_PACKAGE = "fortunes"

# A fortune file separates its entries by lines holding only "%".
_FORTUNE_SEPARATOR = re.compile(r"^%\r?$", re.MULTILINE)
# Companions of a fortune file ``X`` that are not text of their own: the strfile index
# ``X.dat`` and the UTF-8 alias ``X.u8``.
_COMPANION_SUFFIXES = ("dat", "u8")


def _corpus_files(directory: Path) -> list[Path]:
  """The text files of ``directory``, sorted by name.

  Kept: regular files. Skipped: symlinks, subdirectories, hidden files, and ``X.dat`` /
  ``X.u8`` when a file ``X`` is next to them (the index and alias of a fortune file).
  """
  entries = sorted(directory.iterdir())
  names = {p.name for p in entries}
  files = []
  for path in entries:
    if path.name.startswith(".") or path.is_symlink() or not path.is_file():
      continue
    stem, dot, suffix = path.name.rpartition(".")
    if dot and suffix in _COMPANION_SUFFIXES and stem in names:
      continue
    files.append(path)
  return files


def _read_corpus_files(paths: Sequence[Path]) -> str:
  """The files' text (UTF-8, undecodable bytes replaced by U+FFFD), one blank line apart.

  ``%`` separator lines become blank lines, so fortune entries, like files, are separated
  by a blank line.
  """
  texts = []
  for path in paths:
    text = path.read_bytes().decode("utf-8", errors="replace")
    texts.append(_FORTUNE_SEPARATOR.sub("", text).strip("\n"))
  return "\n\n".join(texts) + "\n"


def _corpus_not_found_message(source: Path, why: str) -> str:
  return (
    f"No text corpus at {source}: {why}.\n"
    f"To provide one, either\n"
    f"  - install the Debian package: apt-get install {FORTUNES_PACKAGE}\n"
    f"    (the default corpus, files under {FORTUNES_DIR}), or\n"
    f"  - set {CORPUS_ENV_VAR}=/a/text/file/or/directory, or pass path=...."
  )


def text_corpus(path: str | os.PathLike[str] | None = None) -> tuple[str, str]:
  """Load a text corpus for a character-level language model.

  The source is ``path`` when given, else ``$EVA_OPTAX_CORPUS`` when set, else the
  fortune cookies of the Debian package ``fortunes`` (``/usr/share/games/fortunes``). A
  file gives its text; a directory gives its text files (see :func:`_corpus_files`:
  regular files, without the ``.dat`` indexes and ``.u8`` aliases of fortune files)
  concatenated in name order. The bytes are decoded as UTF-8, undecodable ones replaced by
  U+FFFD. Lines holding only ``%`` (the fortune entry separator) become blank lines, and
  files are separated by one blank line.

  Returns:
    ``(text, description)``, the description saying what was read (for logs).

  Raises:
    FileNotFoundError: the source does not exist or holds no file (the message names it,
      the ``fortunes`` package and ``EVA_OPTAX_CORPUS``).
    ValueError: the corpus is empty.
  """
  env = os.environ.get(CORPUS_ENV_VAR)
  if path is not None:
    source, origin = Path(path).expanduser(), "the path argument"
  elif env:
    source, origin = Path(env).expanduser(), f"${CORPUS_ENV_VAR}"
  else:
    source, origin = FORTUNES_DIR, f"the default (package {FORTUNES_PACKAGE})"
  if source.is_file():
    files = [source]
  elif source.is_dir():
    files = _corpus_files(source)
    if not files:
      raise FileNotFoundError(
        _corpus_not_found_message(source, f"the directory ({origin}) holds no file")
      )
  else:
    raise FileNotFoundError(
      _corpus_not_found_message(source, f"no such file or directory ({origin})")
    )
  text = _read_corpus_files(files)
  if not text.strip():
    raise ValueError(f"{source}: the text corpus is empty ({len(files)} file(s))")
  if source.is_file():
    description = f"{source}, {len(text):,} characters"
  else:
    name = f"{FORTUNES_PACKAGE} " if source == FORTUNES_DIR else ""
    files_word = "file" if len(files) == 1 else "files"
    description = f"{name}{source} ({len(files)} {files_word}), {len(text):,} characters"
  return text, description


def char_vocabulary(text: str) -> str:
  """The distinct characters of ``text``, sorted by code point (id ``i`` is ``vocab[i]``).

  Raises:
    ValueError: ``text`` is empty.
  """
  if not text:
    raise ValueError("char_vocabulary: text is empty")
  return "".join(sorted(set(text)))


def _code_points(text: str) -> np.ndarray:
  """The code points of ``text`` as a uint32 array (vectorised, no Python loop)."""
  return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def encode(text: str, vocabulary: str) -> np.ndarray:
  """The ids of the characters of ``text`` (positions in ``vocabulary``) as int32.

  Raises:
    ValueError: ``vocabulary`` repeats a character, or ``text`` holds characters that are
      not in it (the message lists them).
  """
  vocab = _code_points(vocabulary)
  if len(np.unique(vocab)) != len(vocab):
    raise ValueError("encode: the vocabulary repeats characters")
  codes = _code_points(text)
  if len(codes) == 0:
    return np.zeros(0, np.int32)
  order = np.argsort(vocab, kind="stable")
  pos = np.searchsorted(vocab[order], codes)
  if len(vocab):
    known = vocab[order][np.minimum(pos, len(vocab) - 1)] == codes
  else:
    known = np.zeros(len(codes), bool)
  if not known.all():
    unknown = [chr(c) for c in np.unique(codes[~known])]
    shown = "".join(unknown[:20]) + ("..." if len(unknown) > 20 else "")
    raise ValueError(
      f"encode: {len(unknown)} character(s) of the text are not in the vocabulary: "
      f"{shown!r} ({int((~known).sum())} occurrence(s))"
    )
  return order[pos].astype(np.int32)


def decode(ids: np.ndarray | Sequence[int], vocabulary: str) -> str:
  """The text of the 1-D ``ids`` (the inverse of :func:`encode`).

  Raises:
    ValueError: ``ids`` is not 1-D integers in ``0 .. len(vocabulary) - 1``.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"decode: ids must be 1-D, got shape {ids.shape}")
  if ids.size == 0:
    return ""
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"decode: ids must be integers, got {ids.dtype}")
  if ids.min() < 0 or ids.max() >= len(vocabulary):
    raise ValueError(
      f"decode: ids must lie in 0..{len(vocabulary) - 1}, got {int(ids.min())}..{int(ids.max())}"
    )
  return _code_points(vocabulary)[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


def split_text(ids: np.ndarray, test_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Split a token sequence into ``(train, test)``: the last ``test_fraction`` is the test.

  The split is contiguous (no shuffling), so no test window leaks into training. The
  number of test tokens is ``round(len(ids) * test_fraction)``.

  Raises:
    ValueError: ``test_fraction`` not in (0, 1), or a split would be empty.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
  n = len(ids)
  n_test = int(round(n * test_fraction))
  if n_test == 0 or n_test == n:
    raise ValueError(
      f"test_fraction={test_fraction} of {n} tokens leaves an empty split "
      f"({n - n_test} train, {n_test} test)"
    )
  return ids[: n - n_test], ids[n - n_test :]


def sequence_batches_per_epoch(num_tokens: int, seq_len: int, batch_size: int) -> int:
  """How many batches :func:`sequence_batches` yields per epoch over ``num_tokens`` ids.

  ``(num_tokens - 1) // (seq_len * batch_size)``: every window needs ``seq_len`` inputs plus
  one more token for the last target.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return max(num_tokens - 1, 0) // (seq_len * batch_size)


def sequence_batches(
  ids: np.ndarray,
  seq_len: int,
  batch_size: int,
  rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of next-token ``(inputs, targets)`` batches over the 1-D token array ``ids``.

  The epoch cuts ``ids`` into non-overlapping windows of ``seq_len`` tokens, starting at a
  random phase drawn from ``rng`` (so successive epochs see different cuts), and yields
  them in a random order, ``batch_size`` windows per batch.
  ``targets[b, t] == inputs[b, t + 1]`` within a window and the last target is the token
  after the window, i.e. targets are the inputs shifted by one. Every epoch has the same
  number of batches, :func:`sequence_batches_per_epoch`; the few tokens left over (fewer
  than ``seq_len * batch_size + 1``) are skipped this epoch, at a random place.

  Each call draws its phase and order from ``rng`` at once (arguments are checked then,
  not at the first ``next``) and returns an iterator over one epoch.

  Returns:
    An iterator of int32 ``(inputs, targets)`` pairs, each of shape (batch_size, seq_len).

  Raises:
    ValueError: ``ids`` is not 1-D, a size is not positive, or ``ids`` is shorter than
      one batch (``seq_len * batch_size + 1`` tokens).
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"sequence_batches: ids must be 1-D, got shape {ids.shape}")
  num_batches = sequence_batches_per_epoch(len(ids), seq_len, batch_size)
  if num_batches == 0:
    raise ValueError(
      f"sequence_batches: {len(ids)} tokens are too few for one batch of "
      f"batch_size={batch_size} windows of seq_len={seq_len} "
      f"(needs {seq_len * batch_size + 1})"
    )
  num_windows = num_batches * batch_size
  slack = len(ids) - 1 - num_windows * seq_len  # >= 0 by construction
  phase = int(rng.integers(0, slack + 1))
  starts = phase + seq_len * rng.permutation(num_windows)
  offsets = np.arange(seq_len + 1)

  def epoch() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for b in range(num_batches):
      windows = ids[starts[b * batch_size : (b + 1) * batch_size, None] + offsets]
      windows = windows.astype(np.int32)
      yield windows[:, :-1], windows[:, 1:]

  return epoch()


def _main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m examples.harness.datasets",
    description="Locate Fashion-MNIST, CIFAR-10 and the text corpus.",
  )
  parser.add_argument(
    "--check",
    action="store_true",
    help="report where Fashion-MNIST is; exit 1 if missing",
  )
  parser.add_argument(
    "--check-cifar10",
    action="store_true",
    help="report where CIFAR-10 is; exit 1 if missing",
  )
  parser.add_argument(
    "--check-corpus",
    action="store_true",
    help="load the text corpus and describe it; exit 1 if missing",
  )
  parser.add_argument("--data-dir", default=None, help="a directory to look in first")
  parser.add_argument(
    "--corpus", default=None, help="a text file or directory (for --check-corpus)"
  )
  parser.add_argument(
    "--no-download", action="store_true", help="do not try to download missing files"
  )
  args = parser.parse_args(argv)
  if not (args.check or args.check_cifar10 or args.check_corpus):
    parser.print_help()
    return 0
  status = 0
  try:
    if args.check:
      for split in ("train", "test"):
        images, labels = find_fashion_mnist(split, args.data_dir, download=not args.no_download)
        print(f"Fashion-MNIST {split}: {images} {labels}")
  except FileNotFoundError as exc:
    print(exc, file=sys.stderr)
    status = 1
  try:
    if args.check_cifar10:
      for split in ("train", "test"):
        print(f"CIFAR-10 {split}: {find_cifar10(split, args.data_dir)}")
  except FileNotFoundError as exc:
    print(exc, file=sys.stderr)
    status = 1
  try:
    if args.check_corpus:
      print(f"Text corpus: {text_corpus(args.corpus)[1]}")
  except (FileNotFoundError, ValueError) as exc:
    print(exc, file=sys.stderr)
    status = 1
  return status


if __name__ == "__main__":
  sys.exit(_main())
