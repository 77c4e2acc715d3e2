"""once_per_mesh: per-layer work on one device each, two collectives for all layers.

On 8 host devices (a data 2 × model 4 mesh): the results equal the function of
each layer on one device, whatever the operands' splits; each result is split
like its layer's operand of the same shape; the compiled program has one
all-gather and one reduce-scatter, and the function's work only inside one
conditional per layer, taken on the owner alone (the sum over the devices
would count any other device's result too).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from eva_optax._src.linalg import damped_inverse
from eva_optax._src.once_per_mesh import cost, once_per_mesh, owners
from examples.harness import compiled_ops

needs_8 = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def test_owners_balance_the_work_largest_first():
  # Largest first, each to the least loaded device (lowest index on ties).
  assert owners([1.0, 8.0, 4.0, 4.0, 2.0], 2) == [1, 0, 1, 1, 0]
  assert sorted(owners([5.0] * 8, 8)) == list(range(8))  # one layer each
  loads = [0.0] * 3
  costs = [float(n**3) for n in (64, 32, 128, 16, 128, 64, 32)]
  for c, d in zip(costs, owners(costs, 3)):
    loads[d] += c
  assert max(loads) - min(loads) <= max(costs)
  assert cost([jnp.zeros((2, 4, 4)), jnp.zeros((3,))]) == 2 * 4**3 + 3


def _spd(rng, n):
  x = rng.normal(size=(n, n + 3))
  return (x @ x.T / n).astype(np.float32)


def _layers():
  rng = np.random.default_rng(0)
  return [
    {"a": _spd(rng, 16), "g": _spd(rng, 8)},
    {"a": _spd(rng, 32), "g": _spd(rng, 24)},
    {"a": _spd(rng, 24), "g": _spd(rng, 4)},
  ]


def _inverses(layer, gamma):
  return {
    "a_inv": damped_inverse(layer["a"], gamma),
    "g_inv": damped_inverse(layer["g"], gamma),
    "trace": jnp.trace(jnp.cos(layer["a"])),  # a mark of the work in the compiled HLO
  }


def test_on_one_device_it_is_the_function_of_each_layer():
  layers = _layers()
  out = jax.jit(lambda ls, g: once_per_mesh(_inverses, ls, (g,)))(layers, jnp.float32(0.1))
  for layer, result in zip(layers, out):
    jax.tree.map(np.testing.assert_array_equal, result, jax.jit(_inverses)(layer, jnp.float32(0.1)))


def test_one_function_per_layer():
  layers = _layers()
  fns = [lambda l, k=k: {"x": l["a"] * k} for k in range(3)]
  out = once_per_mesh(fns, layers)
  for k, (layer, result) in enumerate(zip(layers, out)):
    np.testing.assert_array_equal(result["x"], layer["a"] * k)
  with pytest.raises(ValueError, match="2 functions for 3 layers"):
    once_per_mesh(fns[:2], layers)


@needs_8
def test_on_a_mesh_each_layer_once_with_two_collectives():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  specs = [
    {"a": P(("model", "data")), "g": P("data")},
    {"a": P(), "g": P(("data", "model"))},
    {"a": P("model"), "g": P()},
  ]
  shardings = jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
  )
  layers = jax.device_put(_layers(), shardings)
  out_shardings = [
    {"a_inv": s["a"], "g_inv": s["g"], "trace": NamedSharding(mesh, P())} for s in shardings
  ]
  fn = jax.jit(lambda ls, g: once_per_mesh(_inverses, ls, (g,)), out_shardings=out_shardings)
  gamma = jnp.float32(0.1)
  out = fn(layers, gamma)
  for layer, result, spec in zip(_layers(), out, specs):
    want = jax.jit(_inverses)(layer, gamma)
    for name in want:
      # The owner's result, zeros added from every other device (a second device's
      # result would double it); to rounding, the programs being compiled apart.
      np.testing.assert_allclose(
        np.asarray(result[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-7, err_msg=name
      )
    assert result["a_inv"].sharding.spec == spec["a"]
    assert result["g_inv"].sharding.spec == spec["g"]
  compiled = fn.lower(layers, gamma).compile()
  kinds = sorted(c.kind for c in compiled_ops.collectives(compiled))
  assert kinds == ["all-gather", "reduce-scatter"]
  text = compiled.as_text()
  assert len(re.findall(r"\bconditional\(", text)) == len(specs)
  # The function's work appears once per layer, inside the branch its owner takes.
  marks = [line for line in text.splitlines() if re.search(r"\bcosine\(", line)]
  assert len(marks) == len(specs)
  assert all("cond/branch_1_fun" in line for line in marks)
