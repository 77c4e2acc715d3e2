"""examples/cifar10.py: augmentation, schedules, flags, and a run on a tiny archive."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from example_helpers import finite_numbers, load_example
from data_files import cifar_batch, write_cifar_tar

from examples.harness import datasets


@pytest.fixture
def no_cifar_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
  """No CIFAR-10 env var and an empty cache: only --data-dir can provide the data."""
  monkeypatch.delenv(datasets.CIFAR10_ENV_VAR, raising=False)
  monkeypatch.setattr(datasets.cifar10_files, "cifar10_cache_dir", lambda: tmp_path / "cache")
  return tmp_path


# ----------------------------------------------------------------------------- augmentation


def _image(c: int = 3) -> np.ndarray:
  """A 32×32 image without a zero value."""
  return (1 + np.arange(32 * 32 * c) % 255).astype(np.uint8).reshape(1, 32, 32, c)


def test_flipped_crop_matches_numpy_reference():
  cifar10 = load_example("cifar10")
  image = _image()
  top, left = np.array([0]), np.array([8])  # the top-left 4 rows padding, right 4 columns
  out = cifar10.crop_and_flip(image, top, left, np.array([True]))
  padded = np.zeros((40, 40, 3), np.uint8)
  padded[4:36, 4:36] = image[0]
  expected = padded[0:32, 8:40][:, ::-1]
  np.testing.assert_array_equal(out[0], expected)
  assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
  # Padding: the top 4 rows, and (mirrored) the left 4 columns; the rest is the image.
  assert (out[0, :4] == 0).all()
  assert (out[0, :, :4] == 0).all()
  assert (out[0, 4:, 4:] != 0).all()
  np.testing.assert_array_equal(out[0, 4:, 4:], image[0, :28, 4:][:, ::-1])


def test_unflipped_centre_crop_is_the_image():
  cifar10 = load_example("cifar10")
  images = np.concatenate([_image(), _image()[:, ::-1]])
  out = cifar10.crop_and_flip(images, np.array([4, 4]), np.array([4, 4]), np.array([False, True]))
  np.testing.assert_array_equal(out[0], images[0])
  np.testing.assert_array_equal(out[1], images[1][:, ::-1])


def test_augment_is_reproducible_from_the_rng():
  cifar10 = load_example("cifar10")
  images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  a = cifar10.augment(images, np.random.default_rng(5))
  b = cifar10.augment(images, np.random.default_rng(5))
  assert a.shape == images.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, images)  # 16 images: some were moved or flipped
  floats = cifar10.augment(images.astype(np.float32), np.random.default_rng(5))
  assert floats.dtype == np.float32
  np.testing.assert_array_equal(floats, a.astype(np.float32))


def test_channel_stats_and_standardise():
  cifar10 = load_example("cifar10")
  images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  mean, std = cifar10.channel_stats(images)
  pixels = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
  out = cifar10.standardise(images, mean, std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-5)


# ----------------------------------------------------------------------------- schedules


def test_step_schedule_boundaries():
  cifar10 = load_example("cifar10")
  total, warmup, lr = 200, 10, 0.1
  s = cifar10.make_schedule("step", lr, total, warmup)
  value = lambda step: float(s(step))
  assert value(0) == 0.0  # linear from 0
  assert value(5) == pytest.approx(lr / 2)
  assert value(10) == pytest.approx(lr)
  assert value(99) == pytest.approx(lr)
  assert value(100) == pytest.approx(lr * 0.1)  # × 0.1 at 50%
  assert value(149) == pytest.approx(lr * 0.1)
  assert value(150) == pytest.approx(lr * 0.01)  # and again at 75%
  assert value(199) == pytest.approx(lr * 0.01)


def test_cosine_schedule_and_warmup_cap():
  cifar10 = load_example("cifar10")
  s = cifar10.make_schedule("cosine", 0.1, 100, 10)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.05)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(55)) == pytest.approx(0.05, rel=1e-5)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
  assert cifar10.warmup_steps(5, 390, 200 * 390) == 5 * 390
  assert cifar10.warmup_steps(5, 4, 4) == 2  # a 1-epoch run: half of it
  assert cifar10.warmup_steps(0, 4, 4) == 0
  # Tiny runs: both decays on the same step multiply.
  s = cifar10.make_schedule("step", 1.0, 1, 0)
  assert float(s(0)) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("depth, blocks", [(8, 1), (14, 2), (20, 3), (32, 5), (56, 9), (110, 18)])
def test_depths(depth, blocks):
  cifar10 = load_example("cifar10")
  args = cifar10.parse_args(["--depth", str(depth)])
  assert cifar10.make_model(args.depth).blocks_per_stage == blocks


@pytest.mark.parametrize("depth", ["2", "21", "18", "0", "-4"])
def test_bad_depth_is_refused_naming_the_flag(depth, capsys):
  cifar10 = load_example("cifar10")
  with pytest.raises(SystemExit):
    cifar10.parse_args(["--depth", depth])
  assert "--depth must be 6n+2" in capsys.readouterr().err


def test_defaults():
  cifar10 = load_example("cifar10")
  args = cifar10.parse_args([])
  assert [s.key for s in args.specs] == ["sgd", "eva", "kfac", "shampoo"]
  assert (args.epochs, args.batch_size, args.depth) == (200, 128, 20)
  assert (args.schedule, args.warmup_epochs, args.out) == ("cosine", 5, "results/cifar10")
  assert (args.weight_decay, args.momentum) == (5e-4, 0.9)
  assert cifar10.LEARNING_RATES["sgd"] == cifar10.LEARNING_RATES["eva"] == 0.1
  assert cifar10.LEARNING_RATES["adamw"] == 1e-3


def test_missing_data_exits_with_the_path(no_cifar_elsewhere):
  cifar10 = load_example("cifar10")
  nowhere = no_cifar_elsewhere / "nowhere"
  with pytest.raises(SystemExit) as info:
    cifar10.main(
      [
        "--epochs",
        "1",
        "--data-dir",
        str(nowhere),
        "--no-checkpoint",
        "--out",
        str(no_cifar_elsewhere / "out"),
      ]
    )
  message = str(info.value.code)
  assert str(nowhere) in message
  assert "CIFAR-10" in message and "not found" in message


# ----------------------------------------------------------------------------- end to end


def test_trains_on_a_tiny_archive(no_cifar_elsewhere, capsys):
  batches = {f"data_batch_{k}": cifar_batch(16, k) for k in (1, 2)}
  batches["test_batch"] = cifar_batch(16, 99)
  data = no_cifar_elsewhere / "data"
  write_cifar_tar(data / "cifar-10-python.tar.gz", batches)
  out_dir = no_cifar_elsewhere / "out"
  cifar10 = load_example("cifar10")
  results = cifar10.main(
    [
      "--epochs",
      "1",
      "--batch-size",
      "8",
      "--depth",
      "8",
      "--optimizers",
      "sgd,eva",
      "--schedule",
      "step",
      "--data-dir",
      str(data),
      "--out",
      str(out_dir),
      "--checkpoint",
    ]
  )
  out = capsys.readouterr().out
  assert [r.name for r in results] == ["SGD", "Eva"]
  assert "CIFAR-10 ResNet-8" in out and "nan" not in out.lower()
  for r in results:
    assert r.steps == 4  # 32 images, batch 8
    for split in (r.train, r.test):
      assert set(split) == {"loss", "accuracy"}
      assert math.isfinite(split["loss"][0])
      assert 0.0 <= split["accuracy"][0] <= 1.0
  for name in (
    "results.md",
    "metrics.json",
    "metrics.csv",
    "loss_vs_epoch.png",
    "loss_vs_time.png",
  ):
    assert (out_dir / name).is_file(), name
  assert (out_dir / "checkpoints" / "eva").is_dir()
  metrics = json.loads((out_dir / "metrics.json").read_text())
  assert finite_numbers(metrics)
  assert metrics["config"]["depth"] == 8 and metrics["config"]["schedule"] == "step"
  assert metrics["target"]["metric"] == "test_accuracy"
  assert metrics["target"]["higher_is_better"] is True
  assert metrics["optimizers"]["SGD"]["time_to_target"] is not None
  table = (out_dir / "results.md").read_text()
  assert "final test accuracy" in table and "| Eva |" in table
