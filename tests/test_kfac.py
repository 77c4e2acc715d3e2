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


def _authors_reference(
  params,
  batches,
  lr,
  damping,
  kl_clip,
  wd,
  momentum,
  inverse_every,
  blocks,
  stride=1,
  stats_every=1,
  damp_stored=False,
):
  """The authors' K-FAC step by step, in NumPy float64 and in their conventions
  (``kfac/kfac.py``, ``kfac/utils.py``), on y1 = conv(x) + b1 (3×3, padding 1,
  ``stride``), h = relu(y1), y2 = h·W2 + b2, loss = mean_n Σ (y2 − t)².

  Per layer: â_n = [mean over sample n's patches, 1] with a patch in their
  (C, kh, kw) order, ḡ_n = mean over its positions of ∂loss/∂y (the mean
  loss), A = mean_n â_n â_nᵀ, G = mean_n ḡ_n ḡ_nᵀ; every ``stats_every``
  steps m ← new at the first, then 0.05·m + 0.95·new; every ``inverse_every``
  steps π = sqrt((tr A/dim A)/(tr G/dim G)) and the inverses of the contiguous
  diagonal blocks of A + √γπ I and G + √γ/π I (the larger blocks first), and
  with ``damp_stored`` the stored A, G become those damped matrices; V = A⁻¹ Ĝ
  G⁻¹ (Ĝ = [∇W; ∇b], in × out, the conv's W as PyTorch's OIHW flattened);
  ν = min(1, sqrt(κ / Σ lr²⟨V, Ĝ⟩)); d = νV + λW; buf = μ·buf + d;
  W ← W − lr·buf."""
  import jax.numpy as jnp_

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def forward(p, x, e1, e2):
    y1 = conv(x, p["Conv_0"]["kernel"]) + p["Conv_0"]["bias"] + e1
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
    y1 = np.asarray(conv(x, p["Conv_0"]["kernel"])) + p["Conv_0"]["bias"]
    out = y1.shape[1]
    e1 = np.zeros(y1.shape)
    e2 = np.zeros((n, 3))
    grads, g1, g2 = jax.grad(loss, argnums=(0, 3, 4))(p, x, t, e1, e2)
    grads = jax.tree.map(np.asarray, grads)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack(
      [
        np.stack(
          [
            padded[:, stride * i : stride * i + 3, stride * j : stride * j + 3, :]
            .transpose(0, 3, 1, 2)
            .reshape(n, -1)
            for j in range(out)
          ],
          1,
        )
        for i in range(out)
      ],
      1,
    )  # (n, out, out, C·3·3): their (C, kh, kw) order
    h = np.maximum(y1, 0.0).reshape(n, -1)
    inputs = {"Conv_0": patches.mean(axis=(1, 2)), "Dense_0": h}
    outputs = {"Conv_0": np.asarray(g1).mean(axis=(1, 2)), "Dense_0": np.asarray(g2)}
    if step % stats_every == 0:
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
        lam_a, lam_g = np.sqrt(damping) * pi, np.sqrt(damping) / pi
        inverses[name] = (block_inverse(a_f, lam_a), block_inverse(g_f, lam_g))
        if damp_stored:
          running[name] = {"A": a_f + lam_a * np.eye(len(a_f)), "G": g_f + lam_g * np.eye(len(g_f))}
    vs, vg = {}, 0.0
    for name in names:
      kernel = grads[name]["kernel"]
      if kernel.ndim == 4:  # HWIO → OIHW flattened, as (C·kh·kw, O)
        kernel = kernel.transpose(2, 0, 1, 3)
      kernel = kernel.reshape(-1, kernel.shape[-1])
      full = np.concatenate([kernel, grads[name]["bias"][None]], axis=0)
      v = inverses[name][0] @ full @ inverses[name][1]
      vs[name] = v
      vg += lr**2 * np.sum(v * full)
    nu = min(1.0, np.sqrt(kl_clip / vg)) if vg > 0 else 1.0
    d = {}
    for name in names:
      shape = p[name]["kernel"].shape
      v_kernel = vs[name][:-1]
      if len(shape) == 4:  # (C·kh·kw, O) → HWIO
        v_kernel = v_kernel.reshape(shape[2], shape[0], shape[1], shape[3]).transpose(1, 2, 0, 3)
      d[name] = {
        "kernel": nu * v_kernel.reshape(shape) + wd * p[name]["kernel"],
        "bias": nu * vs[name][-1] + wd * p[name]["bias"],
      }
    buf = d if buf is None else jax.tree.map(lambda b, u: momentum * b + u, buf, d)
    p = jax.tree.map(lambda w, b: w - lr * b, p, buf)
  return p


