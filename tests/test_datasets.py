"""Tests of the Fashion-MNIST IDX loader and the minibatch iterator (tiny files, no network)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from eva_optax import datasets


def _idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in IDX format."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, data: bytes, compress: bool) -> Path:
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _write_split(
    directory: Path, split: str, n: int, *, compress: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = {"train": "train", "test": "t10k"}[split]
    _write(directory / f"{prefix}-images-idx3-ubyte", _idx_bytes(images), compress)
    _write(directory / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels), compress)
    return images, labels


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var, empty system and cache dirs, and a download that always fails."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(datasets, "cache_dir", lambda: tmp_path / "cache")

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(datasets, "_download", no_network)
    return tmp_path


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_from_data_dir(isolated: Path, split: str, compress: bool) -> None:
    d = isolated / "data"
    d.mkdir()
    images, labels = _write_split(d, split, 7, compress=compress)
    got_images, got_labels = datasets.fashion_mnist(split, data_dir=d)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.uint8
    assert got_images.shape == (7, 28, 28) and got_labels.shape == (7,)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env, system, cache = (isolated / n for n in ("explicit", "env", "system", "cache"))
    for i, d in enumerate((explicit, env, system, cache)):
        d.mkdir()
        _write_split(d, "train", i + 1, compress=bool(i % 2))
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
        _write_split(directory, split, 3, compress=True)

    monkeypatch.setattr(datasets, "_download", fake_download)
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
    assert datasets._main(["--check"]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    d = isolated / "data"
    d.mkdir()
    _write_split(d, "train", 2, compress=True)
    _write_split(d, "test", 2, compress=False)
    assert datasets._main(["--check", "--data-dir", str(d)]) == 0
    assert str(d) in capsys.readouterr().out


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_bad_magic(isolated: Path, compress: bool) -> None:
    d = isolated / "data"
    d.mkdir()
    _write_split(d, "train", 2, compress=compress)
    labels = np.zeros(2, np.uint8)
    path = _write(d / "train-images-idx3-ubyte", _idx_bytes(labels), compress)  # 0x801
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
    data = _idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5]
    path = _write(tmp_path / "short", data, compress=False)
    with pytest.raises(ValueError, match="announces shape"):
        datasets.read_idx(path)


def test_wrong_image_shape_and_count(isolated: Path) -> None:
    d = isolated / "data"
    d.mkdir()
    _write(d / "train-images-idx3-ubyte", _idx_bytes(np.zeros((2, 27, 28), np.uint8)), False)
    _write(d / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(2, np.uint8)), False)
    with pytest.raises(ValueError, match="shape"):
        datasets.fashion_mnist("train", data_dir=d)
    _write(d / "train-images-idx3-ubyte", _idx_bytes(np.zeros((3, 28, 28), np.uint8)), False)
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
