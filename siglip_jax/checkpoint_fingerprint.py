"""Per-array fingerprints of a checkpoint: computed on the devices at every save, checked at
every restore, so damage that still decodes (a flipped bit in an array file) is caught.

An array's fingerprint is two uint32 sums over its bit patterns `u` (each element read as an
unsigned integer of its own width, widened to 32 bits; 64-bit elements as two words):
  plain  sum_i u_i                          any single flipped bit changes it, always
  mixed  sum_i mix(u_i ^ (i * 0x9E3779B9))  moved, swapped or multi-bit damage (mix: murmur3's
                                            32-bit finaliser, i: the global row-major index)
both mod 2^32. Integer addition mod 2^32 is exact, associative and commutative, so XLA gets
the same sums however an array is split over devices and in whatever order it adds the
shards: a checkpoint saved on 4 devices verifies when restored onto 2 or 8. The same sweep
also says whether a floating array is all finite. One pass over the state, on the devices;
only 8 bytes per array come back to the host.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from siglip_jax import mesh as mesh_lib

VERSION = 1   # stored beside the sums: another algorithm later must not be read as damage


def _words(x):
  """x's bit patterns as uint32 (64-bit elements: a trailing axis of two words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return _words(jax.random.key_data(x))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _words(jnp.stack([x.real, x.imag], axis=-1))
  bits = x.dtype.itemsize * 8
  if bits == 64:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if bits in (8, 16, 32) and x.dtype.name not in ("int4", "uint4", "float4_e2m1fn"):
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
  return x.astype(jnp.uint32)   # sub-byte types: their value is their bit pattern


def _mix(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _global_index(shape):
  """Row-major element index (mod 2^32) of every element; XLA gives each shard its own part."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _leaf(x):
  u = _words(x)
  plain = jnp.sum(u, dtype=jnp.uint32)
  mixed = jnp.sum(_mix(u ^ (_global_index(u.shape) * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.array(True))
  return jnp.stack([plain, mixed]), finite


# One small program per distinct (shape, dtype, sharding), not one over the whole tree: a
# B/16 state has ~1240 arrays of 16 shapes, and one program over all of them takes XLA tens of
# seconds to compile on CPU.
_leaf_sums = jax.jit(_leaf)


def compute(tree):
  """-> ({name: [plain, mixed]}, {name: all finite}) for every array in `tree`, names being
  '/'-joined key paths (`params/img/embedding/kernel`). Leaves may be jax arrays of any
  sharding (every process must call this with the same tree: the sums span all devices) or
  host numpy arrays (summed on this process's default device)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [mesh_lib.path_str(path) for path, _ in flat]
  leaves = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in flat]
  if not leaves:
    return {}, {}
  # One program at a time: many small programs with collectives in flight together can
  # deadlock XLA's CPU devices (seen on 4 simulated devices with FSDP-sharded leaves: "only 3
  # of 4 threads arrived" at an all-reduce); each is tiny, so waiting costs little.
  out = [jax.device_get(_leaf_sums(x)) for x in leaves]
  sums = {n: [int(s[0]), int(s[1])] for n, (s, _) in zip(names, out)}
  finite = {n: bool(f) for n, (_, f) in zip(names, out)}
  return sums, finite


def record(tree):
  """What a checkpoint stores (JSON): the version and, per array, its shape, dtype, sums and
  whether it is all finite."""
  sums, finite = compute(tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = {}
  for path, x in flat:
    name = mesh_lib.path_str(path)
    arrays[name] = {"shape": list(np.shape(x)), "dtype": str(x.dtype), "sums": sums[name],
                    "finite": finite[name]}
  return {"version": VERSION, "arrays": arrays}


def differences(stored, tree, prefix=""):
  """Names of the arrays of `tree` that are not as saved: sums other than `stored`'s (a
  `record`, or None for a checkpoint written before fingerprints) or, for an array `stored`
  does not list, values that are not finite (saves refuse those). `prefix` is prepended to
  tree's names (e.g. "params/" for a params-only tree)."""
  sums, finite = compute(tree)
  arrays = (stored or {}).get("arrays", {})
  bad = []
  for name, value in sums.items():
    full = prefix + name
    if full in arrays:
      if list(arrays[full]["sums"]) != value:
        bad.append(full)
    elif not finite[name]:
      bad.append(f"{full} (not finite)")
  return bad
