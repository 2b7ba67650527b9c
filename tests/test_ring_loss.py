"""Ring and all-gather sigmoid losses on simulated CPU devices: values, gradients, memory."""
import functools
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from siglip_jax import losses, mesh as mesh_lib  # noqa: E402

try:
  from test_losses import (assert_close, check_bf16, check_sigmoid, embeddings,
                           np_sigmoid_loss_and_grads)
except ImportError:
  from tests.test_losses import (assert_close, check_bf16, check_sigmoid, embeddings,
                                 np_sigmoid_loss_and_grads)

# CPU devices even on an accelerator machine: the forced host device count applies to CPU only.
CPU = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPU) < 8, reason="needs 8 simulated CPU devices")

MESHES = {
    "data8": [("data", 8)],
    "data2_fsdp4": [("data", 2), ("fsdp", 4)],
    "data4": [("data", 4)],
    "data2": [("data", 2)],
}
DISTRIBUTED = {"ring": losses.ring_sigmoid_loss, "gather": losses.gather_sigmoid_loss,
               "ring_bidirectional": functools.partial(losses.ring_sigmoid_loss,
                                                       bidirectional=True)}


def make(spec):
  size = int(np.prod([s for _, s in spec]))
  return mesh_lib.make_mesh(spec, devices=CPU[:size])


def sharded_value_and_grad(fn, mesh):
  """jit(value_and_grad) of the distributed loss, called with batch-sharded inputs."""
  axes = mesh_lib.batch_axes(mesh)
  vg = jax.jit(jax.value_and_grad(lambda zi, zt, t, b: fn(zi, zt, t, b, mesh=mesh,
                                                           batch_axes=axes),
                                  argnums=(0, 1, 2, 3)))

  def call(zi, zt, t, b):
    place = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh))
    rep = lambda x: jax.device_put(x, mesh_lib.replicated(mesh))
    return vg(place(zi), place(zt), rep(t), rep(b))
  return call


@pytest.mark.parametrize("kind", sorted(DISTRIBUTED))
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_distributed_loss_matches_reference(kind, mesh_name):
  mesh = make(MESHES[mesh_name])
  fn = sharded_value_and_grad(DISTRIBUTED[kind], mesh)
  zi, zt = embeddings(8 * mesh.size, 16)  # 8 rows a device
  for t, b in [(10.0, -10.0), (112.0, -16.5)]:
    check_sigmoid(fn, zi, zt, jnp.float32(t), jnp.float32(b))
  check_sigmoid(fn, zi, zt, jnp.array([3.0]), jnp.array([-2.0]))  # shape-[1] t, b


def test_ring_loss_eager_and_single_device():
  zi, zt = embeddings(32, 8, seed=3)
  ref = np_sigmoid_loss_and_grads(zi, zt, 10.0, -10.0)[0]
  mesh = make(MESHES["data8"])
  assert_close(losses.ring_sigmoid_loss(zi, zt, 10.0, -10.0, mesh=mesh), ref)
  one = mesh_lib.make_mesh([("data", 1)], devices=CPU[:1])
  assert_close(losses.ring_sigmoid_loss(zi, zt, 10.0, -10.0, mesh=one), ref)


def test_ring_loss_bf16_inputs():
  mesh = make(MESHES["data8"])
  zi, zt = embeddings(64, 8, seed=4)
  check_bf16(lambda zi, zt: losses.ring_sigmoid_loss(zi, zt, 112.0, -16.5, mesh=mesh), zi, zt)


def test_make_loss_fn_uses_mesh():
  mesh = make(MESHES["data2_fsdp4"])
  zi, zt = embeddings(16, 4)
  for kind, bidirectional in [("sigmoid_ring", False), ("sigmoid_ring", True),
                              ("sigmoid_gather", False), ("sigmoid", False)]:
    fn = losses.make_loss_fn(kind, mesh, mesh_lib.batch_axes(mesh), bidirectional=bidirectional)
    ref = np_sigmoid_loss_and_grads(zi, zt, 10.0, -10.0)[0]
    assert_close(jax.jit(fn)(zi, zt, 10.0, -10.0), ref)



def temp_bytes(fn, n, per_device=1024, dim=256):
  """Compiled scratch memory a device of fn's value_and_grad at a fixed per-device batch."""
  mesh = mesh_lib.make_mesh([("data", n)], devices=CPU[:n])
  z = jax.ShapeDtypeStruct((n * per_device, dim), jnp.float32,
                           sharding=mesh_lib.batch_sharding(mesh))
  s = jax.ShapeDtypeStruct((), jnp.float32, sharding=mesh_lib.replicated(mesh))
  vg = jax.jit(jax.value_and_grad(lambda zi, zt, t, b: fn(zi, zt, t, b, mesh),
                                  argnums=(0, 1, 2, 3)))
  return vg.lower(z, z, s, s).compile().memory_analysis().temp_size_in_bytes


def test_ring_loss_memory_flat_in_device_count():
  ring = lambda zi, zt, t, b, mesh: losses.ring_sigmoid_loss(zi, zt, t, b, mesh=mesh)
  plain = lambda zi, zt, t, b, mesh: losses.sigmoid_loss(zi, zt, t, b)
  bidi = lambda zi, zt, t, b, mesh: losses.ring_sigmoid_loss(zi, zt, t, b, mesh=mesh,
                                                             bidirectional=True)
  ring2, ring8, plain8 = temp_bytes(ring, 2), temp_bytes(ring, 8), temp_bytes(plain, 8)
  report = (f"temp MiB: ring@2={ring2 / 2**20:.1f} ring@8={ring8 / 2**20:.1f} "
            f"plain@8={plain8 / 2**20:.1f}")
  assert ring8 <= 1.25 * ring2, report
  assert ring8 <= 0.5 * plain8, report
  bidi2, bidi8 = temp_bytes(bidi, 2), temp_bytes(bidi, 8)
  report += f" bidirectional@2={bidi2 / 2**20:.1f} bidirectional@8={bidi8 / 2**20:.1f}"
  assert bidi8 <= 1.25 * bidi2 and bidi8 <= 0.5 * plain8, report
