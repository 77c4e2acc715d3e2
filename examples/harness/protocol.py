"""The tuning protocol: every optimizer tuned the same way, then trained on several seeds.

1. **Tuning**, on a validation split held out of the training set
   (``Protocol.validation_fraction`` of it, the same samples for every point; the test set
   is not read), each point a whole schedule over ``Protocol.tune_fraction`` of the
   budget's steps, from the initial parameters and batches of seed ``tune_seed``:

   a. learning rate: ``lr_points`` (at least 5) values, log-spaced by ``lr_step`` (half a
      decade), centred on the example's own rate for the optimizer; when the best is at an
      edge, the grid grows past it one point at a time, at most ``max_extensions`` times;
   b. damping, for the optimizers that take one (Eva, Eva-f, Eva-s, K-FAC, FOOF, Shampoo):
      ``damping_factors`` × its default, at the chosen learning rate;
   c. KL clip, for Eva (``kl_clip_for``): ``kl_clip_factors`` × its default, at the chosen
      learning rate and damping;
   d. the confirmation, after each of a, b and c: the ``confirm_top`` (2) best points of
      that grid by their short-budget score (the choice so far among them) run again over
      the whole budget, on the same validation split and seed, and the best there is the
      stage's choice (a point already run so is not run again; ``confirm_top`` 0: the
      short-budget best, as before the stage existed). A short budget can favour a rate
      that a whole schedule does not (SGD's 0.316 against 0.1 on the character LM).

   A point's score is the validation value of the task's target metric at the end of its
   run (the validation loss where the target is the training loss). A diverged run scores
   worst; of equal scores the point tried first wins.
2. **Final runs**: every optimizer with its chosen values on the whole training set, the
   whole budget, evaluated on the test set, once per seed of ``seeds``, all interleaved;
   beside them the paper's recipe, "as published" (``Task.published_lrs``; by default the
   CIFAR recipe's single learning rate 0.1 for SGD, K-FAC and Eva), with the default
   damping and KL clip.
3. **Budget to quality** (:func:`budget_summary`): the tuned values again, each time with a
   whole schedule over ``budgets`` (25, 50, 75 and 100 %) of the budget (SGD's epochs),
   seeds ``budget_seeds``. Reported per optimizer: the shortest budget whose final quality
   reaches SGD's at the whole budget in the same seed, in steps and in training seconds and
   as ratios to SGD's whole budget -- the paper's "fewer epochs to the same accuracy" --
   next to the crossing measure of part 2 (the first step of the whole-budget run at SGD's
   final quality), which under one decaying schedule mostly measures the schedule.

The quality and the target follow one definition (:func:`examples.harness.targets.final_quality`):
the mean of the last ``window`` step losses for a training-loss target, the last evaluation
for a test metric. :func:`run_protocol` runs all three and writes ``protocol.md`` and
``protocol.json``, grids and chosen values included; ``benchmarks/protocol.py`` is its
command line. Given an earlier run's ``protocol.json`` (``recorded``), it reads part 1
from it (:func:`recorded_tuning`, which refuses a record tuned with other settings; a record
with the confirmation gives its confirmed choice, one without it its short-budget choice,
and protocol.md says which) and runs parts 2 and 3 only: more seeds without tuning again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import jax

from .protocol_records import recorded_tuning, write
from .protocol_search import Point, Protocol, Search, tune, validation_target
from .protocol_summary import budget_summary, summarise

from . import targets
from .optimizers import SPEC_BY_KEY, Options, Spec
from .records import from_json, jsonable
from .training import Result, RunConfig, Task, Trainer, interleave

# The Eva paper's CIFAR recipe: one learning rate for SGD, K-FAC and Eva.
PUBLISHED_LR = 0.1
PUBLISHED_KEYS = ("sgd", "kfac", "eva")


@dataclass(frozen=True)
class Row:
  """One optimizer setting of the final runs."""

  name: str
  spec: Spec
  point: Point
  variant: str = "tuned"  # "tuned" | "as published"


def rows_of(searches: dict[str, Search], task: Task) -> list[Row]:
  """The tuned rows (SGD first: it sets the target), then the "as published" ones."""
  tuned = [Row(s.spec.name, s.spec, s.best.point) for s in searches.values()]
  tuned.sort(key=lambda row: row.spec.key != "sgd")
  published = task.published_lrs or {k: PUBLISHED_LR for k in PUBLISHED_KEYS}
  return tuned + [
    Row(f"{SPEC_BY_KEY[k].name} (as published)", SPEC_BY_KEY[k], Point(lr), "as published")
    for k, lr in published.items()
  ]


@dataclass(frozen=True)
class RunStore:
  """The final runs finished so far, one JSON file per seed and budget in ``directory``,
  so that a protocol stopped midway resumes (``resume``) with the groups it finished.
  A group is read back only where its key -- the rows (names, optimizers, values), the
  seed, the steps and ``settings`` (the workload's) -- is the one it was written with.
  While a group runs, its trainers keep a checkpoint of each finished epoch
  (:meth:`checkpoints`), so that a group stopped midway resumes from its last epochs."""

  directory: Path
  settings: dict[str, Any]
  resume: bool = False

  def _path(self, seed: int, steps: int) -> Path:
    return self.directory / f"seed{seed}-steps{steps}.json"

  def _key(self, rows: Sequence[Row], seed: int, steps: int) -> Any:
    described = [[r.name, r.spec.key, r.variant, asdict(r.point)] for r in rows]
    return jsonable({"rows": described, "seed": seed, "steps": steps, "settings": self.settings})

  def load(self, rows: Sequence[Row], seed: int, steps: int) -> list[Result] | None:
    """The group's results as written, or None (not written, other key, or no ``resume``)."""
    path = self._path(seed, steps)
    if not self.resume or not path.is_file():
      return None
    written = json.loads(path.read_text())
    if written["key"] != self._key(rows, seed, steps):
      return None
    return [Result(**from_json(r)) for r in written["results"]]

  def save(self, rows: Sequence[Row], seed: int, steps: int, results: list[Result]) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    document = {"key": self._key(rows, seed, steps), "results": [asdict(r) for r in results]}
    self._path(seed, steps).write_text(json.dumps(jsonable(document)))
    shutil.rmtree(self.checkpoints(rows, seed, steps), ignore_errors=True)

  def checkpoints(self, rows: Sequence[Row], seed: int, steps: int) -> Path:
    """Where the group's trainers keep their epoch checkpoints while it runs (named by
    its key, so that another group never reads them; removed once the group is saved)."""
    key = json.dumps(self._key(rows, seed, steps), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return self.directory / f"seed{seed}-steps{steps}-{digest}"


def final_runs(
  task: Task,
  rows: Sequence[Row],
  seeds: Sequence[int],
  epochs: int,
  base: Options,
  *,
  eval_every: int = 0,
  chunk: int = 10,
  window: int = 10,
  fraction: float = 1.0,
  store: RunStore | None = None,
) -> list[list[Result]]:
  """Every row on ``task`` once per seed, interleaved, a whole schedule over ``fraction``
  of ``epochs``; the times to SGD's final quality of the same seed filled in. With
  ``store``, each seed's group is kept as it finishes, and read back instead of run where
  the store resumes and holds it; a group stopped midway resumes from each trainer's last
  finished epoch (the clock counts training steps only, so its times stay comparable)."""
  runs = []
  steps = max(1, round(fraction * epochs * task.steps_per_epoch))
  for seed in seeds:
    kept = store.load(rows, seed, steps) if store else None
    if kept is not None:
      print(f"--- {task.name}: seed {seed}, {steps} steps: finished before, read back")
      runs.append(kept)
      continue
    params, model_state = task.init(jax.random.PRNGKey(seed))
    config = RunConfig(epochs=epochs, seed=seed, eval_every=eval_every, steps=steps)
    if store:  # every trainer checkpoints each epoch, and resumes from there
      kept_epochs = store.checkpoints(rows, seed, steps)
      if not store.resume:
        shutil.rmtree(kept_epochs, ignore_errors=True)
      config = replace(config, out=kept_epochs, resume=store.resume)
    print(f"--- {task.name}: seed {seed}, {steps} steps ({fraction:.0%} of the budget)")
    trainers = [
      Trainer(
        task,
        row.spec,
        row.point.lr,
        row.point.options(base),
        params,
        model_state,
        config,
        name=row.name,
        checkpoint_name=f"{i:02d}-{row.spec.key}-{row.variant.replace(' ', '-')}",
      )
      for i, row in enumerate(rows)
    ]
    results = interleave(trainers, chunk)
    targets.set_times_to_target(results, task.target, window)
    if store:
      store.save(rows, seed, steps, results)
    runs.append(results)
  return runs


@dataclass
class Outcome:
  """Everything :func:`run_protocol` measured."""

  searches: dict[str, Search]
  rows: list[Row]
  runs: list[list[Result]]
  summary: dict[str, Any]
  sgd_value: dict[str, float] | None
  budgets: dict[str, Any] = field(default_factory=dict)  # budget_summary's; {}: not run
  recorded: bool = False  # the tuning read from an earlier run's record, not run


def run_protocol(
  make_task: Callable[[float], Task],
  specs: Sequence[Spec],
  protocol: Protocol,
  base: Options,
  epochs: int,
  out: Path,
  *,
  title: str,
  eval_every: int = 0,
  chunk: int = 10,
  window: int = 10,
  settings: dict[str, Any] | None = None,
  recorded: dict[str, Any] | None = None,
  tune_only: bool = False,
  resume: bool = False,
) -> Outcome:
  """The three parts of the protocol (the third when ``protocol.budgets`` holds a
  fraction below 1); writes ``protocol.md``, ``protocol.json`` and, per seed, the example's
  report of the final runs (``seed<n>/``) into ``out``. With ``recorded`` (an earlier
  run's ``protocol.json``), part 1 is read from it (:func:`recorded_tuning`) instead of
  run. With ``tune_only``, part 1 alone: its record is a ``protocol.json`` that a later
  run's ``recorded`` takes, so that a long protocol can be split across sessions. Each
  seed's final runs (and each budget's) are kept in ``out/runs/`` as they finish; with
  ``resume``, those of the same rows and ``settings`` (but for its ``command``) are read
  back instead of run, so that a protocol stopped midway goes on where it stopped."""
  task = make_task(0.0)
  budget_steps = epochs * task.steps_per_epoch
  tune_steps = protocol.tune_steps(budget_steps)
  if recorded is None:
    searches = tune(make_task, specs, protocol, base, budget_steps, chunk)
  else:
    searches = recorded_tuning(
      recorded,
      specs,
      protocol,
      validation_target(task.target).higher_is_better,
      tune_steps,
      budget_steps,
    )
  if tune_only:
    outcome = Outcome(searches, [], [], {}, None)
  else:
    kept = {k: v for k, v in (settings or {}).items() if k != "command"}
    store = RunStore(out / "runs", kept, resume)
    outcome = _final_part(task, searches, protocol, base, epochs, eval_every, chunk, window, store)
  outcome.recorded = recorded is not None
  write(
    outcome,
    task,
    protocol,
    out,
    title=title,
    epochs=epochs,
    window=window,
    tune_steps=tune_steps,
    settings=settings or {},
  )
  return outcome


def _final_part(
  task: Task,
  searches: dict[str, Search],
  protocol: Protocol,
  base: Options,
  epochs: int,
  eval_every: int,
  chunk: int,
  window: int,
  store: RunStore,
) -> Outcome:
  """Parts 2 and 3: the tuned and published rows over the whole budget on every seed,
  then, with a budget below 1, the tuned rows over shorter whole schedules."""
  rows = rows_of(searches, task)
  runs = final_runs(
    task,
    rows,
    protocol.seeds,
    epochs,
    base,
    eval_every=eval_every,
    chunk=chunk,
    window=window,
    store=store,
  )
  summary = summarise(runs, task.target, window)
  sgd_value = summary[rows[0].name]["final"] if rows[0].spec.key == "sgd" else None
  outcome = Outcome(searches, rows, runs, summary, sgd_value)
  if any(b < 1 for b in protocol.budgets):
    tuned = [row for row in rows if row.variant == "tuned"]
    seeds = protocol.seeds_for_budgets
    whole = [runs[protocol.seeds.index(seed)][: len(tuned)] for seed in seeds]
    by_budget = {
      b: (
        whole
        if b == 1
        else final_runs(
          task, tuned, seeds, epochs, base, chunk=chunk, window=window, fraction=b, store=store
        )
      )
      for b in protocol.budgets
    }
    outcome.budgets = budget_summary(
      by_budget, task.target, window, summary={row.name: summary[row.name] for row in tuned}
    )
  return outcome
