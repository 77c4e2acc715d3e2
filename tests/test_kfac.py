"""K-FAC (``eva_optax._src.kfac``) against explicitly damped factors.

π = sqrt((tr A / dim A) / (tr G / dim G)),  V = (G + √γ/π · I)⁻¹ Ĝ (A + √γ·π · I)⁻¹.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import paper, random_layer, spd

# The submodule (the package exports a function of the same name).
kfac = importlib.import_module("eva_optax._src.kfac")

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [0.003, 0.3])
def test_kfac_equals_explicit_damped_factors(bias, damping):
  rng = np.random.default_rng(1)
  in_dim, out_dim = 5, 4
  grad, g_hat = random_layer(rng, in_dim, out_dim, bias)
  n_in = in_dim + bias
  a_factor = spd(rng, n_in) * 3.0
  g_factor = spd(rng, out_dim) * 0.01
  pi = np.sqrt((np.trace(a_factor) / n_in) / (np.trace(g_factor) / out_dim))
  a_damped = a_factor + np.sqrt(damping) * pi * np.eye(n_in)
  g_damped = g_factor + np.sqrt(damping) / pi * np.eye(out_dim)
  expected = np.linalg.solve(g_damped, g_hat) @ np.linalg.inv(a_damped)
  a_inv, g_inv = kfac.damped_inverses(
    jnp.asarray(a_factor, jnp.float32), jnp.asarray(g_factor, jnp.float32), jnp.float32(damping)
  )
  p = kfac.kfac_precondition(grad, a_inv, g_inv)
  np.testing.assert_allclose(
    paper(p, bias), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
  )
  np.testing.assert_allclose(float(p.update_dot_grad), np.sum(expected * g_hat), rtol=1e-3)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(inverse_every=0), "inverse_every"),
    (dict(stats_every=1.5), "stats_every"),
    (dict(damping=0.0), "damping"),
  ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kfac.kfac(0.1, **kwargs)


# ---------------------------------------------------------------------------
# The authors' K-FAC, against an independent float64 NumPy reference.


def _authors_reference(params, batches, lr, damping, kl_clip, wd, momentum, inverse_every, blocks):
  """The authors' K-FAC step by step, in NumPy float64, on y1 = conv(x) + b1
  (3×3, SAME), h = relu(y1), y2 = h·W2 + b2, loss = mean_n Σ (y2 − t)².

  Per layer: â_n = [mean over sample n's patches, 1], ḡ_n = mean over its
  positions of ∂loss/∂y (the mean loss), A = mean_n â_n â_nᵀ, G = mean_n ḡ_n
  ḡ_nᵀ; m ← new at the first step, then 0.05·m + 0.95·new; every
  ``inverse_every`` steps π = sqrt((tr A/dim A)/(tr G/dim G)) and the inverses
  of the diagonal blocks of A + √γπ I and G + √γ/π I (the larger blocks
  first); V = A⁻¹ Ĝ G⁻¹ (Ĝ = [∇W; ∇b], in × out); ν = min(1, sqrt(κ / Σ lr²⟨V,
  Ĝ⟩)); d = νV + λW; buf = μ·buf + d; W ← W − lr·buf."""
  import jax.numpy as jnp_

  def forward(p, x, e1, e2):
    y1 = (
      jax.lax.conv_general_dilated(
        x, p["Conv_0"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      + p["Conv_0"]["bias"]
      + e1
    )
    h = jnp_.maximum(y1, 0.0).reshape(x.shape[0], -1)
    return h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + e2

  def loss(p, x, t, e1, e2):
    return jnp_.mean(jnp_.sum((forward(p, x, e1, e2) - t) ** 2, axis=-1))

  def block_inverse(m, lam):
    n = m.shape[0]
    sections = min(blocks, n)
    each, extra = divmod(n, sections)
    sizes = [each + 1] * extra + [each] * (sections - extra)
    out, start = np.zeros_like(m), 0
    for size in sizes:
      end = start + size
      out[start:end, start:end] = np.linalg.inv(m[start:end, start:end] + lam * np.eye(size))
      start = end
    return out

  p = jax.tree.map(np.asarray, params)
  names = ("Conv_0", "Dense_0")
  running, inverses, buf = {}, {}, None
  for step, (x, t) in enumerate(batches):
    x, t = np.asarray(x), np.asarray(t)
    n = x.shape[0]
    e1 = np.zeros((n, 5, 5, 4))
    e2 = np.zeros((n, 3))
    grads, g1, g2 = jax.grad(loss, argnums=(0, 3, 4))(p, x, t, e1, e2)
    grads = jax.tree.map(np.asarray, grads)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack(
      [
        np.stack([padded[:, i : i + 3, j : j + 3, :].reshape(n, -1) for j in range(5)], 1)
        for i in range(5)
      ],
      1,
    )  # (n, 5, 5, 18), HWI order
    y1 = (
      np.asarray(
        jax.lax.conv_general_dilated(
          x, p["Conv_0"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
      )
      + p["Conv_0"]["bias"]
    )
    h = np.maximum(y1, 0.0).reshape(n, -1)
    inputs = {"Conv_0": patches.mean(axis=(1, 2)), "Dense_0": h}
    outputs = {"Conv_0": np.asarray(g1).mean(axis=(1, 2)), "Dense_0": np.asarray(g2)}
    for name in names:
      a = np.concatenate([inputs[name], np.ones((n, 1))], axis=1)
      new = {"A": a.T @ a / n, "G": outputs[name].T @ outputs[name] / n}
      if name not in running:
        running[name] = new
      else:
        running[name] = {k: 0.05 * running[name][k] + 0.95 * new[k] for k in new}
    if step % inverse_every == 0:
      for name in names:
        a_f, g_f = running[name]["A"], running[name]["G"]
        pi = np.sqrt((np.trace(a_f) / len(a_f)) / (np.trace(g_f) / len(g_f)))
        inverses[name] = (
          block_inverse(a_f, np.sqrt(damping) * pi),
          block_inverse(g_f, np.sqrt(damping) / pi),
        )
    vs, vg = {}, 0.0
    for name in names:
      kernel = grads[name]["kernel"].reshape(-1, grads[name]["kernel"].shape[-1])
      full = np.concatenate([kernel, grads[name]["bias"][None]], axis=0)
      v = inverses[name][0] @ full @ inverses[name][1]
      vs[name] = v
      vg += lr**2 * np.sum(v * full)
    nu = min(1.0, np.sqrt(kl_clip / vg)) if vg > 0 else 1.0
    d = {}
    for name in names:
      shape = p[name]["kernel"].shape
      d[name] = {
        "kernel": nu * vs[name][:-1].reshape(shape) + wd * p[name]["kernel"],
        "bias": nu * vs[name][-1] + wd * p[name]["bias"],
      }
    buf = d if buf is None else jax.tree.map(lambda b, u: momentum * b + u, buf, d)
    p = jax.tree.map(lambda w, b: w - lr * b, p, buf)
  return p


def test_authors_kfac_equals_their_rule_in_float64():
  """kfac(diag_blocks=4) on factor_rows='samples' statistics: 5 steps on a conv
  and a dense layer, with a new batch each step and inverses every 2 steps,
  equal to the independent NumPy rule to 1e-9 relative (float64)."""
  import flax.linen as nn
  import optax

  import eva_optax

  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
        h = nn.relu(nn.Conv(4, (3, 3), padding="SAME", **f64)(x)).reshape(x.shape[0], -1)
        return nn.Dense(3, **f64)(h)

    model = Net()
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(6, 5, 5, 2)), rng.normal(size=(6, 3))) for _ in range(5)]
    params = model.init(jax.random.key(0), jnp.asarray(batches[0][0]))["params"]
    loss_fn = lambda p, x, t: jnp.mean(jnp.sum((model.apply({"params": p}, x) - t) ** 2, axis=-1))
    grad_fn = eva_optax.value_and_grad(
      loss_fn, statistics=eva_optax.KFAC_STATISTICS, factor_rows="samples"
    )
    kw = dict(lr=0.1, damping=0.03, kl_clip=0.01, wd=5e-4, momentum=0.9, inverse_every=2, blocks=4)
    tx = eva_optax.kfac(
      kw["lr"],
      damping=kw["damping"],
      kl_clip=kw["kl_clip"],
      weight_decay=kw["wd"],
      momentum=kw["momentum"],
      inverse_every=kw["inverse_every"],
      diag_blocks=kw["blocks"],
    )
    state, p = tx.init(params), params
    for x, t in batches:
      _, grads, stats = grad_fn(p, jnp.asarray(x), jnp.asarray(t))
      assert stats["Conv_0"].factor_rows == "samples"
      updates, state = tx.update(grads, state, p, stats=stats)
      p = optax.apply_updates(p, updates)
    want = _authors_reference(params, batches, **kw)
    moved = 0.0
    for path in (
      ("Conv_0", "kernel"),
      ("Conv_0", "bias"),
      ("Dense_0", "kernel"),
      ("Dense_0", "bias"),
    ):
      got, ref, start = p[path[0]][path[1]], want[path[0]][path[1]], params[path[0]][path[1]]
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
      moved = max(moved, float(np.max(np.abs(np.asarray(ref) - np.asarray(start)))))
    assert moved > 1e-3
    # The textbook factors (one row per position, per-sample G) move elsewhere.
    textbook = eva_optax.value_and_grad(loss_fn, statistics=eva_optax.KFAC_STATISTICS)
    state, q = tx.init(params), params
    for x, t in batches:
      _, grads, stats = textbook(q, jnp.asarray(x), jnp.asarray(t))
      updates, state = tx.update(grads, state, q, stats=stats)
      q = optax.apply_updates(q, updates)
    assert not np.allclose(q["Dense_0"]["kernel"], want["Dense_0"]["kernel"], rtol=1e-3)
  finally:
    jax.config.update("jax_enable_x64", before)


def test_diag_blocks_is_static_under_inject_hyperparams():
  """diag_blocks fixes shapes: left at None it is no hyperparameter; given, it
  needs static_args, and a traced one is refused by name."""
  import optax

  import eva_optax

  params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  stats = {"Dense_0": eva_optax.LayerStats(None, None, 2.0 * jnp.eye(5), jnp.eye(3), kind="Dense")}

  def step(tx):
    return jax.jit(lambda s: tx.update(params, s, params, stats=stats)[0])(tx.init(params))

  step(optax.inject_hyperparams(eva_optax.kfac)(0.1))
  blocked = step(
    optax.inject_hyperparams(eva_optax.kfac, static_args=("diag_blocks",))(0.1, diag_blocks=4)
  )
  assert np.all(np.isfinite(blocked["Dense_0"]["kernel"]))
  with pytest.raises(ValueError, match="diag_blocks"):
    step(optax.inject_hyperparams(eva_optax.kfac)(0.1, diag_blocks=4))
