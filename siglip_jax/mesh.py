"""Device mesh from the config's `mesh` spec, batch shardings and regex parameter-sharding rules.

The batch is sharded over every batch axis together ("data" and "fsdp", FSDP-style: each device
holds its own slice of the batch); "model" is a reserved, non-batch axis. Parameters (and optimizer
state, whose paths contain the parameter path) are replicated or FSDP-sharded by regex rules.
"""
import math
import re

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
ALLOWED_AXES = BATCH_AXES + ("model",)


def make_mesh(mesh_spec, devices=None):
  """Builds a `jax.sharding.Mesh` from `[(name, size), ...]`; one size may be -1 ("the rest").

  Axis types are `Auto` on purpose: `jax.make_mesh` defaults to `Explicit` axes (jax >= 0.7), under
  which a plain `zimg @ ztxt.T` of two batch-sharded arrays is a ShardingTypeError instead of the
  all-gather XLA inserts for the plain losses.
  """
  devices = list(jax.devices() if devices is None else devices)
  spec = [tuple(axis) for axis in mesh_spec]
  names = [axis[0] for axis in spec] if all(len(a) == 2 for a in spec) else None
  if not spec or names is None:
    raise ValueError(f"mesh: expected a non-empty list of (name, size) pairs, got {mesh_spec!r}")
  for name in names:
    if name not in ALLOWED_AXES:
      raise ValueError(f"mesh: unknown axis name {name!r} in {mesh_spec!r}; "
                       f"allowed: {ALLOWED_AXES}")
  if len(set(names)) != len(names):
    raise ValueError(f"mesh: duplicate axis names in {mesh_spec!r}")
  sizes = [int(size) for _, size in spec]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive with at most one -1, got {mesh_spec!r}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {mesh_spec!r} does not fit {len(devices)} devices "
                       f"({len(devices)} is not divisible by {known})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {mesh_spec!r} does not fit {len(devices)} devices "
                     f"(it needs {math.prod(sizes)})")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh):
  """The mesh axes the batch is sharded over, in mesh order."""
  return tuple(name for name in mesh.axis_names if name in BATCH_AXES)


def batch_size_divisor(mesh):
  return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def batch_spec(mesh):
  axes = batch_axes(mesh)
  return P(axes) if axes else P()


def batch_sharding(mesh):
  """Shards an array's leading (batch) dimension over all batch axes together."""
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch_size(global_batch, mesh):
  """Raises unless the global batch splits evenly over the batch axes and the processes."""
  divisor, processes = batch_size_divisor(mesh), jax.process_count()
  if global_batch % divisor:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the {divisor} devices "
                     f"of the batch axes {batch_axes(mesh)} of mesh {dict(mesh.shape)}")
  if global_batch % processes:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the "
                     f"{processes} processes")


# ----------------------------------------------------------------------------- sharding rules

def _parse_rules(rules, mesh):
  """Validates every rule up front (even ones that match nothing): [(compiled, axis or None)]."""
  parsed = []
  for rule in rules:
    try:
      pattern, kind = rule
      compiled = re.compile(pattern)
    except (TypeError, ValueError, re.error) as e:
      raise ValueError(f"sharding rule {rule!r}: expected (regex, kind): {e}") from None
    if kind == "replicate":
      parsed.append((compiled, None))
      continue
    head, _, axis = kind.partition(":")
    axis = axis or "fsdp"
    if head != "fsdp":
      raise ValueError(f"sharding rule {rule!r}: unknown kind {kind!r}; "
                       "use 'replicate', 'fsdp' or 'fsdp:AXIS'")
    if axis not in mesh.axis_names:
      raise ValueError(f"sharding rule {rule!r}: axis {axis!r} is not in the mesh "
                       f"axes {mesh.axis_names}")
    parsed.append((compiled, axis))
  return parsed


def path_str(key_path):
  """'/'-joined names of a jax key path: dict keys, attribute names, sequence indices."""
  parts = []
  for key in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _matches(compiled, path):
  """Full match on the path or on any '/'-suffix of it: optimizer state paths such as
  `0/mu/img/embedding/kernel` then obey the rule written for `img/embedding/kernel`."""
  parts = path.split("/")
  return any(compiled.fullmatch("/".join(parts[k:])) for k in range(len(parts)))


def _fsdp_spec(shape, axis_size, axis, nbytes=None, min_bytes=0):
  """Shards the largest dimension divisible by the axis size (ties: the later dimension, as
  big_vision does); replicates when none is, or when the array is smaller than `min_bytes`
  (a small array's all-gather costs more in latency than its copies cost in memory)."""
  if axis_size == 1 or (nbytes is not None and nbytes < min_bytes):
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


def tree_shardings(tree, mesh, rules, min_size_mb=0.0):
  """NamedShardings for any pytree of arrays / ShapeDtypeStructs (params or optax state).

  `rules`: [(regex, "replicate" | "fsdp" | "fsdp:AXIS")]; the first rule matching the path (see
  `_matches`) wins, unmatched leaves are replicated. An FSDP rule leaves arrays smaller than
  `min_size_mb` MiB replicated (big_vision's `min_size_to_shard_mb`; the configs' default is 4).
  """
  parsed = _parse_rules(rules, mesh)
  min_bytes = float(min_size_mb) * 2**20

  def one(key_path, leaf):
    path = path_str(key_path)
    for compiled, axis in parsed:
      if _matches(compiled, path):
        if axis is None:
          break
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize if hasattr(leaf, "dtype") else None
        return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), mesh.shape[axis], axis,
                                              nbytes, min_bytes))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


param_shardings = tree_shardings


def check_axes_used(mesh, rules):
  """Raises ValueError for a mesh axis of size > 1 that neither the batch nor any sharding rule
  uses: every device along it would compute the same thing, silently."""
  ruled = {axis for _, axis in _parse_rules(rules, mesh) if axis is not None}
  for name in mesh.axis_names:
    if mesh.shape[name] > 1 and name not in BATCH_AXES and name not in ruled:
      raise ValueError(f"mesh axis {name!r} (size {mesh.shape[name]}) is used by no sharding "
                       f"rule and does not split the batch: its {mesh.shape[name]} devices "
                       f"would repeat each other's work; drop it from `mesh`, or shard "
                       f"parameters over it with a rule (regex, 'fsdp:{name}')")
