"""The convergence benchmark's summaries: medians over seeds and the headline ratios."""

from __future__ import annotations

import pytest


def _load():
  from benchmarks import convergence

  return convergence


def _result(Result, key, name, t, loss, epochs=(2.0, 2.0)):
  return Result(
    key,
    name,
    0.1,
    state_bytes=2**20,
    epoch_times=list(epochs),
    train={"loss": [loss + 1, loss]},
    test={"loss": [loss], "accuracy": [0.5]},
    time_to_target=t,
  )


def test_summary_takes_medians_over_seeds_and_counts_misses():
  conv = _load()
  R = conv.Result
  runs = [
    [
      _result(R, "sgd", "SGD", 10.0, 0.3),
      _result(R, "eva", "Eva", 4.0, 0.2),
      _result(R, "kfac", "K-FAC", 8.0, 0.2),
      _result(R, "shampoo", "Shampoo", None, 0.4),
    ],
    [
      _result(R, "sgd", "SGD", 20.0, 0.5),
      _result(R, "eva", "Eva", 12.0, 0.4),
      _result(R, "kfac", "K-FAC", 24.0, 0.2),
      _result(R, "shampoo", "Shampoo", 40.0, 0.4),
    ],
    [
      _result(R, "sgd", "SGD", 10.0, 0.4),
      _result(R, "eva", "Eva", 5.0, 0.1),
      _result(R, "kfac", "K-FAC", 10.0, 0.2),
      _result(R, "shampoo", "Shampoo", 30.0, 0.4),
    ],
  ]
  s = conv.summarise(runs)
  assert s["Eva"]["ratio_to_sgd"] == pytest.approx(0.5)  # median of 0.4, 0.6, 0.5
  assert s["Eva"]["time_to_target_s"] == 5.0
  assert s["Eva"]["final_train_loss"] == pytest.approx(0.2)
  assert s["Shampoo"]["reached"] == 2 and s["Shampoo"]["seeds"] == 3
  assert s["Shampoo"]["ratio_to_sgd"] == pytest.approx(2.5)  # median of 2.0, 3.0
  assert s["SGD"]["ratio_to_sgd"] == 1.0
  assert s["SGD"]["seconds_per_epoch"] == 2.0
  h = conv.headline(runs)
  assert h["eva_reached"] == 3
  assert h["eva_over_sgd"] == pytest.approx(0.5)
  assert h["eva_over_kfac"] == pytest.approx(0.5)  # 0.5, 0.5, 0.5
  assert h["eva_over_shampoo"] == pytest.approx((0.3 + 1 / 6) / 2)  # seed 0: not reached
  assert (
    "| Fashion-MNIST autoencoder (3 epochs, batch 1000) | 3 of 3 seeds | 0.50 | 0.50 | 0.23 |"
    in (conv.headline_table({"autoencoder": h}, {"autoencoder": 3}))
  )
  table = conv.workload_table(s)
  assert "| Eva | 0.1 | 0.2 | 0.2 | 0.5000 | 2.0 | 5.0 | 0.50 | 3/3 | 1.0 |" in table
  assert "| Shampoo |" in table and "2/3" in table


def test_readme_block_is_replaced_and_missing_markers_are_an_error(tmp_path):
  conv = _load()
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- convergence:start -->\nold\n<!-- convergence:end -->\nrest\n")
  conv.update_readme(readme, "| new |\n")
  assert readme.read_text() == (
    "intro\n<!-- convergence:start -->\n| new |\n<!-- convergence:end -->\nrest\n"
  )
  (tmp_path / "plain.md").write_text("no markers\n")
  with pytest.raises(SystemExit, match="convergence:start"):
    conv.update_readme(tmp_path / "plain.md", "x")


def test_unknown_workload_is_refused(capsys):
  conv = _load()
  with pytest.raises(SystemExit):
    conv.parse_args(["--workloads", "autoencoder,mnist"])
  assert "--workloads: unknown ['mnist']" in capsys.readouterr().err
