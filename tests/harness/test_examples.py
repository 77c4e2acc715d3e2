"""The examples run end to end on tiny data the test writes itself."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from example_helpers import finite_numbers, load_example
from data_files import write_split


def test_autoencoder_trains_all_seven_optimizers(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  write_split(data, "train", 64, compress=True)
  write_split(data, "test", 32, compress=False)
  out_dir = tmp_path / "out"
  demo = load_example("autoencoder")
  names = ["SGD", "AdamW", "Eva", "Eva-f", "Eva-s", "K-FAC", "Shampoo"]
  results = demo.main(
    ["--epochs", "1", "--batch-size", "32", "--data-dir", str(data), "--out", str(out_dir)]
  )
  out = capsys.readouterr().out
  assert [r.name for r in results] == names
  assert "nan" not in out.lower()

  table = (out_dir / "results.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  assert len(rows) == 1 + len(names)
  for name in names:
    assert f"| {name} |" in table
    assert any(line.split()[:1] == [name] for line in out.splitlines()), name  # printed too
  assert "nan" not in table.lower()
  # The printed summary: at most six short columns, their definitions below it.
  summary = out.splitlines()
  head_at = next(i for i, line in enumerate(summary) if line.startswith("optimizer "))
  assert summary[head_at].split() == ["optimizer", "lr", "final", "steps", "×", "SGD", "time"]
  assert "final  train loss (mean of the last 10 step losses) at the end" in out
  assert str(out_dir / "results.md") in out
  # One definition of SGD's final quality: the header's value is SGD's row's.
  cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
  head = cells(rows[0])
  what = "train loss (mean of the last 10 step losses)"
  steps_col = next(c for c in head if c.startswith(f"steps to SGD's final {what} = "))
  sgd_row = cells(next(r for r in rows if r.startswith("| SGD |")))
  assert sgd_row[head.index(f"final {what}")] == steps_col.rpartition("= ")[2]

  metrics = json.loads((out_dir / "metrics.json").read_text())
  assert metrics["target"]["definition"] == what
  assert list(metrics["optimizers"]) == names
  assert finite_numbers(metrics)
  for name, m in metrics["optimizers"].items():
    assert m["state_bytes"] > 0, name
    assert len(m["train"]["loss"]) == len(m["test"]["loss"]) == 1
    assert len(m["step_losses"]) == 2  # 64 images, batch 32
  # SGD reaches its own final training loss by construction.
  assert metrics["optimizers"]["SGD"]["time_to_target"] is not None
  assert metrics["machine"]["versions"]["eva_optax"]

  rows = (out_dir / "metrics.csv").read_text().splitlines()
  assert rows[0].split(",")[:3] == ["optimizer", "lr", "epoch"]
  assert [r.split(",")[0] for r in rows[1:]] == names
  for png in ("loss_vs_epoch.png", "loss_vs_time.png"):
    path = out_dir / png
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
  assert not (out_dir / "checkpoints").exists()  # only with --checkpoint


def test_autoencoder_optimizer_subset_and_flags():
  demo = load_example("autoencoder")
  from examples.harness import cli

  args = demo.parse_args(["--optimizers", "eva, kfac", "--lr-kfac", "0.01", "--out", "x"])
  assert [s.key for s in args.specs] == ["eva", "kfac"]
  task = demo.Task  # the learning rates resolve: flag, else --lr, else the default
  fake = task(
    name="t",
    init=None,
    loss_fn=None,
    eval_fn=None,
    train_epoch=None,
    test_batches=None,
    steps_per_epoch=1,
    example_batch=None,
    schedule=None,
    default_lrs=demo.LEARNING_RATES,
  )
  assert cli.learning_rate(args, "kfac", fake) == 0.01
  assert cli.learning_rate(args, "eva", fake) == 0.06
  args = demo.parse_args(["--lr", "0.2", "--lr-eva", "0.05"])
  assert cli.learning_rate(args, "sgd", fake) == 0.2
  assert cli.learning_rate(args, "eva", fake) == 0.05
  assert args.out == "results/demo"


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--optimizers", "eva,adam"], "--optimizers: unknown"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--damping", "-1"], "--damping must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--chunk", "0"], "--chunk must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must be at least 0"),
    (["--validation-fraction", "1"], "--validation-fraction must lie in [0, 1)"),
  ],
)
def test_bad_flags_are_refused_naming_the_flag(argv, message, capsys):
  demo = load_example("autoencoder")
  with pytest.raises(SystemExit):
    demo.parse_args(argv)
  assert message in capsys.readouterr().err


def test_a_validation_split_is_held_out_of_the_training_images(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  train, _ = write_split(data, "train", 64, compress=False)
  write_split(data, "test", 32, compress=False, seed=1)
  demo = load_example("autoencoder")
  argv = ["--data-dir", str(data), "--batch-size", "16"]
  task = demo.make_task(demo.parse_args(argv + ["--validation-fraction", "0.25"]))
  assert task.eval_split == "validation" and task.steps_per_epoch == 3  # 48 // 16
  seen = np.concatenate(list(task.train_epoch(np.random.default_rng(0))))
  held = np.concatenate(list(task.test_batches()))
  assert len(seen) == 48 and len(held) == 16
  pixels = {row.tobytes() for row in train.reshape(64, -1).astype(np.float32) / 255.0}
  rows = lambda a: {r.tobytes() for r in a}
  assert rows(held) <= pixels and rows(seen) <= pixels and not rows(held) & rows(seen)
  plain = demo.make_task(demo.parse_args(argv))
  assert plain.eval_split == "test" and len(np.concatenate(list(plain.test_batches()))) == 32
  assert "12 train" not in plain.description and "16 validation images" in task.description


def test_resume_continues_an_interrupted_run_bit_identically(tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  write_split(data, "train", 96, compress=False)
  write_split(data, "test", 32, compress=False)
  demo = load_example("autoencoder")
  from examples.harness import training

  argv = [
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--data-dir",
    str(data),
    "--optimizers",
    "eva,kfac",
  ]
  whole = demo.main(argv + ["--out", str(tmp_path / "whole")])

  save = training.save_checkpoint  # as the Trainer imports it
  saves = []

  def interrupted(*args, **kwargs):  # the run stops after the second epoch's checkpoint
    save(*args, **kwargs)
    saves.append(1)
    if len(saves) == 2:
      raise KeyboardInterrupt

  monkeypatch.setattr(training, "save_checkpoint", interrupted)
  with pytest.raises(KeyboardInterrupt):
    demo.main(argv + ["--out", str(tmp_path / "cut"), "--checkpoint"])
  assert len(saves) == 2 and not (tmp_path / "whole" / "checkpoints").exists()
  monkeypatch.setattr(training, "save_checkpoint", save)
  resumed = demo.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])
  for a, b in zip(whole, resumed):
    assert a.step_losses == b.step_losses, a.name  # same batches, same states
    assert a.test == b.test and a.train == b.train, a.name
    assert len(b.epoch_times) == 3

  # A checkpoint made with other settings is refused, naming them.
  with pytest.raises(SystemExit, match="batch_size=32"):
    demo.main(
      [
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--data-dir",
        str(data),
        "--optimizers",
        "eva",
        "--out",
        str(tmp_path / "cut"),
        "--resume",
      ]
    )


def test_resume_fingerprint_holds_every_setting_but_output_and_selection():
  from examples.harness import cli

  args = argparse.Namespace(
    epochs=3,
    batch_size=8,
    depth=20,
    schedule="step",
    lr=None,
    lr_eva=0.1,
    out="x",
    resume=True,
    checkpoint=False,
    no_checkpoint=False,
    optimizers="eva",
    data_dir="/d",
    reach_window=10,
  )
  assert dict(cli.fingerprint(args)) == {
    "epochs": 3,
    "batch_size": 8,
    "depth": 20,
    "schedule": "step",
  }


@pytest.mark.parametrize(
  "flags, saves",
  [([], False), (["--no-checkpoint"], False), (["--checkpoint"], True), (["--resume"], True)],
)
def test_checkpoints_are_saved_only_when_asked(flags, saves):
  from examples.harness import cli

  args = load_example("autoencoder").parse_args(flags + ["--out", "o"])
  assert (cli.checkpoint_dir(args) is not None) == saves
  if saves:
    assert str(cli.checkpoint_dir(args)) == "o"


def test_checkpoint_and_no_checkpoint_together_are_refused(capsys):
  with pytest.raises(SystemExit):
    load_example("autoencoder").parse_args(["--checkpoint", "--no-checkpoint"])
  assert "not allowed with argument" in capsys.readouterr().err
