"""examples/sharded_lm.py: the decoder on a (data, model) mesh, Eva against AdamW.

Tiny runs (``--quick``: 6 steps, d_model 16, one layer) on a corpus the test writes. In one
process on the suite's 8 host devices: the table, the shardings, the collectives; a
checkpoint restored onto other meshes bit for bit; a run in two parts on two meshes equal
to a run in one. In two processes of 4 devices each (``jax.distributed``): the losses of
one process with 8 devices. The two processes are launched first and run while the
in-process tests do; every compilation has most XLA optimisations off (here and in the
subprocesses alike), which leaves the values as they are and halves compile times.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from example_helpers import load_example
from examples.harness import datasets, sharded

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 8
TIMEOUT_S = 180
SENTENCES = (
  "The quick brown fox jumps over the lazy dog. ",
  "A journey of a thousand miles begins with a single step.\n",
  "All that glitters is not gold; all who wander are not lost. ",
  "Time flies like an arrow, fruit flies like a banana.\n\n",
)

pytestmark = pytest.mark.skipif(
  jax.device_count() < DEVICES, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


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
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # as the quick_compiles fixture, in process
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }


# The two-process run's mesh: 'model' over all 8 devices, so across both processes.
ACROSS_PROCESSES = ("--mesh", "1x8", "--heads", "8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("".join(SENTENCES) * 20)  # about 4.5 KB
  return path


@pytest.fixture(scope="module")
def two_processes(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
  """2 processes × 4 devices, Eva and K-FAC, launched now: ``wait() -> [(rc, output, results)]``.

  Tensor parallel across the processes: a model-only mesh of 8 (8 heads), so that every
  layer's heads, MLP units and vocabulary are split over both processes' devices."""
  out = tmp_path_factory.mktemp("two-processes")
  port = _free_port()
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "examples.sharded_lm",
        "--quick",
        "--optimizers",
        "eva,kfac",
        *ACROSS_PROCESSES,
        "--corpus",
        str(corpus),
        "--out",
        str(out / "results-{process}.json"),
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
      ],
      env=_env(4),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]

  def wait() -> list[tuple[int, str, dict]]:
    finished = []
    try:
      for i, process in enumerate(processes):
        output = process.communicate(timeout=TIMEOUT_S)[0]
        path = out / f"results-{i}.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        finished.append((process.returncode, output, results))
    except subprocess.TimeoutExpired:
      pytest.fail(f"the two-process run did not finish in {TIMEOUT_S} s")
    return finished

  yield wait
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.communicate()


@pytest.fixture(scope="module")
def run(corpus, two_processes, quick_compiles, tmp_path_factory):
  """One process, 2x4 mesh, tensor parallel: Eva and AdamW, checkpoints saved."""
  directory = tmp_path_factory.mktemp("run")
  lm = load_example("sharded_lm")
  argv = [
    "--quick",
    "--optimizers",
    "eva,adamw",
    "--corpus",
    str(corpus),
    "--mesh",
    "2x4",
    "--parallelism",
    "tp",
    "--checkpoint-dir",
    str(directory / "checkpoints"),
    "--out",
    str(directory / "results.json"),
  ]
  results = lm.main(argv)
  return dict(
    lm=lm,
    results=results,
    directory=directory,
    record=json.loads((directory / "results.json").read_text()),
  )


def test_trains_eva_and_adamw_and_prints_the_table(run, capsys):
  lm, results = run["lm"], run["results"]
  assert [r["optimizer"] for r in results] == ["Eva", "AdamW"]
  for r in results:
    assert r["steps"] == 6 and len(r["losses"]) == 6
    assert all(math.isfinite(x) for x in r["losses"])
    assert math.isfinite(r["test_loss"]) and r["step_ms"] > 0
    assert r["train_loss"] == pytest.approx(np.mean(r["losses"]), rel=1e-6)
  assert results[0]["lr"] == 0.01 and results[1]["lr"] == 0.003  # the README's rule, char_lm's
  # The table, as printed.
  table = lm.table(results).splitlines()
  assert table[0].split()[:5] == ["optimizer", "lr", "train", "loss", "test"]
  assert table[2].startswith("Eva ") and table[3].startswith("AdamW ")
  record = run["record"]
  assert record["devices"] == DEVICES and record["processes"] == 1
  assert [r["losses"] for r in record["results"]] == [r["losses"] for r in results]


def test_eva_adds_few_collectives_to_adamws(run):
  eva, adamw = (r["collectives"] for r in run["results"])
  assert adamw["all-reduce"] > 0  # tensor parallelism communicates
  extra = sum(eva.values()) - sum(adamw.values())
  assert 0 <= extra <= 4, (eva, adamw)


def test_params_and_state_live_on_the_mesh_as_the_rules_say(run):
  eva = run["results"][0]
  query = eva["params"]["block0"]["attention"]["query"]["kernel"]  # (embed, heads, kv)
  assert query.sharding.spec == P(None, "model", None)
  assert query.sharding.mesh.shape == {"data": 2, "model": 4}
  for leaf in jax.tree.leaves(eva["opt_state"]) + jax.tree.leaves(run["results"][1]["opt_state"]):
    assert isinstance(leaf.sharding, NamedSharding)
    assert leaf.sharding.mesh.shape == {"data": 2, "model": 4}
  adam_mu = run["results"][1]["opt_state"][0].mu["block0"]["attention"]["query"]["kernel"]
  assert adam_mu.sharding.spec == query.sharding.spec  # AdamW's moments like the params


@pytest.mark.parametrize("mesh,parallelism", [("8x1", "fsdp"), ("4x2", "tp")])
def test_checkpoint_restores_onto_another_mesh_bit_for_bit(run, corpus, mesh, parallelism):
  lm = run["lm"]
  args = lm.parse_args(
    ["--quick", "--corpus", str(corpus), "--mesh", mesh, "--parallelism", parallelism]
  )
  other = sharded.make_mesh(args.mesh_shape)
  vocab = run["results"][0]["params"]["embed"]["embedding"].shape[0]
  setup = lm.make_setup(args, other, sharded.RULES[parallelism], vocab)
  for key, saved in zip(("eva", "adamw"), run["results"]):
    _, tx, state_sharding = lm.make_optimizer(setup, key, args)
    abstract_state = jax.eval_shape(tx.init, setup.abstract_params)
    params, opt_state, step, meta = lm.restore(
      run["directory"] / "checkpoints" / key,
      setup.abstract_params,
      abstract_state,
      setup.param_sharding,
      state_sharding,
    )
    assert step == 6 and meta["losses"] == saved["losses"]
    for name, restored, original in (
      ("params", params, saved["params"]),
      ("opt_state", opt_state, saved["opt_state"]),
    ):
      assert jax.tree.structure(restored) == jax.tree.structure(original), name
      for r, o in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
        assert r.sharding.mesh.shape == dict(zip(("data", "model"), args.mesh_shape))
        assert np.array_equal(np.asarray(r), np.asarray(o)), (key, name)
    if parallelism == "fsdp":  # the embed axis over data now
      assert params["head"]["kernel"].sharding.spec == P("data", None)


def test_a_run_in_two_parts_on_two_meshes_equals_one_run(run, corpus, tmp_path, capsys):
  lm = run["lm"]
  common = [
    "--quick",
    "--optimizers",
    "eva",
    "--corpus",
    str(corpus),
    "--checkpoint-dir",
    str(tmp_path),
  ]
  first = lm.main(common + ["--mesh", "2x4", "--stop-at", "3"])[0]
  assert first["steps"] == 3
  second = lm.main(common + ["--mesh", "8x1", "--parallelism", "fsdp", "--resume"])[0]
  assert "Eva: resumed at step 3" in capsys.readouterr().out
  whole = run["results"][0]["losses"]
  assert second["losses"][:3] == first["losses"] == whole[:3]  # the same compiled mesh
  np.testing.assert_allclose(second["losses"], whole, rtol=1e-5)
  with pytest.raises(SystemExit, match="other settings"):
    lm.main(common + ["--resume", "--lr", "0.03"])


def test_two_processes_give_the_losses_of_one(run, two_processes, corpus):
  finished = two_processes()
  one = run["lm"].main(
    ["--quick", "--optimizers", "eva,kfac", *ACROSS_PROCESSES, "--corpus", str(corpus)]
  )
  for i, (rc, output, results) in enumerate(finished):
    assert rc == 0, output
    assert f"[process {i}] Eva" in output and f"[process {i}] K-FAC" in output
    assert results["processes"] == 2 and results["devices"] == DEVICES
    # K-FAC: its inverses computed by their owners across both processes.
    for got, want in zip(results["results"], one):
      np.testing.assert_allclose(
        got["losses"], want["losses"], rtol=1e-5, err_msg=want["optimizer"]
      )


def test_flags_are_checked():
  lm = load_example("sharded_lm")
  with pytest.raises(SystemExit):  # 2 heads cannot split over a model axis of 4
    lm.parse_args(["--quick", "--heads", "2"])
  with pytest.raises(SystemExit):
    lm.parse_args(["--optimizers", "eva,lion"])
  with pytest.raises(SystemExit):
    lm.parse_args(["--mesh", "3x4", "--batch-size", "8"])
  args = lm.parse_args(["--quick", "--steps", "9"])
  assert (args.steps, args.d_model, args.mesh_shape) == (9, 16, (2, 4))
  assert lm.padded_vocabulary(113, 4) == 120 and lm.padded_vocabulary(113, 16) == 128


def test_without_a_corpus_it_reads_the_readme(monkeypatch, tmp_path):
  lm = load_example("sharded_lm")
  # text_corpus reads the folder from its own module: patch it there (the package's
  # re-export alone leaves an installed fortunes package in use).
  monkeypatch.setattr(datasets.text, "FORTUNES_DIR", tmp_path / "no-fortunes")
  monkeypatch.delenv(datasets.CORPUS_ENV_VAR, raising=False)
  train, test, vocab, description = lm.load_text(None)
  assert "README.md" in description and len(train) > 8 * len(test) > 0 and vocab > 50
