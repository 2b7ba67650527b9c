"""Plain sigmoid and softmax losses vs a float64 numpy reference with hand-derived gradients."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from siglip_jax import losses  # noqa: E402

TB_VALUES = [(10.0, -10.0), (112.0, -16.5), (1.0, 0.0)]


# ------------------------------------------------------------------ float64 numpy reference

def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return np.exp(np_log_sigmoid(x))


def np_sigmoid_loss_and_grads(zimg, ztxt, t, b):
  """Returns loss, (dzimg, dztxt, dt, db) of -(1/B) sum_ij log sigmoid(l_ij (t s_ij + b))."""
  zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
  n = zimg.shape[0]
  s = zimg @ ztxt.T
  signs = 2.0 * np.eye(n) - 1.0
  x = t * s + b
  loss = -np.sum(np_log_sigmoid(signs * x)) / n
  g = -signs * np_sigmoid(-signs * x) / n  # dloss/dx
  return loss, (t * g @ ztxt, t * g.T @ zimg, np.sum(g * s), np.sum(g))


def np_softmax_loss_and_grads(zimg, ztxt, t):
  """CLIP's symmetric cross-entropy and its gradients w.r.t. zimg, ztxt, t."""
  zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
  n = zimg.shape[0]
  s = zimg @ ztxt.T
  x = t * s
  row_lse = np.logaddexp.reduce(x, axis=1)
  col_lse = np.logaddexp.reduce(x, axis=0)
  diag = np.diagonal(x)
  loss = (np.mean(row_lse - diag) + np.mean(col_lse - diag)) / 2
  p_rows = np.exp(x - row_lse[:, None])
  p_cols = np.exp(x - col_lse[None, :])
  g = ((p_rows - np.eye(n)) + (p_cols - np.eye(n))) / (2 * n)
  return loss, (t * g @ ztxt, t * g.T @ zimg, np.sum(g * s))


def embeddings(batch, dim, seed=0):
  rng = np.random.default_rng(seed)
  zi, zt = rng.normal(size=(2, batch, dim))
  zt = zt + 0.5 * zi  # some matching pairs score high, as in training
  normalize = lambda z: (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
  return normalize(zi), normalize(zt)


def assert_close(actual, expected, rtol=2e-5):
  """Relative to the array's scale: max |a - e| <= rtol * max |e| (elementwise rtol is
  meaningless for gradient entries near zero)."""
  actual = np.asarray(actual, np.float64).reshape(np.shape(expected))
  expected = np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-30)
  err = np.max(np.abs(actual - expected))
  assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


def check_sigmoid(fn, zimg, ztxt, t, b, rtol=2e-5):
  """fn's value and grads w.r.t. (zimg, ztxt, t, b) against the float64 reference."""
  value, grads = fn(zimg, ztxt, t, b)
  ref_value, ref_grads = np_sigmoid_loss_and_grads(zimg, ztxt, float(np.sum(t)),
                                                   float(np.sum(b)))
  assert_close(value, ref_value, rtol)
  for name, grad, ref in zip(("zimg", "ztxt", "t", "b"), grads, ref_grads):
    assert grad.shape == np.shape({"t": t, "b": b}.get(name, zimg)), name
    try:
      assert_close(grad, ref, rtol)
    except AssertionError as e:
      raise AssertionError(f"d{name}: {e}") from None


def check_bf16(loss, zimg, ztxt):
  """loss(zimg, ztxt) on bfloat16 embeddings (t = 112, b = -16.5 inside): a float32 value equal
  to the float64 reference on the rounded inputs, bfloat16 gradients within their rounding."""
  zi16, zt16 = jnp.asarray(zimg, jnp.bfloat16), jnp.asarray(ztxt, jnp.bfloat16)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(zi16, zt16)
  ref = np_sigmoid_loss_and_grads(np.asarray(zi16, np.float32), np.asarray(zt16, np.float32),
                                  112.0, -16.5)
  assert value.dtype == jnp.float32
  assert_close(value, ref[0])
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  for grad, r in zip(grads, ref[1]):
    assert_close(grad, r, rtol=1e-2)  # bf16 rounding of the gradients only


# ----------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("t,b", TB_VALUES)
def test_sigmoid_loss_matches_reference(t, b):
  zi, zt = embeddings(24, 16)
  fn = jax.jit(jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3)))
  check_sigmoid(fn, zi, zt, jnp.float32(t), jnp.float32(b))


def test_sigmoid_loss_shape_one_scale_and_bias():
  zi, zt = embeddings(8, 4)
  fn = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))
  check_sigmoid(fn, zi, zt, jnp.array([10.0]), jnp.array([-10.0]))


def test_sigmoid_loss_stable_at_extreme_logits():
  zi, zt = embeddings(8, 4)
  value, grads = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(
      zi, zt, 1e4, -50.0)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("t", [10.0, 112.0, 1.0])
def test_softmax_loss_matches_reference(t):
  zi, zt = embeddings(24, 16, seed=1)
  value, grads = jax.jit(jax.value_and_grad(losses.softmax_loss, argnums=(0, 1, 2)))(
      zi, zt, jnp.float32(t))
  ref_value, ref_grads = np_softmax_loss_and_grads(zi, zt, t)
  assert_close(value, ref_value)
  for grad, ref in zip(grads, ref_grads):
    assert_close(grad, ref)


def test_bf16_inputs_computed_in_float32():
  zi, zt = embeddings(16, 8)
  check_bf16(lambda zi, zt: losses.sigmoid_loss(zi, zt, 112.0, -16.5), zi, zt)


def test_make_loss_fn_kinds():
  zi, zt = embeddings(8, 4)
  for kind in ("sigmoid", "sigmoid_ring", "sigmoid_gather"):  # no mesh: the plain loss
    assert_close(losses.make_loss_fn(kind)(zi, zt, 10.0, -10.0),
                 np_sigmoid_loss_and_grads(zi, zt, 10.0, -10.0)[0])
  assert_close(losses.make_loss_fn("softmax")(zi, zt, 10.0, -10.0),
               np_softmax_loss_and_grads(zi, zt, 10.0)[0])
  with pytest.raises(ValueError, match=r"loss\.kind.*sigmoid_ring.*softmax"):
    losses.make_loss_fn("sigmoid_rnig")
