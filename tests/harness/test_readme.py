"""Every ```python block of README.md and of the guides in docs/ runs as written,
in order, in one namespace.

The blocks build on each other (the README's quickstart defines ``model``,
``params``, ``loss_fn``, ``tx``, ``grad_fn``, ``train_step``; the guides' blocks
reuse them), so they run one after the other in one namespace, each block's text
unchanged: README.md first, then the guides in :data:`PAGES` order (the NNX
guide's block last, since its given ``model`` and ``loss_fn`` replace the Linen
ones). Every page of docs/ with a python block must be in :data:`PAGES`. Rules:

* A block may use names the pages' prose takes as given and never defines
  (a batch ``x, y``, a learning rate ``lr``, an NNX ``model``): :data:`GIVEN`
  supplies them, keyed by a piece of the block's text, each with why. Nothing
  else is added to any block.
* What a block promises is then checked with numbers (:data:`CHECKS`: the
  quickstart trains and skips a NaN batch, the chain equals the alias, …).
* Each key of :data:`GIVEN` and :data:`CHECKS` must match exactly one block
  of all the pages, so neither goes stale when a page changes.
* A block that genuinely cannot run (it needs a dataset, a GPU, a network)
  starts with the line ``# not run: <reason>``; it is then skipped, and the
  reason must be given. No block of the pages needs it today.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: The pages whose python blocks run, in the order they run (README.md first).
PAGES = [
  README,
  ROOT / "docs" / "optimizers.md",  # K-FAC, Eva-s, the chain (the Linen quickstart's names)
  ROOT / "docs" / "layers.md",  # layouts (K-FAC's grad_fn from optimizers.md)
  ROOT / "docs" / "multi_device.md",  # pmap (the tx of layers.md), the sharded decoder
  ROOT / "docs" / "getting_started.md",  # NNX: its given model and loss_fn come last
]
NOT_RUN = "# not run:"

pytestmark = pytest.mark.usefixtures("quick_compiles")


def python_blocks(text: str, name: str = "README.md") -> list[tuple[int, str]]:
  """``(first line number, code)`` of every ```python fenced block."""
  blocks, code, start = [], None, 0
  for number, line in enumerate(text.splitlines(), 1):
    if code is None and re.fullmatch(r"```python\s*", line):
      code, start = [], number + 1
    elif code is not None and line.strip() == "```":
      blocks.append((start, "\n".join(code) + "\n"))
      code = None
    elif code is not None:
      code.append(line)
  assert code is None, f"{name}: the block from line {start} is not closed"
  return blocks


def _batch():
  """A batch of MNIST-shaped inputs and labels."""
  return jax.random.normal(jax.random.key(1), (32, 784)), jnp.arange(32) % 10


def _nnx_model(ns):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(784, 256, rngs=rngs)
      self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  ns["model"], ns["loss_fn"] = MLP(nnx.Rngs(0)), loss_fn


#: Names a block uses that its page takes as given: {piece of the block: (setup, why)}.
GIVEN = {
  "eva_optax.kfac(": (lambda ns: ns.update(zip("xy", _batch())), "a batch x, y: the user's data"),
  "eva_optax.scale_by_eva(learning_rate=lr)": (
    lambda ns: ns.update(lr=0.1),
    "lr: the prose's learning rate",
  ),
  "nnx.Optimizer(model, tx, wrt=nnx.Param)": (
    _nnx_model,
    "an NNX model and loss_fn(model, x, y), as the section's prose describes them",
  ),
}


