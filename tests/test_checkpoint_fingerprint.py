"""siglip_jax.checkpoint_fingerprint against a numpy transcription of its definition, on every
way of splitting arrays over the 8 simulated devices."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from siglip_jax import checkpoint_fingerprint  # noqa: E402


def _numpy_sums(x):
  """The fingerprint of one array as checkpoint_fingerprint's docstring defines it, in numpy."""
  x = np.asarray(x)
  u = x.view(f"uint{x.dtype.itemsize * 8}").astype(np.uint32).ravel()
  h = u ^ (np.arange(u.size, dtype=np.uint32) * np.uint32(0x9E3779B9))
  h ^= h >> 16
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> 13
  h *= np.uint32(0xC2B2AE35)
  h ^= h >> 16
  return [int(u.sum(dtype=np.uint32)), int(h.sum(dtype=np.uint32))]


def test_fingerprints_do_not_depend_on_sharding():
  rng = np.random.default_rng(0)
  tree = {"kernel": rng.normal(size=(64, 24)).astype(np.float32),
          "cube": rng.normal(size=(16, 4, 6)).astype(np.float32),
          "half": rng.normal(size=(8, 8)).astype(jnp.bfloat16),
          "ids": np.arange(10, dtype=np.int32), "scalar": np.array(3.0, np.float32)}
  want = {name: _numpy_sums(x) for name, x in tree.items()}
  assert checkpoint_fingerprint.compute(tree)[0] == want   # host arrays
  for n in (1, 2, 4, 8):
    for shape, axes in (((n,), ("data",)), ((n // 2 or 1, 2 if n > 1 else 1), ("data", "fsdp"))):
      mesh = Mesh(np.array(jax.devices()[:n]).reshape(shape), axes)

      def sharding(x):
        split = x.ndim >= len(axes) and all(x.shape[i] % mesh.shape[a] == 0
                                            for i, a in enumerate(axes))
        return NamedSharding(mesh, P(*axes) if split else P())

      placed = jax.device_put(tree, jax.tree_util.tree_map(sharding, tree))
      assert checkpoint_fingerprint.compute(placed)[0] == want, (shape, axes)
  # One flipped bit, and two values swapped, change it.
  flipped = tree["kernel"].copy()
  flipped.view(np.uint32)[5, 7] ^= 1
  swapped = tree["kernel"].copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for bad in (flipped, swapped):
    assert checkpoint_fingerprint.compute({"kernel": bad})[0]["kernel"] != want["kernel"]