@pytest.mark.parametrize(
  "config",
  [
    dict(stride=1, stats_every=1, inverse_every=2, damp_stored=False),
    # Their script's form: factors and inverses every N steps, in-place damping.
    dict(stride=2, stats_every=2, inverse_every=2, damp_stored=True),
  ],
)
def test_authors_kfac_equals_their_rule_in_float64(config):
  """kfac(diag_blocks=4) on factor_rows='samples' statistics: 5 steps on a
  padded conv with bias (2 → 4 channels, 3×3: A of side 19, so 4 blocks of
  5, 5, 5, 4 that cut across the (kh, kw) groups in both orders) and a dense
  layer, with a new batch each step, equal to the independent NumPy rule in
  the authors' factor order to 1e-9 relative (float64)."""
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
        conv = nn.Conv(4, (3, 3), config["stride"], padding=((1, 1), (1, 1)), **f64)
        h = nn.relu(conv(x)).reshape(x.shape[0], -1)
        return nn.Dense(3, **f64)(h)

    model = Net()
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(6, 5, 5, 2)), rng.normal(size=(6, 3))) for _ in range(5)]
    params = model.init(jax.random.key(0), jnp.asarray(batches[0][0]))["params"]
    loss_fn = lambda p, x, t: jnp.mean(jnp.sum((model.apply({"params": p}, x) - t) ** 2, axis=-1))
    grad_fn = eva_optax.value_and_grad(
      loss_fn, statistics=eva_optax.KFAC_STATISTICS, factor_rows="samples"
    )
    kw = dict(lr=0.1, damping=0.03, kl_clip=0.01, wd=5e-4, momentum=0.9, blocks=4, **config)
    tx = eva_optax.kfac(
      kw["lr"],
      damping=kw["damping"],
      kl_clip=kw["kl_clip"],
      weight_decay=kw["wd"],
      momentum=kw["momentum"],
      stats_every=kw["stats_every"],
      inverse_every=kw["inverse_every"],
      diag_blocks=kw["blocks"],
      damp_stored_factors=kw["damp_stored"],
    )
    state, p = tx.init(params), params

    def train_step(grad_fn, rows):
      def step(p, state, x, t):
        _, grads, stats = grad_fn(p, x, t, factors_due=eva_optax.factors_due(state))
        assert stats["Conv_0"].factor_rows == rows
        updates, state = tx.update(grads, state, p, stats=stats)
        return optax.apply_updates(p, updates), state

      return jax.jit(step)

    step = train_step(grad_fn, "samples")
    for x, t in batches:
      p, state = step(p, state, jnp.asarray(x), jnp.asarray(t))
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
    if config["damp_stored"]:
      return
    # The textbook factors (one row per position, per-sample G) move elsewhere.
    textbook = eva_optax.value_and_grad(loss_fn, statistics=eva_optax.KFAC_STATISTICS)
    state, q = tx.init(params), params
    step = train_step(textbook, "positions")
    for x, t in batches:
      q, state = step(q, state, jnp.asarray(x), jnp.asarray(t))
    assert not np.allclose(q["Dense_0"]["kernel"], want["Dense_0"]["kernel"], rtol=1e-3)
  finally:
    jax.config.update("jax_enable_x64", before)