def _check_quickstart(ns):
  """Three steps lower the loss on one batch; a NaN batch leaves the
  parameters and the optimizer state bit-identical (apply_if_finite), and
  the next step trains on."""
  params, opt_state, step = ns["params"], ns["opt_state"], ns["train_step"]
  x, y = _batch()
  losses = []
  for _ in range(3):
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  before = (params, opt_state)
  params, opt_state, loss = step(params, opt_state, x.at[0, 0].set(jnp.nan), y)
  assert np.isnan(loss)
  for old, new in zip(jax.tree.leaves(before[0]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(old, new)
  assert int(opt_state.notfinite_count) == 1
  params, opt_state, loss = step(params, opt_state, x, y)
  assert float(loss) < losses[0] and int(opt_state.notfinite_count) == 0
  ns["params"], ns["opt_state"] = params, opt_state


def _check_finite_step(ns):
  """The block's last update left finite parameters, and a finite loss."""
  assert np.isfinite(float(ns["loss"]))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(ns["params"]))


def _check_chain(ns):
  """Three steps of the chain move the parameters as the alias it says it
  equals does (momentum and weight decay included)."""
  x, y = ns["x"], ns["y"]
  grad_fn = jax.jit(eva_optax.value_and_grad(ns["loss_fn"]))
  alias = eva_optax.eva(ns["lr"], momentum=0.9, weight_decay=5e-4)
  runs = []
  for tx in (ns["tx"], alias):
    params = ns["params"]
    opt_state = tx.init(params)
    for _ in range(3):
      _, grads, stats = grad_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      params = optax.apply_updates(params, updates)
    runs.append(params)
  moved = 0.0
  for a, b, start in zip(*map(jax.tree.leaves, runs), jax.tree.leaves(ns["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved = max(moved, float(jnp.abs(a - start).max()))
  assert moved > 1e-4


def _check_layouts(ns):
  """The optimizer built with the recorded layouts takes a step (with Eva's
  statistics: ``grad_fn`` is K-FAC's here, whose layouts are the same)."""
  params, tx = ns["params"], ns["tx"]
  _, grads, stats = eva_optax.value_and_grad(ns["loss_fn"])(params, ns["x"], ns["y"])
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) > 0


def _check_pmap(ns):
  """The step, under pmap over 8 devices, moves the parameters and keeps
  every replica equal (statistics and gradients of the global batch)."""
  devices = jax.local_device_count()
  params, tx, x, y = ns["params"], ns["tx"], ns["x"], ns["y"]
  replicate = lambda tree: jax.tree.map(
    lambda a: jnp.broadcast_to(a, (devices,) + jnp.shape(a)), tree
  )
  shard = lambda a: a.reshape((devices, -1) + a.shape[1:])
  new, _ = jax.pmap(ns["step"], axis_name="data")(
    replicate(params), replicate(tx.init(params)), shard(x), shard(y)
  )
  moved = 0.0
  for old, leaf in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    moved = max(moved, float(jnp.abs(leaf[0] - old).max()))
  assert moved > 0


def _check_nnx(ns):
  """Three nnx.Optimizer steps lower the loss on one batch."""
  losses = [
    float(ns["train_step"](ns["model"], ns["optimizer"], ns["x"], ns["y"])) for _ in range(3)
  ]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


#: What each block promises, checked after it runs: {piece of the block: check}.
def _check_sharded(ns):
  """The tensor-parallel step ran, and Eva's statistics sit where the kernels are."""
  assert np.isfinite(float(ns["loss"]))
  eva_state = ns["opt_state"][0]
  up = eva_state.output_grad_mean["block0"]["up"]  # ḡ of a kernel whose outputs are split
  assert "model" in jax.tree.leaves(tuple(up.sharding.spec))
  kernel = ns["params"]["block0"]["up"]["kernel"]
  assert kernel.sharding.is_equivalent_to(ns["param_sharding"]["block0"]["up"]["kernel"], 2)


CHECKS = {
  "eva_optax.state_shardings(tx, params)": _check_sharded,
  "def train_step(params, opt_state, x, y)": _check_quickstart,
  "eva_optax.kfac(": _check_finite_step,
  "eva_optax.scale_by_eva(learning_rate=lr)": _check_chain,
  "layouts=eva_optax.layouts_of(stats)": _check_layouts,
  'value_and_grad(loss_fn, axis_name="data")': _check_pmap,
  "nnx.Optimizer(model, tx, wrt=nnx.Param)": _check_nnx,
}


def _matching(blocks, key):
  found = [i for i, (_, code) in enumerate(blocks) if key in code]
  assert len(found) == 1, (
    f"{key!r} must be in exactly one python block of the pages, found {len(found)}"
  )
  return found[0]


def _page_blocks() -> list[tuple[str, int, str]]:
  """``(page, first line, code)`` of every python block of :data:`PAGES`, in order."""
  found = []
  for page in PAGES:
    name = page.relative_to(ROOT).as_posix()
    found += [
      (name, line, code) for line, code in python_blocks(page.read_text(encoding="utf-8"), name)
    ]
  return found


def test_every_page_with_python_blocks_runs_them():
  listed = {page.resolve() for page in PAGES}
  for page in sorted((ROOT / "docs").glob("*.md")):
    if python_blocks(page.read_text(encoding="utf-8"), page.name):
      assert page.resolve() in listed, f"docs/{page.name} has python blocks: add it to PAGES"
  assert python_blocks(README.read_text(encoding="utf-8")), "README.md lost its quickstart"


def test_every_python_block_of_the_readme_and_the_guides_runs():
  pages = _page_blocks()
  blocks = [(line, code) for _, line, code in pages]
  assert len(blocks) >= 6
  given = {_matching(blocks, k): setup for k, (setup, _) in GIVEN.items()}
  checks = {_matching(blocks, k): check for k, check in CHECKS.items()}
  ns: dict = {"__name__": "readme"}
  ran = 0
  for i, (page, line, code) in enumerate(pages):
    first = code.lstrip().splitlines()[0]
    if first.startswith(NOT_RUN):
      assert first[len(NOT_RUN) :].strip(), f"{page} line {line}: '{NOT_RUN}' needs a reason"
      continue
    if i in given:
      given[i](ns)
    try:
      exec(compile(code, f"{page}:{line}", "exec"), ns)
    except Exception as e:
      raise AssertionError(f"the python block at {page} line {line} fails: {e!r}") from e
    if i in checks:
      checks[i](ns)
    ran += 1
  assert ran == len(blocks)  # no block is skipped today
  assert set(checks) | set(given) <= set(range(len(blocks)))


def test_python_blocks_parser():
  text = "a\n```python\nx = 1\n```\n```sh\nls\n```\n```python\ny = 2\nz = 3\n```\n"
  assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\nz = 3\n")]
