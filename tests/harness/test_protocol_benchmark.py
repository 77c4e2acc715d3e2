"""benchmarks/protocol.py's command line: a recorded tuning (--tuning-from) is checked
against the workload and handed to the protocol (whose reading of it
tests/harness/test_harness_protocol.py runs)."""

from __future__ import annotations

import json

import pytest

from benchmarks import protocol
from examples.harness.protocol_search import RecordMismatch


@pytest.fixture
def calls(monkeypatch):
  """protocol.main's calls of run_protocol, recorded instead of run; each writes a
  protocol.json holding its settings and a trial-less tuning of each optimizer."""
  seen = []

  def run_protocol(make_task, specs, settings_of_protocol, base, epochs, out, **kw):
    seen.append(kw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.md").write_text("# tiny\n")
    tuning = {spec.name: {"key": spec.key} for spec in specs}
    document = {"settings": kw["settings"], "protocol": {}, "tuning": tuning}
    (out / "protocol.json").write_text(json.dumps(document))
    return seen

  monkeypatch.setattr(protocol, "run_protocol", run_protocol)
  return seen


def test_a_recorded_tuning_is_handed_on_only_for_the_same_workload(tmp_path, calls):
  quick = ["--quick", "--optimizers", "sgd"]
  protocol.main(quick + ["--out", str(tmp_path / "a")])
  assert calls[0]["recorded"] is None and calls[0]["tune_only"] is False
  recorded = tmp_path / "a" / "protocol.json"
  protocol.main(
    quick + ["--seeds", "0,1", "--tuning-from", str(recorded), "--out", str(tmp_path / "b")]
  )
  assert calls[1]["recorded"] == json.loads(recorded.read_text())
  assert calls[1]["settings"]["tuning_from"] == str(recorded)
  protocol.main(quick + ["--tune-only", "--out", str(tmp_path / "t")])
  assert calls.pop()["tune_only"] is True
  # Other optimizers and seeds are the protocol's to check; another workload is refused.
  protocol.main(
    [
      "--quick",
      "--optimizers",
      "sgd,eva",
      "--tuning-from",
      str(recorded),
      "--out",
      str(tmp_path / "c"),
    ]
  )
  with pytest.raises(SystemExit, match="tuned with train_limit = 2000, this run has 1000"):
    protocol.main(
      quick
      + [
        "--tuning-from",
        str(recorded),
        "--out",
        str(tmp_path / "d"),
        "--",
        "--train-limit",
        "1000",
      ]
    )
  with pytest.raises(SystemExit, match="tuned with batch_size = 1000, this run has 128"):
    protocol.main(
      [
        "--quick",
        "--workload",
        "classifier",
        "--optimizers",
        "sgd",
        "--tuning-from",
        str(recorded),
        "--out",
        str(tmp_path / "d"),
      ]
    )
  with pytest.raises(SystemExit, match="cannot read it"):
    protocol.main(quick + ["--tuning-from", str(tmp_path / "none.json")])
  (tmp_path / "other.json").write_text("{}")
  with pytest.raises(SystemExit, match="not a protocol.json"):
    protocol.main(quick + ["--tuning-from", str(tmp_path / "other.json")])
  assert len(calls) == 3 and not (tmp_path / "d").exists()


def test_a_recorded_tuning_that_does_not_fit_exits_naming_it(tmp_path, monkeypatch):
  def refuse(*args, **kw):
    raise RecordMismatch("the recorded tuning has no AdamW")

  monkeypatch.setattr(protocol, "run_protocol", refuse)
  document = tmp_path / "protocol.json"
  args = protocol.parse_args(["--quick", "--optimizers", "sgd"])
  assert args.tuning_from is None
  monkeypatch.setattr(protocol, "read_recorded", lambda path, settings: {"tuning": {}})
  with pytest.raises(SystemExit, match=f"--tuning-from {document}: the recorded tuning has no"):
    protocol.main(["--quick", "--tuning-from", str(document), "--out", str(tmp_path / "x")])
  with pytest.raises(ValueError, match="no AdamW"):  # without --tuning-from: not rewritten
    protocol.main(["--quick", "--out", str(tmp_path / "x")])


def test_several_recorded_tunings_are_merged_by_optimizer(tmp_path, calls):
  quick = ["--quick", "--optimizers", "sgd"]
  protocol.main(quick + ["--tune-only", "--out", str(tmp_path / "a")])
  protocol.main(quick + ["--tune-only", "--out", str(tmp_path / "b")])
  a, b = (tmp_path / name / "protocol.json" for name in "ab")
  with pytest.raises(SystemExit, match="two of the recorded tunings tuned SGD"):
    protocol.main(quick + ["--tuning-from", f"{a},{b}", "--out", str(tmp_path / "x")])
  document = json.loads(b.read_text())
  document["tuning"] = {"Eva": {"key": "eva", "chosen": {"lr": 0.1}}}
  b.write_text(json.dumps(document))
  protocol.main(
    [
      "--quick",
      "--optimizers",
      "sgd,eva",
      "--tuning-from",
      f"{a},{b}",
      "--out",
      str(tmp_path / "c"),
    ]
  )
  merged = calls[-1]["recorded"]
  assert merged["tuning"] == {"SGD": {"key": "sgd"}, "Eva": document["tuning"]["Eva"]}
  assert calls[-1]["settings"]["tuning_from"] == f"{a},{b}"
  document["protocol"] = {"tune_fraction": 0.5}
  b.write_text(json.dumps(document))
  with pytest.raises(SystemExit, match="differ in tune_fraction: None and 0.5"):
    protocol.main(quick + ["--tuning-from", f"{a},{b}", "--out", str(tmp_path / "y")])
  # Each record is checked against this run's workload, as one is.
  document["settings"] = {**document["settings"], "train_limit": 1000}
  b.write_text(json.dumps(document))
  with pytest.raises(SystemExit, match=f"--tuning-from {b}: it was tuned with train_limit"):
    protocol.main(quick + ["--tuning-from", f"{a},{b}", "--out", str(tmp_path / "z")])
  assert len(calls) == 3


def test_a_tuning_per_optimizer_resumes_and_reads_back_as_one(tmp_path, calls):
  flags = ["--quick", "--optimizers", "sgd,eva", "--tune-only", "--per-optimizer"]
  out = tmp_path / "t"
  protocol.main(flags + ["--out", str(out)])
  assert [c["tune_only"] for c in calls] == [True, True]
  assert sorted(p.parent.name for p in out.glob("*/protocol.json")) == ["eva", "sgd"]
  (out / "eva" / "protocol.json").unlink()  # stopped during Eva's tuning: Eva alone again
  protocol.main(flags + ["--out", str(out)])
  assert len(calls) == 3 and json.loads((out / "eva" / "protocol.json").read_text())["tuning"] == {
    "Eva": {"key": "eva"}
  }
  protocol.main(
    ["--quick", "--optimizers", "sgd,eva", "--tuning-from", str(out), "--out", str(tmp_path / "f")]
  )
  assert calls[-1]["recorded"]["tuning"] == {"Eva": {"key": "eva"}, "SGD": {"key": "sgd"}}
  with pytest.raises(SystemExit, match="without <optimizer>/protocol.json"):
    protocol.main(["--quick", "--tuning-from", str(tmp_path / "f"), "--out", str(tmp_path / "g")])
  with pytest.raises(SystemExit):  # a record per optimizer is a tuning's
    protocol.parse_args(["--quick", "--per-optimizer"])


def test_budgets_without_the_whole_one_are_refused_before_any_run(capsys):
  with pytest.raises(SystemExit):
    protocol.parse_args(["--quick", "--budgets", "0.25,0.5"])
  assert "must end with the whole budget 1" in capsys.readouterr().err
