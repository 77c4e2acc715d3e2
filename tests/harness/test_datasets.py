"""Tests of the dataset loaders (tiny files, no network) and the minibatch iterators.

Fashion-MNIST (IDX), CIFAR-10 (python pickle archive), the character-level text corpus.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from data_files import cifar_batch, idx_bytes, write_cifar_tar, write_file, write_split
from examples.harness import datasets
from examples.harness.datasets import check


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
  """No env var, empty system and cache dirs, and a download that always fails."""
  monkeypatch.delenv(datasets.ENV_VAR, raising=False)
  monkeypatch.setattr(datasets.fashion_mnist_files, "SYSTEM_DIR", tmp_path / "system")
  monkeypatch.setattr(datasets.fashion_mnist_files, "cache_dir", lambda: tmp_path / "cache")

  def no_network(*args: object, **kwargs: object) -> None:
    raise OSError("network disabled in tests")

  monkeypatch.setattr(datasets.fashion_mnist_files, "_download", no_network)
  return tmp_path


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_from_data_dir(isolated: Path, split: str, compress: bool) -> None:
  d = isolated / "data"
  d.mkdir()
  images, labels = write_split(d, split, 7, compress=compress)
  got_images, got_labels = datasets.fashion_mnist(split, data_dir=d)
  assert got_images.dtype == np.uint8 and got_labels.dtype == np.uint8
  assert got_images.shape == (7, 28, 28) and got_labels.shape == (7,)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def test_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  explicit, env, system, cache = (isolated / n for n in ("explicit", "env", "system", "cache"))
  for i, d in enumerate((explicit, env, system, cache)):
    d.mkdir()
    write_split(d, "train", i + 1, compress=bool(i % 2))
  monkeypatch.setenv(datasets.ENV_VAR, str(env))

  assert len(datasets.fashion_mnist("train", data_dir=explicit)[0]) == 1
  assert len(datasets.fashion_mnist("train")[0]) == 2
  monkeypatch.delenv(datasets.ENV_VAR)
  assert len(datasets.fashion_mnist("train")[0]) == 3
  for f in system.iterdir():
    f.unlink()
  assert len(datasets.fashion_mnist("train")[0]) == 4


def test_download_fills_cache(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  calls: list[Path] = []

  def fake_download(directory: Path, split: str, timeout: float = 1.0) -> None:
    calls.append(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_split(directory, split, 3, compress=True)

  monkeypatch.setattr(datasets.fashion_mnist_files, "_download", fake_download)
  images, _ = datasets.fashion_mnist("test")
  assert calls == [isolated / "cache"] and images.shape == (3, 28, 28)


def test_missing_everywhere(isolated: Path) -> None:
  with pytest.raises(FileNotFoundError) as info:
    datasets.fashion_mnist("train", data_dir=isolated / "nowhere")
  message = str(info.value)
  assert "dataset-fashion-mnist" in message
  assert datasets.ENV_VAR in message
  assert str(isolated / "nowhere") in message
  assert str(isolated / "system") in message
  assert str(isolated / "cache") in message
  assert "network disabled in tests" in message


def test_check_cli(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
  assert check.main(["--check"]) == 1
  assert "dataset-fashion-mnist" in capsys.readouterr().err
  d = isolated / "data"
  d.mkdir()
  write_split(d, "train", 2, compress=True)
  write_split(d, "test", 2, compress=False)
  assert check.main(["--check", "--data-dir", str(d)]) == 0
  assert str(d) in capsys.readouterr().out


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_bad_magic(isolated: Path, compress: bool) -> None:
  d = isolated / "data"
  d.mkdir()
  write_split(d, "train", 2, compress=compress)
  labels = np.zeros(2, np.uint8)
  path = write_file(d / "train-images-idx3-ubyte", idx_bytes(labels), compress)  # 0x801
  with pytest.raises(ValueError, match="magic") as info:
    datasets.fashion_mnist("train", data_dir=d)
  assert str(path) in str(info.value)


def test_not_idx_at_all(tmp_path: Path) -> None:
  path = tmp_path / "junk"
  path.write_bytes(b"PK\x03\x04 definitely not idx")
  with pytest.raises(ValueError, match="magic") as info:
    datasets.read_idx(path)
  assert str(path) in str(info.value)


def test_truncated_file(tmp_path: Path) -> None:
  data = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5]
  path = write_file(tmp_path / "short", data, compress=False)
  with pytest.raises(ValueError, match="announces shape"):
    datasets.read_idx(path)


def test_wrong_image_shape_and_count(isolated: Path) -> None:
  d = isolated / "data"
  d.mkdir()
  write_file(d / "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 27, 28), np.uint8)), False)
  write_file(d / "train-labels-idx1-ubyte", idx_bytes(np.zeros(2, np.uint8)), False)
  with pytest.raises(ValueError, match="shape"):
    datasets.fashion_mnist("train", data_dir=d)
  write_file(d / "train-images-idx3-ubyte", idx_bytes(np.zeros((3, 28, 28), np.uint8)), False)
  with pytest.raises(ValueError, match="labels"):
    datasets.fashion_mnist("train", data_dir=d)


def test_bad_split() -> None:
  with pytest.raises(ValueError, match="split"):
    datasets.fashion_mnist("validation")  # type: ignore[arg-type]


def test_batches_cover_each_sample_once_per_epoch() -> None:
  n, bs = 23, 5
  x = np.arange(n)
  y = np.arange(n) * 10
  rng = np.random.default_rng(0)
  epochs = []
  for _ in range(2):
    seen = []
    for bx, by in datasets.batches((x, y), bs, rng=rng, drop_last=False):
      np.testing.assert_array_equal(by, bx * 10)  # arrays stay aligned
      seen.append(bx)
    assert [len(b) for b in seen] == [5, 5, 5, 5, 3]
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), x)
    epochs.append(order)
  assert not np.array_equal(epochs[0], x)  # shuffled
  assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


def test_batches_drop_last_and_order() -> None:
  x = np.arange(23)
  out = [b for (b,) in datasets.batches((x,), 5)]
  assert [len(b) for b in out] == [5, 5, 5, 5]
  np.testing.assert_array_equal(np.concatenate(out), x[:20])  # no rng: in order
  rng = np.random.default_rng(1)
  got = np.concatenate([b for (b,) in datasets.batches((x,), 5, rng=rng)])
  assert len(got) == 20 and len(np.unique(got)) == 20


def test_batches_rejects_bad_input() -> None:
  with pytest.raises(ValueError):
    list(datasets.batches((np.zeros(3), np.zeros(4)), 2))
  with pytest.raises(ValueError):
    list(datasets.batches((np.zeros(3),), 0))


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


# Two training batches (3 and 2 images; deliberately named out of lexical order with 10) and
# a test batch of 4.
_CIFAR_FILES = {"data_batch_2": (2, 2), "data_batch_10": (4, 10), "test_batch": (4, 99)}
_CIFAR_TRAIN_ORDER = ("data_batch_2", "data_batch_10")


def cifar_batches() -> dict[str, dict[bytes, object]]:
  return {name: cifar_batch(n, seed) for name, (n, seed) in _CIFAR_FILES.items()}


def _write_cifar_dir(directory: Path, batches: dict[str, dict[bytes, object]]) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "batches.meta").write_bytes(pickle.dumps({b"label_names": []}))
  for name, batch in batches.items():
    (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


def _expected_nhwc(data: np.ndarray) -> np.ndarray:
  """NHWC images from CIFAR rows, by hand: image[i, h, w, c] == row[c*1024 + h*32 + w]."""
  out = np.empty((len(data), 32, 32, 3), np.uint8)
  for c in range(3):
    for h in range(32):
      for w in range(32):
        out[:, h, w, c] = data[:, c * 1024 + h * 32 + w]
  return out


@pytest.fixture
def cifar_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
  """No CIFAR-10 env var and an empty cache directory."""
  monkeypatch.delenv(datasets.CIFAR10_ENV_VAR, raising=False)
  monkeypatch.setattr(datasets.cifar10_files, "cifar10_cache_dir", lambda: tmp_path / "cache")
  return tmp_path


@pytest.mark.parametrize("layout", ["flat", "subdir", "tar", "tar_file_as_data_dir"])
def test_cifar10_layouts(cifar_isolated: Path, layout: str) -> None:
  batches = cifar_batches()
  root = cifar_isolated / "data"
  if layout == "flat":
    _write_cifar_dir(root, batches)
  elif layout == "subdir":
    _write_cifar_dir(root / "cifar-10-batches-py", batches)
  else:
    write_cifar_tar(root / "cifar-10-python.tar.gz", batches)
  data_dir = root / "cifar-10-python.tar.gz" if layout == "tar_file_as_data_dir" else root

  images, labels = datasets.cifar10("train", data_dir)
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  assert images.shape == (6, 32, 32, 3) and labels.shape == (6,)
  assert images.flags.c_contiguous
  data = np.concatenate([batches[n][b"data"] for n in _CIFAR_TRAIN_ORDER])  # numeric order
  np.testing.assert_array_equal(images, _expected_nhwc(data))
  np.testing.assert_array_equal(
    labels, sum((batches[n][b"labels"] for n in _CIFAR_TRAIN_ORDER), [])
  )
  # One pixel by hand: image 2 (the first of data_batch_10), row 5, column 7, blue.
  assert images[2, 5, 7, 2] == batches["data_batch_10"][b"data"][0, 2 * 1024 + 5 * 32 + 7]

  test_images, test_labels = datasets.cifar10("test", data_dir)
  assert test_images.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(test_images, _expected_nhwc(batches["test_batch"][b"data"]))
  np.testing.assert_array_equal(test_labels, batches["test_batch"][b"labels"])


def test_cifar10_channel_planes(cifar_isolated: Path) -> None:
  """Constant R, G, B planes land in channels 0, 1, 2 (channel-major rows)."""
  data = np.concatenate([np.full((1, 1024), v, np.uint8) for v in (10, 20, 30)], axis=1)
  _write_cifar_dir(cifar_isolated / "d", {"test_batch": {b"data": data, b"labels": [7]}})
  images, labels = datasets.cifar10("test", cifar_isolated / "d")
  assert images.shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(images[0, 13, 29], [10, 20, 30])
  assert (images[0] == np.array([10, 20, 30], np.uint8)).all()
  assert labels.tolist() == [7]


def test_cifar10_search_order(cifar_isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  def write(directory: Path, n: int) -> None:
    _write_cifar_dir(directory, {"data_batch_1": cifar_batch(n, n)})

  explicit, env, cache = (cifar_isolated / n for n in ("explicit", "env", "cache"))
  write(explicit, 1)
  write(env / "cifar-10-batches-py", 2)
  write_cifar_tar(cache / "cifar-10-python.tar.gz", {"data_batch_1": cifar_batch(3, 3)})
  monkeypatch.setenv(datasets.CIFAR10_ENV_VAR, str(env))

  assert len(datasets.cifar10("train", explicit)[0]) == 1
  assert len(datasets.cifar10("train")[0]) == 2
  assert datasets.find_cifar10("train") == env / "cifar-10-batches-py"
  monkeypatch.delenv(datasets.CIFAR10_ENV_VAR)
  assert len(datasets.cifar10("train")[0]) == 3
  assert datasets.find_cifar10("train") == cache / "cifar-10-python.tar.gz"


def test_cifar10_missing_names_every_path(
  cifar_isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
  env = cifar_isolated / "env"
  monkeypatch.setenv(datasets.CIFAR10_ENV_VAR, str(env))
  with pytest.raises(FileNotFoundError) as info:
    datasets.cifar10("train", cifar_isolated / "nowhere")
  message = str(info.value)
  for root in (cifar_isolated / "nowhere", env, cifar_isolated / "cache"):
    assert f"  - {root}\n" in message
    assert f"  - {root / 'cifar-10-batches-py'}\n" in message
    assert f"  - {root / 'cifar-10-python.tar.gz'}\n" in message
  assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
  assert "--data-dir" in message and "EVA_OPTAX_CIFAR10" in message


def test_cifar10_split_needs_its_batches(cifar_isolated: Path) -> None:
  d = cifar_isolated / "d"
  _write_cifar_dir(d, {"test_batch": cifar_batch(2, 0)})
  assert datasets.cifar10("test", d)[0].shape == (2, 32, 32, 3)
  with pytest.raises(FileNotFoundError, match="data_batch_1"):
    datasets.cifar10("train", d)  # a directory with only test_batch has no train split
  archive = cifar_isolated / "a" / "cifar-10-python.tar.gz"
  write_cifar_tar(archive, {"data_batch_1": cifar_batch(2, 0)})
  assert datasets.cifar10("train", archive.parent)[0].shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match="no test_batch") as info:
    datasets.cifar10("test", archive.parent)
  assert str(archive) in str(info.value)
  with pytest.raises(ValueError, match="split"):
    datasets.cifar10("validation", d)  # type: ignore[arg-type]


@pytest.mark.parametrize("as_tar", [False, True], ids=["dir", "tar"])
def test_cifar10_bad_label(cifar_isolated: Path, as_tar: bool) -> None:
  batch = cifar_batch(5, 0)
  batch[b"labels"] = [0, 9, 10, 3, -1]
  if as_tar:
    write_cifar_tar(cifar_isolated / "d" / "cifar-10-python.tar.gz", {"test_batch": batch})
  else:
    _write_cifar_dir(cifar_isolated / "d", {"test_batch": batch})
  with pytest.raises(ValueError, match=r"0\.\.9") as info:
    datasets.cifar10("test", cifar_isolated / "d")
  message = str(info.value)
  assert "test_batch" in message and str(cifar_isolated / "d") in message
  assert "[10, -1]" in message and "[2, 4]" in message  # the values and their indices


def test_cifar10_malformed_batches(cifar_isolated: Path) -> None:
  d = cifar_isolated / "d"
  bad_shape = {b"data": np.zeros((2, 3073), np.uint8), b"labels": [0, 1]}
  _write_cifar_dir(d, {"test_batch": bad_shape})
  with pytest.raises(ValueError, match=r"\(N, 3072\)"):
    datasets.cifar10("test", d)
  _write_cifar_dir(d, {"test_batch": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}})
  with pytest.raises(ValueError, match="2 images"):
    datasets.cifar10("test", d)
  _write_cifar_dir(d, {"test_batch": {b"labels": [1]}})
  with pytest.raises(ValueError, match="b'data'"):
    datasets.cifar10("test", d)
  (d / "test_batch").write_bytes(b"not a pickle at all")
  with pytest.raises(ValueError, match="unpickle") as info:
    datasets.cifar10("test", d)
  assert str(d / "test_batch") in str(info.value)
  archive = cifar_isolated / "t" / "cifar-10-python.tar.gz"
  archive.parent.mkdir()
  archive.write_bytes(b"\x1f\x8b but truncated")
  with pytest.raises(ValueError, match="tar archive") as info:
    datasets.cifar10("test", archive.parent)
  assert str(archive) in str(info.value)


def test_check_cli_cifar10(cifar_isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
  assert check.main(["--check-cifar10"]) == 1
  assert "cifar-10-python.tar.gz" in capsys.readouterr().err
  _write_cifar_dir(cifar_isolated / "d", cifar_batches())
  assert check.main(["--check-cifar10", "--data-dir", str(cifar_isolated / "d")]) == 0
  out = capsys.readouterr().out
  assert f"CIFAR-10 train: {cifar_isolated / 'd'}" in out and "CIFAR-10 test" in out


# --------------------------------------------------------------------------------------------
# Character-level text corpus
# --------------------------------------------------------------------------------------------


@pytest.fixture
def corpus_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
  """No corpus env var and a missing default fortunes directory."""
  monkeypatch.delenv(datasets.CORPUS_ENV_VAR, raising=False)
  monkeypatch.setattr(datasets.text, "FORTUNES_DIR", tmp_path / "no-fortunes")
  return tmp_path


def test_text_corpus_file(corpus_isolated: Path) -> None:
  path = corpus_isolated / "one.txt"
  path.write_text("first entry\n%\nsecond\nentry\n%\n% not a separator\n%\n")
  text, description = datasets.text_corpus(path)
  assert text == "first entry\n\nsecond\nentry\n\n% not a separator\n"
  assert description == f"{path}, {len(text)} characters"


def test_text_corpus_directory(corpus_isolated: Path) -> None:
  d = corpus_isolated / "fortunes"
  d.mkdir()
  (d / "b").write_text("bee one\n%\nbee two\n%\n")
  (d / "a").write_bytes(b"caf\xe9\r\n%\r\nna\xc3\xafve\n")  # latin-1 e-acute, utf-8 i-umlaut
  (d / "a.dat").write_bytes(b"\x00\x00\x00\x02 strfile index")
  (d / "b.u8").symlink_to("b")
  (d / ".hidden").write_text("hidden")
  (d / "lonely.dat").write_text("kept: no file named lonely")
  (d / "sub").mkdir()
  (d / "sub" / "c").write_text("not read: subdirectory")
  text, description = datasets.text_corpus(d)
  assert text == ("caf\ufffd\r\n\nna\u00efve\n\nbee one\n\nbee two\n\nkept: no file named lonely\n")
  assert description == f"{d} (3 files), {len(text)} characters"


def test_text_corpus_sources(corpus_isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  fortunes, env, arg = (corpus_isolated / n for n in ("fortunes", "env.txt", "arg.txt"))
  fortunes.mkdir()
  (fortunes / "x").write_text("from fortunes\n")
  env.write_text("from env\n")
  arg.write_text("from arg\n")
  monkeypatch.setattr(datasets.text, "FORTUNES_DIR", fortunes)
  text, description = datasets.text_corpus()
  assert text == "from fortunes\n" and description.startswith(f"fortunes {fortunes} (1 file)")
  monkeypatch.setenv(datasets.CORPUS_ENV_VAR, str(env))
  assert datasets.text_corpus()[0] == "from env\n"
  assert datasets.text_corpus(arg)[0] == "from arg\n"


def test_text_corpus_missing(corpus_isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  cases = [
    (lambda: datasets.text_corpus(), corpus_isolated / "no-fortunes"),
    (lambda: datasets.text_corpus(corpus_isolated / "nope"), corpus_isolated / "nope"),
  ]
  empty_dir = corpus_isolated / "empty"
  (empty_dir / "only-a-subdir").mkdir(parents=True)
  cases.append((lambda: datasets.text_corpus(empty_dir), empty_dir))
  for load, path in cases:
    with pytest.raises(FileNotFoundError) as info:
      load()
    message = str(info.value)
    assert str(path) in message
    assert "apt-get install fortunes" in message and "EVA_OPTAX_CORPUS" in message
  monkeypatch.setenv(datasets.CORPUS_ENV_VAR, str(corpus_isolated / "env-nope"))
  with pytest.raises(FileNotFoundError, match=r"\$EVA_OPTAX_CORPUS") as info:
    datasets.text_corpus()
  assert str(corpus_isolated / "env-nope") in str(info.value)
  (corpus_isolated / "blank.txt").write_text("\n%\n\n")
  with pytest.raises(ValueError, match="empty"):
    datasets.text_corpus(corpus_isolated / "blank.txt")


def test_fortunes_default(monkeypatch: pytest.MonkeyPatch) -> None:
  if not datasets.FORTUNES_DIR.is_dir():
    pytest.skip(f"{datasets.FORTUNES_DIR} absent (apt-get install fortunes)")
  monkeypatch.delenv(datasets.CORPUS_ENV_VAR, raising=False)
  text, description = datasets.text_corpus()
  assert description.startswith(f"fortunes {datasets.FORTUNES_DIR} (")
  assert len(text) > 100_000
  assert "%" not in text.splitlines()  # no separator line left
  assert "\n%\n" not in text and '\n\nA "critic"' in text  # art's second entry
  vocab = datasets.char_vocabulary(text)
  assert 60 < len(vocab) < 500 and "\n" in vocab and "e" in vocab
  ids = datasets.encode(text, vocab)
  assert ids.dtype == np.int32 and len(ids) == len(text)
  assert datasets.decode(ids, vocab) == text


def test_vocabulary_encode_decode() -> None:
  text = "hello, wörld\n\u2603 hello"
  vocab = datasets.char_vocabulary(text)
  assert vocab == "\n ,dehlorw\u00f6\u2603"
  ids = datasets.encode(text, vocab)
  assert ids.dtype == np.int32
  assert ids[:5].tolist() == [5, 4, 6, 6, 7]  # h e l l o
  assert datasets.decode(ids, vocab) == text
  assert datasets.decode(ids.tolist(), vocab) == text
  # Any vocabulary order works, ids are positions in it.
  shuffled = "\u2603olrw,d\n\u00f6 eh"
  assert datasets.decode(datasets.encode(text, shuffled), shuffled) == text
  assert datasets.encode("", vocab).shape == (0,) and datasets.decode([], vocab) == ""


def test_encode_decode_errors() -> None:
  with pytest.raises(ValueError, match=r"2 character\(s\).*'xz'.*3 occurrence"):
    datasets.encode("abzxz", "ab")
  with pytest.raises(ValueError, match="repeats"):
    datasets.encode("ab", "aba")
  with pytest.raises(ValueError, match="not in the vocabulary"):
    datasets.encode("a", "")
  with pytest.raises(ValueError, match=r"0\.\.1"):
    datasets.decode([0, 2], "ab")
  with pytest.raises(ValueError, match="1-D"):
    datasets.decode(np.zeros((2, 2), np.int32), "ab")
  with pytest.raises(ValueError, match="empty"):
    datasets.char_vocabulary("")


def test_split_text() -> None:
  ids = np.arange(100, dtype=np.int32)
  train, test = datasets.split_text(ids)
  np.testing.assert_array_equal(train, np.arange(90))
  np.testing.assert_array_equal(test, np.arange(90, 100))
  train, test = datasets.split_text(ids[:7], test_fraction=0.25)  # round(1.75) = 2
  assert train.tolist() == [0, 1, 2, 3, 4] and test.tolist() == [5, 6]
  for fraction in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="test_fraction"):
      datasets.split_text(ids, fraction)
  with pytest.raises(ValueError, match="empty split"):
    datasets.split_text(ids[:3], 0.1)


def test_sequence_batches_shift_and_coverage() -> None:
  n, seq_len, batch_size = 1000, 7, 4
  ids = np.arange(n, dtype=np.int32)  # token value == position
  assert datasets.sequence_batches_per_epoch(n, seq_len, batch_size) == 999 // 28 == 35
  rng = np.random.default_rng(0)
  epochs = []
  for _ in range(3):
    out = list(datasets.sequence_batches(ids, seq_len, batch_size, rng))
    assert len(out) == 35
    for inputs, targets in out:
      assert inputs.shape == targets.shape == (batch_size, seq_len)
      assert inputs.dtype == targets.dtype == np.int32
      np.testing.assert_array_equal(targets, inputs + 1)  # next token
      np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])  # shifted by one
      np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(seq_len))
    starts = np.concatenate([inputs[:, 0] for inputs, _ in out])
    assert len(np.unique(starts)) == 140
    ordered = np.sort(starts)
    assert (np.diff(ordered) == seq_len).all()  # contiguous, non-overlapping windows
    assert 0 <= ordered[0] <= n - 1 - 140 * seq_len  # random phase, within the slack
    assert not np.array_equal(starts, ordered)  # windows shuffled
    epochs.append(starts)
  phases = {int(e.min()) for e in epochs}
  assert len(phases) > 1  # the phase changes between epochs (slack is 19 tokens)


def test_sequence_batches_exact_fit_and_errors() -> None:
  ids = np.arange(2 * 3 + 1)  # exactly one batch of 2 windows of 3, plus the last target
  ((inputs, targets),) = list(datasets.sequence_batches(ids, 3, 2, np.random.default_rng(0)))
  assert sorted(inputs.tolist()) == [[0, 1, 2], [3, 4, 5]]
  assert sorted(targets.tolist()) == [[1, 2, 3], [4, 5, 6]]
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="needs 7"):
    datasets.sequence_batches(ids[:-1], 3, 2, rng)  # raised at call time
  with pytest.raises(ValueError, match="seq_len"):
    datasets.sequence_batches(ids, 0, 2, rng)
  with pytest.raises(ValueError, match="batch_size"):
    datasets.sequence_batches(ids, 3, 0, rng)
  with pytest.raises(ValueError, match="1-D"):
    datasets.sequence_batches(ids.reshape(1, -1), 3, 1, rng)


def test_check_cli_corpus(corpus_isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
  assert check.main(["--check-corpus"]) == 1
  assert "apt-get install fortunes" in capsys.readouterr().err
  path = corpus_isolated / "c.txt"
  path.write_text("abc\n")
  assert check.main(["--check-corpus", "--corpus", str(path)]) == 0
  assert f"Text corpus: {path}, 4 characters" in capsys.readouterr().out
