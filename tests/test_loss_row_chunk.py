"""`row_chunk`: the plain and ring sigmoid losses scoring a few image rows at a time match the
float64 reference (values and gradients), and the single-device one never holds the [B, B]
matrix."""
import jax
import jax.numpy as jnp
import pytest

from siglip_jax import losses, mesh as mesh_lib
from test_losses import (assert_close, check_bf16, check_sigmoid, embeddings,
                         np_sigmoid_loss_and_grads)

CPU = jax.devices("cpu")
TB = [(jnp.float32(112.0), jnp.float32(-16.5)), (jnp.array([3.0]), jnp.array([-2.0]))]


def value_and_grad(fn, mesh=None):
  """jit(value_and_grad) of fn w.r.t. all four inputs; batch-sharded inputs on a mesh."""
  vg = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
  if mesh is None:
    return vg

  def call(zi, zt, t, b):
    place = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh))
    rep = lambda x: jax.device_put(x, mesh_lib.replicated(mesh))
    return vg(place(zi), place(zt), rep(t), rep(b))
  return call


@pytest.mark.parametrize("row_chunk", [4, 5, 24])  # 5: a shorter last chunk; 24: one chunk
def test_chunked_sigmoid_matches_reference(row_chunk):
  zi, zt = embeddings(24, 16, seed=5)
  fn = value_and_grad(losses.make_loss_fn("sigmoid", row_chunk=row_chunk))
  for t, b in TB:
    check_sigmoid(fn, zi, zt, t, b)


def test_chunked_sigmoid_bf16_and_fallbacks():
  zi, zt = embeddings(16, 8, seed=6)
  chunked = losses.make_loss_fn("sigmoid", row_chunk=3)
  check_bf16(lambda zi, zt: chunked(zi, zt, 112.0, -16.5), zi, zt)
  # Without a mesh, or a ring of one device, every sigmoid kind is the chunked plain loss.
  one = mesh_lib.make_mesh([("data", 1)], devices=CPU[:1])
  ref = np_sigmoid_loss_and_grads(zi, zt, 10.0, -10.0)[0]
  for kind in ("sigmoid", "sigmoid_ring", "sigmoid_gather"):
    assert_close(jax.jit(losses.make_loss_fn(kind, row_chunk=4))(zi, zt, 10.0, -10.0), ref)
  check_sigmoid(value_and_grad(losses.make_loss_fn("sigmoid_ring", one, row_chunk=6)),
                zi, zt, jnp.float32(10.0), jnp.float32(-10.0))
  assert losses.make_loss_fn("sigmoid") is losses.sigmoid_loss  # row_chunk=0: unchanged


@pytest.mark.skipif(len(CPU) < 4, reason="needs 4 simulated CPU devices")
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("row_chunk", [4, 5])  # 12 local rows: 3 chunks, or 2 and a 2-row rest
def test_chunked_ring_matches_reference(bidirectional, row_chunk):
  mesh = mesh_lib.make_mesh([("data", 4)], devices=CPU[:4])
  fn = losses.make_loss_fn("sigmoid_ring", mesh, ("data",), bidirectional=bidirectional,
                           row_chunk=row_chunk)
  zi, zt = embeddings(4 * 12, 16, seed=7)
  for t, b in TB if bidirectional and row_chunk == 5 else TB[:1]:  # one compile a (t, b) shape
    check_sigmoid(value_and_grad(fn, mesh), zi, zt, t, b)


def temp_bytes(fn, batch, dim, mesh=None):
  """Compiled scratch memory (a device's, on a mesh) of fn's value_and_grad."""
  shard = lambda s: {} if mesh is None else {"sharding": s(mesh)}
  z = jax.ShapeDtypeStruct((batch, dim), jnp.float32, **shard(mesh_lib.batch_sharding))
  s = jax.ShapeDtypeStruct((), jnp.float32, **shard(mesh_lib.replicated))
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(z, z, s, s).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_sigmoid_memory_has_no_batch_squared_matrix():
  batch, dim = 4096, 64
  plain = temp_bytes(losses.sigmoid_loss, batch, dim)
  chunked = temp_bytes(losses.make_loss_fn("sigmoid", row_chunk=256), batch, dim)
  report = f"temp MiB: plain={plain / 2**20:.1f} chunked={chunked / 2**20:.1f}"
  assert plain >= batch * batch * 4, report  # the [B, B] float32 logits, at least
  assert chunked < plain / 4 and chunked < batch * batch * 4 / 4, report


@pytest.mark.skipif(len(CPU) < 4, reason="needs 4 simulated CPU devices")
def test_chunked_ring_memory_below_local_block():
  mesh = mesh_lib.make_mesh([("data", 4)], devices=CPU[:4])
  local, dim = 1024, 64
  ring, chunked = (temp_bytes(losses.make_loss_fn("sigmoid_ring", mesh, ("data",),
                                                   row_chunk=c), 4 * local, dim, mesh)
                   for c in (0, 64))
  report = f"temp MiB a device: ring={ring / 2**20:.1f} chunked={chunked / 2**20:.1f}"
  assert ring >= local * local * 4, report  # a [b, b] float32 block, at least
  assert chunked < ring / 4, report
