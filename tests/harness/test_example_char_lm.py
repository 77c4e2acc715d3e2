"""The character-level language-model example on a tiny corpus the test writes itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from example_helpers import finite_numbers, load_example


SENTENCES = (
  "The quick brown fox jumps over the lazy dog. ",
  "A journey of a thousand miles begins with a single step.\n",
  "All that glitters is not gold; all who wander are not lost. ",
  "Time flies like an arrow, fruit flies like a banana.\n\n",
)


def _write_corpus(tmp_path: Path) -> Path:
  path = tmp_path / "corpus.txt"
  path.write_text("".join(SENTENCES) * 20)  # about 4.5 KB
  return path


SMALL = [
  "--seq-len",
  "16",
  "--d-model",
  "32",
  "--layers",
  "2",
  "--heads",
  "2",
  "--batch-size",
  "4",
  "--steps-per-epoch",
  "5",
  "--epochs",
  "1",
]


def test_char_lm_trains_sgd_eva_kfac_muon(tmp_path, capsys):
  corpus = _write_corpus(tmp_path)
  out_dir = tmp_path / "out"
  lm = load_example("char_lm")
  results = lm.main(
    SMALL
    + [
      "--corpus",
      str(corpus),
      "--optimizers",
      "sgd,eva,kfac,muon",
      "--eval-batches",
      "3",
      "--out",
      str(out_dir),
    ]
  )
  out = capsys.readouterr().out
  names = ["SGD", "Eva", "K-FAC", "Muon"]  # Muon: the scanned DenseGeneral kernels
  assert [r.name for r in results] == names
  assert str(corpus) in out and "nan" not in out.lower()
  # 3 eval batches of 4 windows of 16 characters fit in the ~450 test characters.
  assert "(12 test windows)" in out

  for r in results:
    assert r.steps == 5 and len(r.step_losses) == 5, r.name
    assert not r.diverged, r.name
    loss, bpc = r.test["loss"][-1], r.test["bits_per_char"][-1]
    assert math.isfinite(loss) and math.isfinite(bpc), r.name
    assert bpc == pytest.approx(loss / math.log(2), rel=1e-6), r.name
    assert math.isfinite(r.train["loss"][-1]), r.name

  for name in (
    "results.md",
    "metrics.json",
    "metrics.csv",
    "loss_vs_epoch.png",
    "loss_vs_time.png",
  ):
    assert (out_dir / name).is_file(), name
  metrics = json.loads((out_dir / "metrics.json").read_text())
  assert list(metrics["optimizers"]) == names
  assert finite_numbers(metrics)
  assert metrics["target"]["metric"] == "test_loss"
  assert metrics["optimizers"]["SGD"]["time_to_target"] is not None
  table = (out_dir / "results.md").read_text()
  assert "final test bits_per_char" in table and "final test loss" in table
  for name in names:
    assert f"| {name} |" in table
  assert not (out_dir / "checkpoints").exists()  # only with --checkpoint


def test_loss_fn_is_the_mean_next_character_cross_entropy():
  lm = load_example("char_lm")
  from examples.harness.models import CharTransformer

  vocab, batch, seq_len = 11, 3, 8
  model = CharTransformer(
    vocab=vocab, d_model=16, num_heads=2, mlp_dim=32, num_layers=2, max_len=seq_len
  )
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, vocab, (batch, seq_len)).astype(np.int32)
  targets = rng.integers(0, vocab, (batch, seq_len)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), inputs)["params"]
  loss_fn = lm.make_loss_fn(model)
  eval_fn = lm.make_eval_fn(loss_fn)

  @jax.jit
  def everything(params):  # one compilation for the three
    batch = (inputs, targets)
    return (
      loss_fn(params, {}, batch),
      model.apply({"params": params}, inputs),
      eval_fn(params, {}, batch),
    )

  (loss, (state, metrics)), logits, evaluated = everything(params)
  assert state == {} and metrics == {}

  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  expected = -picked.mean()
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(evaluated["loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(evaluated["bits_per_char"]) == pytest.approx(expected / math.log(2), rel=1e-5)


def test_eval_windows_are_the_first_non_overlapping_windows():
  lm = load_example("char_lm")
  ids = np.arange(50)
  x, y = lm.eval_windows(ids, 16, max_windows=10)
  assert x.shape == y.shape == (3, 16)  # (50 - 1) // 16 windows
  np.testing.assert_array_equal(x[:, 0], [0, 16, 32])
  np.testing.assert_array_equal(y, x + 1)
  assert lm.eval_windows(ids, 16, max_windows=2)[0].shape == (2, 16)


def test_limits_count_characters(tmp_path):
  lm = load_example("char_lm")
  corpus = _write_corpus(tmp_path)
  args = lm.parse_args(
    SMALL + ["--corpus", str(corpus), "--train-limit", "1000", "--test-limit", "100"]
  )
  _, vocabulary, train_ids, test_ids = lm.load_corpus(args)
  assert len(train_ids) == 1000 and len(test_ids) == 100
  assert set(vocabulary) == set("".join(SENTENCES))
  task = lm.make_task(args)
  assert task.steps_per_epoch == 5  # capped; the whole pass would be 999 // 64 = 15
  assert task.target.metric == "test_loss"
  # A validation split: the last 10% of the (limited) train split, the test split unread.
  held = lm.parse_args(
    SMALL + ["--corpus", str(corpus), "--train-limit", "1000", "--validation-fraction", "0.1"]
  )
  _, _, held_train, held_out = lm.load_corpus(held)
  np.testing.assert_array_equal(held_train, train_ids[:900])
  np.testing.assert_array_equal(held_out, train_ids[900:])
  assert lm.make_task(held).eval_split == "validation"


def test_missing_corpus_exits_naming_it(tmp_path):
  lm = load_example("char_lm")
  missing = tmp_path / "no_such_corpus.txt"
  with pytest.raises(SystemExit) as info:
    lm.main(SMALL + ["--corpus", str(missing), "--out", str(tmp_path / "out")])
  message = str(info.value)
  assert str(missing) in message
  assert "apt-get install fortunes" in message


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--heads", "3"], "--heads 3 must divide --d-model 128"),
    (["--seq-len", "0"], "--seq-len must be at least 1"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1"),
  ],
)
def test_bad_model_flags_are_refused(argv, message, capsys):
  lm = load_example("char_lm")
  with pytest.raises(SystemExit):
    lm.parse_args(argv)
  assert message in capsys.readouterr().err
