"""Contrastive losses: SigLIP's sigmoid loss (plain, all-gather, ring) and CLIP's softmax loss.

All take L2-normalized `zimg`, `ztxt` of shape [B, D], `t` (the scale, already exponentiated) and
`b` (the bias), as scalars or shape-[1] arrays, and compute in float32 whatever the input dtype.
The sigmoid losses are normalized by the global batch B, as big_vision does. With `row_chunk`
> 0 the plain and ring sigmoid losses score `row_chunk` image rows at a time (one [row_chunk, b]
logit tile at once, recomputed in the backward pass) instead of the whole [B, B] or [b, b] block.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LOSS_KINDS = ("sigmoid_ring", "sigmoid_gather", "sigmoid", "softmax")


def _scalar(x):
  return jnp.reshape(jnp.asarray(x, jnp.float32), ())


def _like(x, ref):
  """A cotangent with `ref`'s dtype and shape (t and b may be scalars or shape [1])."""
  return x.astype(ref.dtype).reshape(ref.shape)


def _logits(zimg, ztxt, t, b):
  return t * jnp.dot(zimg.astype(jnp.float32), ztxt.astype(jnp.float32).T) + b


def _signs(rows, cols, offset=0):
  """+1 where column == row + offset (matching pairs), -1 elsewhere."""
  return 2.0 * jnp.eye(rows, cols, k=offset, dtype=jnp.float32) - 1.0


def _tile_signs(rows, cols, offset):
  """`_signs` built from iotas, for an offset that may be traced (it includes a chunk's start)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return jnp.where(col == row + offset, 1.0, -1.0).astype(jnp.float32)


# --------------------------------------------------------------------------- row chunking

def _fold_chunks(tile, carry, rows, chunk):
  """carry = tile(carry, start, size) over the row chunks [start, start + size): the first
  chunk, a fori_loop over the other full ones, then the rows % chunk left over as one shorter
  chunk. The first is peeled so that in shard_map the loop's carry is already device-varying."""
  full, rest = divmod(rows, chunk)
  carry = tile(carry, 0, chunk)
  if full > 1:
    carry = jax.lax.fori_loop(1, full, lambda i, c: tile(c, i * chunk, chunk), carry)
  return tile(carry, full * chunk, rest) if rest else carry


def _chunked(zi, row_chunk):
  return 0 < row_chunk < zi.shape[0]


def _block_sum(zi, part, t, b, offset, positive, row_chunk=0):
  """sum_ij log sigmoid(s_ij logit_ij) over zi's rows i and part's rows j; s_ij = +1 where
  j == i + offset if `positive`, else -1. `row_chunk` rows of zi at a time (0: all at once)."""
  if not _chunked(zi, row_chunk):
    logits = _logits(zi, part, t, b)
    s = _signs(zi.shape[0], part.shape[0], offset) if positive else -1.0
    return jnp.sum(jax.nn.log_sigmoid(s * logits))
  part32 = part.astype(jnp.float32)

  def tile(total, start, size):
    rows = jax.lax.dynamic_slice_in_dim(zi, start, size).astype(jnp.float32)
    s = _tile_signs(size, part.shape[0], start + offset) if positive else -1.0
    return total + jnp.sum(jax.nn.log_sigmoid(s * (t * jnp.dot(rows, part32.T) + b)))
  return _fold_chunks(tile, jnp.zeros((), jnp.float32), zi.shape[0], row_chunk)


def _dlogits(dots, t, b, scale, s):
  """g = dloss/dlogit for signs s: d/dx of -log sigmoid(s*x) is -s*sigmoid(-s*x)."""
  return -scale * s * jax.nn.sigmoid(-s * (t * dots + b))


