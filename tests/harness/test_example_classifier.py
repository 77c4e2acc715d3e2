"""The Fashion-MNIST ResNet classifier example, end to end on tiny data and piece by piece."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from example_helpers import finite_numbers, load_example
from data_files import write_split


@pytest.fixture(scope="module")
def clf():
  return load_example("classifier")


@pytest.fixture
def data(tmp_path: Path) -> Path:
  d = tmp_path / "data"
  d.mkdir()
  write_split(d, "train", 64, compress=True)
  write_split(d, "test", 32, compress=False, seed=1)
  return d


def _tiny_batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  return images, labels


def _init(clf):
  variables = clf.MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
  return variables["params"], variables["batch_stats"]


def test_classifier_trains_and_writes_the_report(clf, data, tmp_path, capsys):
  out_dir = tmp_path / "out"
  names = ["SGD", "Eva", "K-FAC", "Sophia"]  # Sophia: obj_fn in train mode, BatchNorm
  results = clf.main(
    [
      "--optimizers",
      "sgd,eva,kfac,sophia",
      "--epochs",
      "1",
      "--batch-size",
      "32",
      "--data-dir",
      str(data),
      "--out",
      str(out_dir),
      "--checkpoint",
      "--depth",  # the smallest ResNet: the report, not the network, is under test here
      "8",
      "--width",
      "4",
    ]
  )
  out = capsys.readouterr().out
  assert [r.name for r in results] == names
  assert "nan" not in out.lower()
  for r in results:
    assert not r.diverged, r.name
    assert r.steps == 2 and len(r.epoch_times) == 1, r.name  # 64 images, batch 32
    assert 0.0 <= r.test["accuracy"][0] <= 1.0, r.name
    assert 0.0 <= r.train["accuracy"][0] <= 1.0, r.name
    assert math.isfinite(r.test["loss"][0]) and math.isfinite(r.train["loss"][0]), r.name

  table = (out_dir / "results.md").read_text()
  assert "final test accuracy" in table
  assert "steps to SGD's final test accuracy (last evaluation) = " in table
  for name in names:
    assert f"| {name} |" in table
    assert any(line.split()[:1] == [name] for line in out.splitlines()), name  # printed too
  assert "nan" not in table.lower()
  assert "final  test accuracy (last evaluation) at the end" in out  # the summary's key

  metrics = json.loads((out_dir / "metrics.json").read_text())
  assert list(metrics["optimizers"]) == names
  assert finite_numbers(metrics)
  assert metrics["target"]["metric"] == "test_accuracy"
  assert metrics["target"]["higher_is_better"] is True
  assert metrics["config"]["warmup_epochs"] == 1.0
  for name, m in metrics["optimizers"].items():
    assert set(m["test"]) == {"loss", "accuracy"}, name
    assert set(m["train"]) == {"loss", "accuracy"}, name
    assert m["state_bytes"] > 0, name
  # SGD reaches its own final test accuracy by construction.
  assert metrics["optimizers"]["SGD"]["time_to_target"] is not None

  with open(out_dir / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["optimizer"] for r in rows] == names
  for r in rows:
    assert 0.0 <= float(r["test_accuracy"]) <= 1.0
    assert math.isfinite(float(r["test_loss"]))
  for png in ("loss_vs_epoch.png", "loss_vs_time.png"):
    assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
  assert (out_dir / "checkpoints" / "sgd").is_dir()


@pytest.fixture(scope="module")
def jitted(clf):
  """The loss, the evaluation and the eval-mode logits, compiled once for the tiny batches."""
  variables = lambda p, s: {"params": p, "batch_stats": s}
  return (
    jax.jit(clf.loss_fn),
    jax.jit(clf.eval_fn),
    jax.jit(lambda p, s, x: clf.MODEL.apply(variables(p, s), x, train=False)),
  )


def test_train_mode_updates_batch_stats_and_eval_mode_uses_them(clf, jitted):
  loss_fn, eval_fn, logits_fn = jitted
  params, batch_stats = _init(clf)
  batch = _tiny_batch()
  loss, (new_stats, metrics) = loss_fn(params, batch_stats, batch)
  assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy"]) <= 1.0
  assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: not np.allclose(a, b), new_stats, batch_stats)
  )
  assert changed and all(changed)  # every BatchNorm mean and variance moved

  # Eval mode normalises with the running averages, not with the batch's statistics: an
  # image's logits do not depend on the rest of its batch, but they do on the model state.
  images, labels = batch
  other = np.concatenate([images[:4], _tiny_batch(seed=5)[0][4:]])
  np.testing.assert_allclose(
    logits_fn(params, new_stats, images)[:4],
    logits_fn(params, new_stats, other)[:4],
    rtol=1e-5,
    atol=1e-5,
  )
  before = float(eval_fn(params, batch_stats, batch)["loss"])
  after = float(eval_fn(params, new_stats, batch)["loss"])
  assert np.isfinite(before) and np.isfinite(after) and before != pytest.approx(after)


def test_eval_fn_matches_an_independent_numpy_computation(clf, jitted):
  loss_fn, eval_fn, logits_fn = jitted
  params, batch_stats = _init(clf)
  # Move the running averages off their initial values with two training-mode passes.
  for seed in (1, 2):
    _, (batch_stats, _) = loss_fn(params, batch_stats, _tiny_batch(seed=seed))
  images, _ = _tiny_batch(seed=3)
  logits = np.asarray(logits_fn(params, batch_stats, images), dtype=np.float64)
  predicted = logits.argmax(axis=-1)
  labels = predicted.copy()
  labels[::3] = (labels[::3] + 1) % 10  # 3 of 8 wrong
  expected_accuracy = np.mean(predicted == labels)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  expected_loss = -np.mean(log_probs[np.arange(len(labels)), labels])

  got = eval_fn(params, batch_stats, (images, labels.astype(np.int32)))
  assert expected_accuracy == pytest.approx(5 / 8)
  assert float(got["accuracy"]) == pytest.approx(expected_accuracy, abs=1e-7)
  assert float(got["loss"]) == pytest.approx(expected_loss, rel=1e-4)


def test_schedule_warms_up_from_zero_then_decays_to_zero(clf):
  s = clf.schedule(0.1, total_steps=100, warmup_steps=10)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.05)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(55)) == pytest.approx(0.05, abs=1e-6)  # half way down the cosine
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
  # A warm-up as long as the run is cut to leave one step of decay.
  s = clf.schedule(0.1, total_steps=2, warmup_steps=2)
  assert [float(s(i)) for i in range(3)] == pytest.approx([0.0, 0.1, 0.0])
  s = clf.schedule(0.1, total_steps=4, warmup_steps=0)
  assert float(s(0)) == pytest.approx(0.1)


def test_data_is_standardised_with_the_training_statistics(clf, data):
  args = clf.parse_args(["--data-dir", str(data), "--batch-size", "16"])
  task = clf.make_task(args)
  assert task.steps_per_epoch == 4
  train_x = np.concatenate([x for x, _ in task.train_epoch(np.random.default_rng(0))])
  assert train_x.shape == (64, 28, 28, 1) and train_x.dtype == np.float32
  assert abs(train_x.mean()) < 1e-4 and train_x.std() == pytest.approx(1.0, rel=1e-4)
  test_x, test_y = (np.concatenate(a) for a in zip(*task.test_batches()))
  assert test_x.shape == (32, 28, 28, 1) and test_y.dtype == np.int32
  raw_train = np.stack([x for x in clf.load_split("train", str(data), None)[0]])
  raw_test = clf.load_split("test", str(data), None)[0]
  expected = (raw_test - raw_train.mean()) / raw_train.std()
  np.testing.assert_allclose(test_x, expected, rtol=1e-5, atol=1e-5)
  assert task.target.metric == "test_accuracy" and task.target.higher_is_better


def test_random_flip_is_reproducible_and_mirrors_whole_images(clf, data):
  images, _ = _tiny_batch(32)
  a = clf.random_flip(images, np.random.default_rng(7))
  b = clf.random_flip(images, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  mirrored = [np.array_equal(x, img[:, ::-1]) for x, img in zip(a, images)]
  kept = [np.array_equal(x, img) for x, img in zip(a, images)]
  assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
  # With --flip the epochs stay a function of the batch-order generator.
  task = clf.make_task(clf.parse_args(["--data-dir", str(data), "--batch-size", "16", "--flip"]))
  first = [x for x, _ in task.train_epoch(np.random.default_rng(3))]
  again = [x for x, _ in task.train_epoch(np.random.default_rng(3))]
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x, y)


def test_flags_and_defaults(clf, capsys):
  args = clf.parse_args([])
  assert [s.key for s in args.specs] == ["sgd", "adamw", "eva", "eva-f", "eva-s", "kfac", "shampoo"]
  assert (args.epochs, args.batch_size, args.out) == (3, 128, "results/classifier")
  assert (args.warmup_epochs, args.flip, args.weight_decay, args.momentum) == (
    1.0,
    False,
    5e-4,
    0.9,
  )
  assert clf.parse_args(["--warmup-epochs", "0.5"]).warmup_epochs == 0.5
  assert set(clf.LEARNING_RATES) >= {s.key for s in args.specs}
  with pytest.raises(SystemExit):
    clf.parse_args(["--warmup-epochs", "-1"])
  assert "--warmup-epochs must be at least 0" in capsys.readouterr().err


def _conv_kernel_shapes(params):
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sorted(
    tuple(v.shape)
    for path, v in leaves
    if jax.tree_util.keystr(path).endswith("['kernel']") and v.ndim == 4
  )


@pytest.mark.parametrize("depth, width", [(14, 16), (8, 8), (20, 4)])
def test_depth_and_width_choose_the_network(clf, depth, width):
  args = clf.parse_args(["--depth", str(depth), "--width", str(width)])
  model = clf.resnet(args.depth, args.width)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
  # Counted by hand: the 3x3 stem (1 -> w), per stage n blocks of two 3x3 convolutions, the
  # first block of stages 2 and 3 with a 1x1 projection of the shortcut.
  n = (depth - 2) // 6
  w = width
  expected = [(3, 3, 1, w)]
  for c_in, c in ((w, w), (w, 2 * w), (2 * w, 4 * w)):
    expected += [(3, 3, c_in, c), (3, 3, c, c)] + [(3, 3, c, c)] * (2 * (n - 1))
    if c_in != c:
      expected.append((1, 1, c_in, c))
  assert _conv_kernel_shapes(variables["params"]) == sorted(expected)
  assert variables["params"]["Dense_0"]["kernel"].shape == (4 * w, 10)


def test_the_default_network_is_resnet_14_of_width_16(clf):
  args = clf.parse_args([])
  assert (args.depth, args.width) == (14, 16)
  assert clf.resnet(args.depth, args.width) == clf.MODEL


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--depth", "12"], "--depth must be 6n+2"),
    (["--width", "0"], "--width must be at least 1"),
  ],
)
def test_bad_depth_or_width_is_refused_naming_the_flag(clf, capsys, flags, message):
  with pytest.raises(SystemExit):
    clf.parse_args(flags)
  assert message in capsys.readouterr().err


def test_make_task_trains_the_chosen_network(clf, data):
  args = clf.parse_args(
    ["--depth", "8", "--width", "4", "--batch-size", "16", "--data-dir", str(data)]
  )
  task = clf.make_task(args)
  params, batch_stats = task.init(jax.random.PRNGKey(0))
  assert params["Dense_0"]["kernel"].shape == (16, 10)
  loss, (new_stats, metrics) = task.loss_fn(params, batch_stats, task.example_batch)
  assert np.isfinite(float(loss)) and 0 <= float(metrics["accuracy"]) <= 1
  assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
  assert "ResNet-8 (width 4)" in task.description
