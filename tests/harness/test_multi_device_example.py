"""examples/multi_device.py runs data-parallel on 8 CPU devices, in one process and in two.

Each run is a subprocess (the number of CPU devices is fixed by ``XLA_FLAGS`` before JAX
starts) on tiny IDX files written by the test, with a time limit so that a hang (for
instance a process waiting for its peer) fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_files import write_split

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
TRAIN_SIZE, TEST_SIZE, BATCH_SIZE = 64, 32, 32


def _env(devices: int) -> dict[str, str]:
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {
    **os.environ,
    "XLA_FLAGS": " ".join(flags),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }


def _command(data_dir: Path, out: Path, optimizer: str, *extra: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "examples.multi_device",  # run from ROOT
    "--optimizer",
    optimizer,
    "--epochs",
    "1",
    "--batch-size",
    str(BATCH_SIZE),
    "--data-dir",
    str(data_dir),
    "--out",
    str(out),
    *extra,
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  directory = tmp_path_factory.mktemp("fashion-mnist")
  write_split(directory, "train", TRAIN_SIZE, compress=True)
  write_split(directory, "test", TEST_SIZE, compress=False)
  return directory


@pytest.fixture(scope="module")
def one_process(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
  """``run(optimizer) -> (stdout, metrics)`` of 1 process x 8 devices, each run once."""
  runs: dict[str, tuple[str, dict]] = {}

  def run(optimizer: str) -> tuple[str, dict]:
    if optimizer not in runs:
      out = tmp_path_factory.mktemp(f"one-process-{optimizer}") / "metrics.json"
      result = subprocess.run(
        _command(data_dir, out, optimizer),
        env=_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
      )
      assert result.returncode == 0, result.stdout + result.stderr
      runs[optimizer] = result.stdout, json.loads(out.read_text())
    return runs[optimizer]

  return run


@pytest.mark.parametrize("optimizer", ["sgd", "eva"])
def test_one_process_trains_on_eight_devices(one_process, optimizer: str):
  stdout, metrics = one_process(optimizer)
  assert "over 8 devices" in stdout and "test accuracy" in stdout
  assert metrics["optimizer"] == optimizer
  assert metrics["devices"] == 8 and metrics["processes"] == 1
  assert metrics["steps_per_epoch"] == TRAIN_SIZE // BATCH_SIZE
  assert len(metrics["epochs"]) == 1
  assert 0.0 < metrics["final_train_loss"] < 10.0  # finite, not diverged
  assert 0.0 <= metrics["final_test_accuracy"] <= 1.0


def test_two_processes_agree_with_one(data_dir: Path, tmp_path: Path, one_process):
  """2 processes x 4 devices: both finish with the loss of 1 process x 8 devices."""
  port = _free_port()
  processes = [
    subprocess.Popen(
      _command(
        data_dir,
        tmp_path / "metrics-{process}.json",
        "eva",
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(process_id),
      ),
      env=_env(4),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for process_id in range(2)
  ]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for process in processes:
      process.kill()
    pytest.fail(f"two-process run did not finish in {TIMEOUT_S} s: {outputs}")
  for process_id, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, f"process {process_id}:\n{output}"
    assert f"[process {process_id}]" in output and "over 8 devices" in output

  metrics = [json.loads((tmp_path / f"metrics-{i}.json").read_text()) for i in range(2)]
  for m in metrics:
    assert m["devices"] == 8 and m["processes"] == 2 and m["devices_per_process"] == 4
  assert metrics[0]["final_train_loss"] == metrics[1]["final_train_loss"]
  assert metrics[0]["final_test_accuracy"] == metrics[1]["final_test_accuracy"]
  _, one = one_process("eva")
  assert metrics[0]["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