def _block_grads(acc, zi32, part, t, b, scale, offset, positive, row_chunk=0):
  """The gradient of -scale * `_block_sum` (its logits recomputed, chunk by chunk): adds the
  block's (dzi, dt, db) to `acc` and returns them with the gradient w.r.t. part."""
  dzi, dt, db = acc
  part32 = part.astype(jnp.float32)
  if not _chunked(zi32, row_chunk):
    dots = jnp.dot(zi32, part32.T)
    s = _signs(zi32.shape[0], part.shape[0], offset) if positive else -1.0
    g = _dlogits(dots, t, b, scale, s)
    dzi, dt, db = dzi + t * jnp.dot(g, part32), dt + jnp.sum(g * dots), db + jnp.sum(g)
    return (dzi, dt, db), t * jnp.dot(g.T, zi32)

  def tile(carry, start, size):
    dzi, dt, db, dpart = carry
    rows = jax.lax.dynamic_slice_in_dim(zi32, start, size)
    dots = jnp.dot(rows, part32.T)
    s = _tile_signs(size, part.shape[0], start + offset) if positive else -1.0
    g = _dlogits(dots, t, b, scale, s)
    drows = jax.lax.dynamic_slice_in_dim(dzi, start, size) + t * jnp.dot(g, part32)
    return (jax.lax.dynamic_update_slice_in_dim(dzi, drows, start, 0), dt + jnp.sum(g * dots),
            db + jnp.sum(g), dpart + t * jnp.dot(g.T, rows))
  dzi, dt, db, dpart = _fold_chunks(tile, (dzi, dt, db, jnp.zeros(part.shape, jnp.float32)),
                                    zi32.shape[0], row_chunk)
  return (dzi, dt, db), dpart


# ------------------------------------------------------------------------- single device

def sigmoid_loss(zimg, ztxt, t, b):
  """-(1/B) * sum_ij log sigmoid(l_ij * (t <zimg_i, ztxt_j> + b)); l_ij = +1 if i == j else -1."""
  logits = _logits(zimg, ztxt, _scalar(t), _scalar(b))
  n = zimg.shape[0]
  return -jnp.sum(jax.nn.log_sigmoid(_signs(n, n) * logits)) / n


@functools.lru_cache(maxsize=None)
def _chunked_sigmoid_fn(row_chunk):
  @jax.custom_vjp
  def loss(zimg, ztxt, t, b):
    return -_block_sum(zimg, ztxt, _scalar(t), _scalar(b), 0, True, row_chunk) / zimg.shape[0]

  def loss_bwd(residuals, ct):
    zimg, ztxt, t, b = residuals
    zero = jnp.zeros((), jnp.float32)
    (dzi, dt, db), dzt = _block_grads(
        (jnp.zeros(zimg.shape, jnp.float32), zero, zero), zimg.astype(jnp.float32), ztxt,
        _scalar(t), _scalar(b), _scalar(ct) / zimg.shape[0], 0, True, row_chunk)
    return dzi.astype(zimg.dtype), dzt.astype(ztxt.dtype), _like(dt, t), _like(db, b)

  loss.defvjp(lambda *args: (loss(*args), args), loss_bwd)
  return loss


def chunked_sigmoid_loss(zimg, ztxt, t, b, *, row_chunk):
  """`sigmoid_loss` scoring `row_chunk` image rows at a time, with a custom_vjp whose backward
  recomputes each chunk's logits: no [B, B] matrix in either pass (row_chunk <= 0: the plain
  `sigmoid_loss`)."""
  if row_chunk <= 0:
    return sigmoid_loss(zimg, ztxt, t, b)
  return _chunked_sigmoid_fn(int(row_chunk))(zimg, ztxt, jnp.asarray(t), jnp.asarray(b))


def softmax_loss(zimg, ztxt, t):
  """CLIP: the mean of the image->text and text->image cross-entropies."""
  logits = _logits(zimg, ztxt, _scalar(t), 0.0)
  i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return (i2t + t2i) / 2


def _batch_spec(batch_axes):
  return P(tuple(batch_axes), None)


def _ring_size(mesh, batch_axes):
  size = 1
  for axis in batch_axes:
    size *= mesh.shape[axis]
  return size


