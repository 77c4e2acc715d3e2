"""A character-level text corpus (by default the fortunes of the Debian package ``fortunes``)
and its next-character training data: :func:`text_corpus`, :func:`char_vocabulary`,
:func:`encode`, :func:`decode`, :func:`split_text`, :func:`sequence_batches`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

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