def test_authors_order_puts_a_conv_input_channel_first():
  """A conv's stored inputs (kh, kw, C) = (3, 3, 2) in the authors' (C, kh, kw)
  order: channel 0 at (h, w) = (0, 0), (0, 1), (0, 2), (1, 0) … is stored at
  (h·3 + w)·2 = 0, 2, 4, 6 …; the bias stays last; the matrix form is P M Pᵀ
  (a transpose that equals this gather) and ``back`` undoes it."""
  order = kfac.authors_input_order((3, 3, 2), has_bias=True)
  assert order[:10] == (0, 2, 4, 6, 8, 10, 12, 14, 16) + (1,)
  assert order[-1] == 18 and sorted(order) == list(range(19))
  assert kfac.authors_input_order((5,), has_bias=False) == tuple(range(5))
  m = np.random.default_rng(0).normal(size=(2, 19, 19)).astype(np.float32)  # a stack of two
  got = np.asarray(kfac.in_authors_order(jnp.asarray(m), (3, 3, 2)))
  np.testing.assert_array_equal(got, m[:, order][:, :, order])
  back = kfac.in_authors_order(jnp.asarray(got), (3, 3, 2), back=True)
  np.testing.assert_array_equal(np.asarray(back), m)


def test_damp_stored_factors_follows_the_authors_rule_in_float64():
  """damp_stored_factors=True: at each refresh (steps 0, 3, 6) the stored A and
  G get √γπ·I and √γ/π·I (π of the factors before), and the factor updates
  (steps 0, 2, 4, 6: m ← new at the first, else 0.05·m + 0.95·new) carry
  them on, as the authors' kfac.py does; checked against NumPy float64 for a
  Dense with a bias (A kept as a WithBiasRow) and a 1×1 conv without one.
  Off (the default), the stored factors are the plain running averages."""

  import eva_optax

  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(3)
    params = {
      "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      "Conv_0": {"kernel": jnp.ones((1, 1, 3, 2))},
    }
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    sides = {"Dense_0": (5, 3), "Conv_0": (3, 2)}
    steps = [
      {name: (spd(rng, a) * 2.0, spd(rng, g) * 1e-3) for name, (a, g) in sides.items()}
      for _ in range(7)
    ]
    gamma, every_stats, every_inverse = 0.03, 2, 3

    def run(damp):
      tx = eva_optax.scale_by_kfac(
        0.1,
        damping=gamma,
        stats_every=every_stats,
        inverse_every=every_inverse,
        damp_stored_factors=damp,
      )
      update = jax.jit(lambda g, s, st: tx.update(g, s, params, stats=st))
      state = tx.init(params)
      for factors in steps:
        stats = {
          name: eva_optax.LayerStats(
            None, None, jnp.asarray(a), jnp.asarray(g), kind=name[:-2], has_bias=name == "Dense_0"
          )
          for name, (a, g) in factors.items()
        }
        _, state = update(params, state, stats)
      return {
        name: (
          np.asarray(eva_optax._src.statistics.together(state.input_factor[name])),
          np.asarray(state.output_grad_factor[name]),
        )
        for name in sides
      }

    def reference(damp):
      running = {}
      for step, factors in enumerate(steps):
        if step % every_stats == 0:
          for name, new in factors.items():
            old = running.get(name)
            running[name] = (
              new if old is None else tuple(0.05 * o + 0.95 * n for o, n in zip(old, new))
            )
        if damp and step % every_inverse == 0:
          for name, (a, g) in running.items():
            pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
            running[name] = (
              a + np.sqrt(gamma) * pi * np.eye(len(a)),
              g + np.sqrt(gamma) / pi * np.eye(len(g)),
            )
      return running

    got = {damp: run(damp) for damp in (True, False)}
    for damp in (True, False):
      want = reference(damp)
      for name in sides:
        for g_, w_ in zip(got[damp][name], want[name]):
          np.testing.assert_allclose(g_, w_, rtol=1e-12, atol=1e-15)
    # The leak is there, on the diagonal only: the damping of steps 0 and 3.
    leak = got[True]["Dense_0"][0] - got[False]["Dense_0"][0]
    assert np.min(np.diag(leak)) > 1e-3
    np.testing.assert_allclose(leak - np.diag(np.diag(leak)), 0.0, atol=1e-12)
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
