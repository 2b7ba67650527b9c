"""Optimizer behaviour: frozen params bit-identical, lr multipliers, schedules, decay on kernels."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from siglip_jax import optim


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, wd=0.1, b1=0.9, b2=0.95, clip_norm=1.0,
      schedule=dict(decay="cosine", warmup_steps=2, cooldown_steps=0, end_lr_frac=0.0),
      lr_mults=(), frozen=()))
  c.update(kw)
  return c


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"img": {"embedding": {"kernel": jax.random.normal(k[0], (4, 3)),
                                "bias": jax.random.normal(k[1], (3,))}},
          "txt": {"head": {"kernel": jax.random.normal(k[2], (3, 3)),
                           "bias": jax.random.normal(k[3], (3,))}},
          "t": jnp.array([2.3])}


def _run(cfg, steps=5):
  params = _params()
  tx, lr_fn = optim.make_optimizer(params, cfg, total_steps=10)
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree_util.tree_leaves(p))
  for _ in range(steps):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return _params(), params, state


def test_frozen_params_stay_bit_identical_and_have_no_state():
  before, after, state = _run(_cfg(frozen=("img/.*",)))
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(np.asarray(before["img"]["embedding"][k]),
                                  np.asarray(after["img"]["embedding"][k]))
  assert not np.array_equal(before["txt"]["head"]["kernel"], after["txt"]["head"]["kernel"])
  # No Adam moments are kept for the frozen tower.
  leaves = jax.tree_util.tree_leaves(state)
  n_state = sum(x.size for x in leaves if hasattr(x, "size") and x.ndim > 0)
  n_trainable = 9 + 3 + 1
  assert n_state == 2 * n_trainable


def test_unknown_frozen_regex_is_an_error():
  with pytest.raises(ValueError, match="optim.frozen"):
    optim.make_optimizer(_params(), _cfg(frozen=("image/.*",)), total_steps=10)


def test_lr_multiplier_scales_the_update():
  base = _run(_cfg(wd=0.0, clip_norm=None), steps=1)
  mult = _run(_cfg(wd=0.0, clip_norm=None, lr_mults=(("txt/.*", 0.5),)), steps=1)
  d_base = base[1]["txt"]["head"]["kernel"] - base[0]["txt"]["head"]["kernel"]
  d_mult = mult[1]["txt"]["head"]["kernel"] - mult[0]["txt"]["head"]["kernel"]
  np.testing.assert_allclose(np.asarray(d_mult), 0.5 * np.asarray(d_base), rtol=1e-4)  # p + u - p rounds
  np.testing.assert_array_equal(np.asarray(base[1]["t"]), np.asarray(mult[1]["t"]))


def test_weight_decay_only_on_kernels():
  cfg = _cfg(wd=1.0, lr=0.1, clip_norm=None)
  params = _params()
  tx, _ = optim.make_optimizer(params, cfg, total_steps=10)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)  # zero grads: only decay moves weights
  assert np.all(np.asarray(updates["img"]["embedding"]["bias"]) == 0)
  assert np.all(np.asarray(updates["t"]) == 0)
  assert np.any(np.asarray(updates["txt"]["head"]["kernel"]) != 0)


@pytest.mark.parametrize("decay", ["cosine", "linear", "rsqrt", "constant"])
def test_schedule_warmup_peak_and_end(decay):
  cfg = _cfg(schedule=dict(decay=decay, warmup_steps=10, cooldown_steps=5, end_lr_frac=0.0))
  lr = optim.make_schedule(cfg, total_steps=100)
  values = np.array([float(lr(s)) for s in range(100)])
  assert values[0] == pytest.approx(1e-3)                 # 1/10 of the way up
  assert values[9] == pytest.approx(1e-2)                 # warmup reaches the base lr
  assert np.all(np.diff(values[:10]) > 0)
  # Linear cooldown over the last 5 updates, on top of the decay; the last update is not wasted.
  plain = optim.make_schedule(_cfg(schedule=dict(decay=decay, warmup_steps=10)), total_steps=100)
  plain = np.array([float(plain(s)) for s in range(100)])
  np.testing.assert_allclose(values[:95], plain[:95], rtol=1e-6)
  np.testing.assert_allclose(values[95:], plain[95:] * np.array([5, 4, 3, 2, 1]) / 5, rtol=1e-5)
  assert values[-1] > 0
  assert np.all(values >= 0) and np.all(values <= 1e-2 + 1e-9)


def test_bad_schedule_and_optimizer_names():
  with pytest.raises(ValueError, match="decay"):
    optim.make_schedule(_cfg(schedule=dict(decay="exp")), 10)
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(_params(), _cfg(name="sgdx"), total_steps=10)


def test_adafactor_runs():
  before, after, _ = _run(_cfg(name="adafactor", b2=0.8))
  assert not np.array_equal(before["txt"]["head"]["kernel"], after["txt"]["head"]["kernel"])
