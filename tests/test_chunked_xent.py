"""Cross-entropy in vocabulary chunks: the plain value and gradients, a fraction of the memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax import chunked_xent as cx


def _numpy_nll_and_grads(h, k, b, t, w):
  """float64 reference of sum_i w_i * nll_i and its gradients, by hand."""
  h, k, b = (np.asarray(x, np.float64) for x in (h, k, b))
  logits = h @ k + b
  logits -= logits.max(1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(1, keepdims=True)
  nll = -np.log(p[np.arange(len(t)), t])
  d = p.copy()
  d[np.arange(len(t)), t] -= 1
  d *= np.asarray(w, np.float64)[:, None]
  return nll, d @ k.T, h.T @ d, d.sum(0)


@pytest.mark.parametrize("v, chunk", [(1000, 128), (1000, 1000), (1000, 4096), (96, 32)])
def test_chunked_equals_float64_reference(v, chunk):
  rng = np.random.default_rng(v + chunk)
  n, d = 37, 16
  h = rng.normal(size=(n, d)).astype(np.float32)
  k = (rng.normal(size=(d, v)) * 0.3).astype(np.float32)
  b = rng.normal(size=(v,)).astype(np.float32)
  t = rng.integers(0, v, n).astype(np.int32)
  t[:3] = [0, v - 1, v - chunk % v if chunk < v else 5]   # both ends and a window boundary
  w = rng.uniform(size=n).astype(np.float32)
  f = lambda h, k, b: jnp.sum(w * cx.token_nll(h, k, b, t, chunk=chunk))  # noqa: E731
  nll = cx.token_nll(h, k, b, t, chunk=chunk)
  grads = jax.grad(f, argnums=(0, 1, 2))(h, k, b)
  ref_nll, *ref_grads = _numpy_nll_and_grads(h, k, b, t, w)
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(nll, cx.plain_token_nll(h, k, b, t), rtol=1e-5, atol=1e-5)


def test_memory_at_gemma_vocabulary_is_a_fraction_of_the_plain_loss():
  """value_and_grad at vocabulary 256,000, width 768, 64 tokens x batch 32 (compiled only)."""
  n, d, v = 64 * 32, 768, 256_000
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((v,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))

  def temp_bytes(nll):
    loss = lambda h, k, b, t: jnp.mean(nll(h, k, b, t))  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked, plain = temp_bytes(cx.token_nll), temp_bytes(cx.plain_token_nll)
  print(f"temp: chunked {chunked / 2**20:.0f} MiB, plain {plain / 2**20:.0f} MiB")
  assert plain > n * v * 4          # the plain loss holds the full float32 logits
  assert chunked <= plain / 4