def gather_sigmoid_loss(zimg, ztxt, t, b, *, mesh, batch_axes=("data",)):
  """Each device all-gathers the texts and scores its rows against all of them: [b, B] logits a
  device, the baseline the ring loss improves on. Plain autodiff (all_gather transposes to a
  reduce-scatter)."""
  axes = tuple(batch_axes)
  global_batch = zimg.shape[0]

  def local(zi, zt, t, b):
    zt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)
    rows = zi.shape[0]
    signs = _signs(rows, zt_all.shape[0], offset=jax.lax.axis_index(axes) * rows)
    total = jnp.sum(jax.nn.log_sigmoid(signs * _logits(zi, zt_all, _scalar(t), _scalar(b))))
    return -jax.lax.psum(total, axes) / global_batch

  spec = _batch_spec(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      zimg, ztxt, jnp.asarray(t), jnp.asarray(b))


# ------------------------------------------------------------------------------------ ring

def _ring_fns(axes, n, global_batch, bidirectional, row_chunk=0):
  """Per-device forward and backward of the ring; `n` devices in one ring over `axes` (the
  ppermute index over several axes is their row-major flattening, the same as the shard order,
  though only "every block visits every device once" matters for the value).

  The local text block travels as one or two streams, each (rows, direction, diagonal offset):
  bidirectionally, its first half goes clockwise and its second half counter-clockwise, so each
  hop moves half the bytes over each direction of the links (same n-1 hops, same FLOPs). Each
  block is scored `row_chunk` local image rows at a time (0: all at once; see `_block_sum`).
  """
  def hop(x, direction):
    return jax.lax.ppermute(x, axes, perm=[(k, (k + direction) % n) for k in range(n)])

  def streams(zt):
    rows = zt.shape[0]
    if bidirectional and rows % 2 == 0:  # an odd local batch keeps to one direction
      half = rows // 2
      return [(zt[:half], 1, 0), (zt[half:], -1, -half)]
    return [(zt, 1, 0)]

  def hop_all(parts, dirs):
    return tuple(hop(x, d) for x, d in zip(parts, dirs))

  def forward(zi, zt, t, b):
    t, b = _scalar(t), _scalar(b)
    parts, dirs, offsets = zip(*streams(zt))

    def score(total, parts, positive):
      for part, offset in zip(parts, offsets):
        total = total - _block_sum(zi, part, t, b, offset, positive, row_chunk)
      return total

    # Each hop is issued before the blocks it overlaps with are scored; the last blocks are
    # peeled off the loop so that no hop is sent for nothing.
    incoming = hop_all(parts, dirs)
    total = score(jnp.zeros((), jnp.float32), parts, True)

    def body(_, carry):
      total, current = carry
      incoming = hop_all(current, dirs)
      return score(total, current, False), incoming

    total, current = jax.lax.fori_loop(0, n - 2, body, (total, incoming))
    total = score(total, current, False)
    return jax.lax.psum(total, axes) / global_batch

  def backward(zi, zt, t, b, ct):
    """Recomputes each block's logits. Each text stream travels with its gradient accumulator;
    the accumulator of the block scored last step hops while this step's block is scored."""
    t_in, b_in = t, b
    t, b = _scalar(t), _scalar(b)
    scale = _scalar(ct) / global_batch
    zi32 = zi.astype(jnp.float32)
    parts, dirs, offsets = zip(*streams(zt))

    def grads(dzi, dt, db, parts, positive):
      """Adds the blocks' contributions; returns them with each part's text gradient."""
      dparts = []
      for part, offset in zip(parts, offsets):
        (dzi, dt, db), dpart = _block_grads((dzi, dt, db), zi32, part, t, b, scale, offset,
                                            positive, row_chunk)
        dparts.append(dpart)
      return dzi, dt, db, tuple(dparts)

    zero = jnp.zeros((), jnp.float32)
    dzi, dt, db, accs = grads(jnp.zeros(zi.shape, jnp.float32), zero, zero, parts, True)
    incoming = hop_all(parts, dirs)

    def step(carry, last):
      dzi, dt, db, accs_prev, current = carry
      nxt = None if last else hop_all(current, dirs)
      accs_in = hop_all(accs_prev, dirs)  # the accumulators of `current`, from upstream
      dzi, dt, db, dparts = grads(dzi, dt, db, current, False)
      return dzi, dt, db, tuple(a + d for a, d in zip(accs_in, dparts)), nxt

    carry = jax.lax.fori_loop(0, n - 2, lambda _, c: step(c, False),
                              (dzi, dt, db, accs, incoming))
    dzi, dt, db, accs, _ = step(carry, True)
    dzt = jnp.concatenate(hop_all(accs, dirs), axis=0)  # one last hop brings them home
    dt, db = jax.lax.psum(dt, axes), jax.lax.psum(db, axes)
    return dzi.astype(zi.dtype), dzt.astype(zt.dtype), _like(dt, t_in), _like(db, b_in)

  return forward, backward


