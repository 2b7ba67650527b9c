"""Token cross-entropy over a large vocabulary, computed in vocabulary chunks.

SigLIP 2's decoder predicts over Gemma's 256k vocabulary: the plain `h @ W` would hold float32
logits `[tokens, vocab]` (2 GB for 2,048 tokens) in the forward pass and again as their gradient
in the backward pass. Here the logits exist one chunk `[tokens, chunk]` at a time: the forward
pass keeps a running log-sum-exp over the chunks (`lax.scan`), the backward pass recomputes each
chunk's logits and turns them into the chunk's gradient at once (a `custom_vjp`). No library
does this for JAX with a custom backward (optax's losses take materialised logits), hence here.

`token_nll(h, kernel, bias, targets)` -> per-token negative log-likelihoods `[tokens]` in float32,
`-log softmax(h @ kernel + bias)[target]`; callers weight and average them (padding, tasks).
"""
import functools

import jax
import jax.numpy as jnp


def _window(kernel, bias, i, chunk):
  """Chunk i's columns: the window [start, start + chunk) with start = min(i * chunk, V - chunk),
  so the last window stays inside the array (no padded copy of the kernel); `fresh` marks the
  columns no earlier chunk covered."""
  v = kernel.shape[1]
  start = jnp.minimum(i * chunk, v - chunk)
  k = jax.lax.dynamic_slice_in_dim(kernel, start, chunk, axis=1)
  b = jax.lax.dynamic_slice_in_dim(bias, start, chunk).astype(jnp.float32)
  fresh = start + jnp.arange(chunk) >= i * chunk
  return start, k, b, fresh


def _chunk_logits(h, k, b, fresh):
  logits = jnp.dot(h, k.astype(h.dtype), preferred_element_type=jnp.float32) + b
  return jnp.where(fresh[None, :], logits, -jnp.inf)


def _num_chunks(kernel, chunk):
  return -(-kernel.shape[1] // chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll(h, kernel, bias, targets, chunk):
  return _nll_fwd(h, kernel, bias, targets, chunk)[0]


def _nll_fwd(h, kernel, bias, targets, chunk):
  n_tok = h.shape[0]

  def body(carry, i):
    m, s, tgt = carry
    start, k, b, fresh = _window(kernel, bias, i, chunk)
    logits = _chunk_logits(h, k, b, fresh)                       # [N, chunk] float32
    new_m = jnp.maximum(m, jnp.max(logits, axis=1))
    s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=1)
    local = targets - start
    here = (targets >= i * chunk) & (local < chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=1)[:, 0]
    tgt = jnp.where(here, picked, tgt)
    return (new_m, s, tgt), None

  init = (jnp.full((n_tok,), -jnp.inf, jnp.float32), jnp.zeros((n_tok,), jnp.float32),
          jnp.zeros((n_tok,), jnp.float32))
  (m, s, tgt), _ = jax.lax.scan(body, init, jnp.arange(_num_chunks(kernel, chunk)))
  lse = m + jnp.log(s)
  return lse - tgt, (h, kernel, bias, targets, lse)


def _nll_bwd(chunk, residuals, g):
  h, kernel, bias, targets, lse = residuals
  g = g.astype(jnp.float32)
  h32 = h.astype(jnp.float32)

  def body(carry, i):
    dh, dk, db = carry
    start, k, b, fresh = _window(kernel, bias, i, chunk)
    logits = _chunk_logits(h, k, b, fresh)
    # d nll / d logit = softmax - onehot(target), times the token's cotangent; columns of an
    # earlier chunk (fresh False) have softmax exp(-inf) = 0 and no target here.
    onehot = ((targets - start)[:, None] == jnp.arange(chunk)[None, :]) & fresh[None, :]
    dlogits = (jnp.exp(logits - lse[:, None]) - onehot) * g[:, None]
    dh = dh + jnp.dot(dlogits, k.astype(jnp.float32).T)
    add = lambda full, part: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        full, jax.lax.dynamic_slice_in_dim(full, start, chunk, axis=-1) + part, start, axis=-1)
    dk = add(dk, jnp.dot(h32.T, dlogits))
    db = add(db, jnp.sum(dlogits, axis=0))
    return (dh, dk, db), None

  init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32),
          jnp.zeros(bias.shape, jnp.float32))
  (dh, dk, db), _ = jax.lax.scan(body, init, jnp.arange(_num_chunks(kernel, chunk)))
  return dh.astype(h.dtype), dk.astype(kernel.dtype), db.astype(bias.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def token_nll(h, kernel, bias, targets, *, chunk=8192):
  """h [N, D], kernel [D, V], bias [V], targets int [N] in [0, V) -> float32 [N].

  Memory: O(N * chunk) for the logits in both passes, whatever V. `targets` gets no gradient.
  """
  chunk = int(min(chunk, kernel.shape[1]))
  return _nll(h, kernel, bias, jnp.asarray(targets, jnp.int32), chunk)


def plain_token_nll(h, kernel, bias, targets):
  """The same value with the full [N, V] logits: the reference the chunked one must equal."""
  logits = jnp.dot(h, kernel, preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=1)[:, 0]