@functools.lru_cache(maxsize=None)
def _ring_loss_fn(mesh, axes, global_batch, bidirectional, row_chunk):
  """A custom_vjp over two shard_map'd functions: keeping custom_vjp outside shard_map gives
  the replicated t and b plain (psum'd) cotangents."""
  forward, backward = _ring_fns(axes, _ring_size(mesh, axes), global_batch, bidirectional,
                                row_chunk)
  spec = _batch_spec(axes)
  fwd_sharded = jax.shard_map(forward, mesh=mesh, in_specs=(spec, spec, P(), P()),
                              out_specs=P())
  bwd_sharded = jax.shard_map(backward, mesh=mesh, in_specs=(spec, spec, P(), P(), P()),
                              out_specs=(spec, spec, P(), P()))

  @jax.custom_vjp
  def loss(zimg, ztxt, t, b):
    return fwd_sharded(zimg, ztxt, t, b)

  def loss_fwd(zimg, ztxt, t, b):
    return fwd_sharded(zimg, ztxt, t, b), (zimg, ztxt, t, b)

  def loss_bwd(residuals, ct):
    return bwd_sharded(*residuals, ct)

  loss.defvjp(loss_fwd, loss_bwd)
  return loss


def ring_sigmoid_loss(zimg, ztxt, t, b, *, mesh, batch_axes=("data",), bidirectional=False,
                      row_chunk=0):
  """`sigmoid_loss` for batch-sharded inputs with per-device memory O(b^2 + b*d), flat in the
  device count n: text blocks rotate around a ring of the devices of `batch_axes` (n-1 hops),
  and the backward pass is a ring too (plain autodiff would keep all n rotated blocks).
  `bidirectional=True` sends half of each block each way round the ring (see `_ring_fns`);
  `row_chunk` > 0 scores that many local rows at a time: O(row_chunk * b) logits a device."""
  axes = tuple(batch_axes)
  if _ring_size(mesh, axes) == 1:
    return chunked_sigmoid_loss(zimg, ztxt, t, b, row_chunk=row_chunk)
  fn = _ring_loss_fn(mesh, axes, zimg.shape[0], bool(bidirectional), max(int(row_chunk), 0))
  return fn(zimg, ztxt, jnp.asarray(t), jnp.asarray(b))


def make_loss_fn(kind, mesh=None, batch_axes=("data",), *, bidirectional=False, row_chunk=0):
  """`fn(zimg, ztxt, t, b) -> scalar` for `loss.kind`; softmax ignores b. Without a mesh the
  distributed sigmoid kinds are the plain loss. `bidirectional` applies to "sigmoid_ring".
  `row_chunk` > 0 caps the logits a device holds at [row_chunk, local batch] for "sigmoid" and
  "sigmoid_ring" (rows left over form one shorter chunk); "sigmoid_gather" ([b, B] logits) and
  "softmax" ([B, B]) ignore it: their memory grows with the global batch."""
  if kind not in LOSS_KINDS:
    raise ValueError(f"loss.kind={kind!r} is unknown; allowed: {', '.join(LOSS_KINDS)}")
  if kind == "softmax":
    return lambda zimg, ztxt, t, b: softmax_loss(zimg, ztxt, t)
  if kind == "sigmoid" or mesh is None:
    if row_chunk > 0:
      return functools.partial(chunked_sigmoid_loss, row_chunk=row_chunk)
    return sigmoid_loss
  if kind == "sigmoid_ring":
    return functools.partial(ring_sigmoid_loss, mesh=mesh, batch_axes=tuple(batch_axes),
                             bidirectional=bidirectional, row_chunk=row_chunk)
  return functools.partial(gather_sigmoid_loss, mesh=mesh, batch_axes=tuple(batch_axes))
