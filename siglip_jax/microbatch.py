"""Gradient caching: a step's global batch in K micro-batches, with the loss and gradients of
the whole batch (`input.microbatches`; ../shared/design.md, "Micro-batches").

Contrastive losses couple every pair of the batch, so summing K micro-batches' own losses
(plain accumulation) would change the loss: each would see only its own negatives. Gradient
caching (GradCache, Gao et al. 2021; BASIC) keeps it exact, inside the one jitted step:

1. pass 1: every micro-batch's embeddings (`lax.scan`, no gradient, so no activations kept);
2. the contrastive loss (`loss.kind`, the ring on a mesh) once on the whole batch, and its
   gradient with respect to all embeddings, t and b;
3. pass 2: each micro-batch forward and backward again, its slice of that embedding gradient
   fed in (`sum(z * dL/dz)` has the parameter gradient J^T dL/dz), plus the per-example
   objectives (LocCa, SILC, TIPS) with normalisers taken from the whole batch
   (`Objective.normalizer`), so their shares add up to the global loss; the parameter gradients
   are summed in float32 and the teacher's targets are made per micro-batch.

A micro-batch holds a K-th of every device's rows, so splitting and merging move no data
between devices.
"""
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from siglip_jax import errors
from siglip_jax.objectives import registry


class MicrobatchConfigError(errors.UserError, ValueError):
  """A bad `input.microbatches` (or a batch it cannot split); the message names the key."""


def count(config):
  return int(config.input.get("microbatches", 1))


def check_config(config, batch_devices=None):
  """Raises MicrobatchConfigError naming the key: K must be an integer >= 1, and every global
  batch (a NaFlex run's per length too) divisible by K times `batch_devices` (the batch axes'
  device count, once the mesh is known; else by K)."""
  from siglip_jax import naflex_config   # pylint: disable=import-outside-toplevel
  k = config.input.get("microbatches", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise MicrobatchConfigError(f"config key `input.microbatches` must be an integer >= 1; got "
                                f"{k!r}")
  if k == 1:
    return
  divisor = k * (batch_devices or 1)
  batches = (naflex_config.batch_sizes(config) if naflex_config.is_naflex(config)
             else {None: config.input.batch_size})
  for n, b in batches.items():
    if b % divisor:
      where = f" at length {n}" if n is not None else ""
      devices = f" x {batch_devices} batch-axis devices" if batch_devices else ""
      raise MicrobatchConfigError(
          f"config key `input.microbatches`: the global batch {b}{where} does not split into "
          f"{k} micro-batches{devices} (it must be divisible by {divisor})")


class Plan:
  """How a step's batch splits: `k` micro-batches over the `mesh`'s batch axes (None: one
  device); `param_shardings` keep the float32 gradient sum sharded as the parameters are."""

  def __init__(self, k, mesh=None, param_shardings=None):
    self.k, self.mesh, self.param_shardings = int(k), mesh, param_shardings
    if mesh is None:
      self.axes, self.shards = (), 1
    else:
      from siglip_jax import mesh as mesh_lib   # pylint: disable=import-outside-toplevel
      self.axes = mesh_lib.batch_axes(mesh)
      self.shards = math.prod(mesh.shape[a] for a in self.axes)

  def _constrain(self, x, spec):
    if self.mesh is None or not self.axes:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def split(self, tree):
    """[B, ...] -> [K, B/K, ...]: micro-batch j holds the j-th K-th of every shard's rows."""
    n, k = self.shards, self.k

    def one(x):
      m = x.shape[0] // (n * k)
      y = x.reshape(n, k, m, *x.shape[1:]).swapaxes(0, 1).reshape(k, n * m, *x.shape[1:])
      return self._constrain(y, P(None, self.axes or None))
    return jax.tree_util.tree_map(one, tree)

  def merge(self, tree):
    """The inverse of `split`: [K, B/K, ...] -> [B, ...] in the batch's own order."""
    n, k = self.shards, self.k

    def one(x):
      m = x.shape[1] // n
      y = x.reshape(k, n, m, *x.shape[2:]).swapaxes(0, 1).reshape(n * k * m, *x.shape[2:])
      return self._constrain(y, P(self.axes or None))
    return jax.tree_util.tree_map(one, tree)

  def constrain_like_params(self, grads):
    if self.param_shardings is None:
      return grads
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, grads,
                                  self.param_shardings)


def _sum_f32(acc, grads):
  return jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), acc, grads)


def cached_loss_and_grads(plan, *, tower_outputs, split_params, objectives, teacher_targets):
  """`fn(params, batch, teacher) -> (loss, metrics, grads, teacher_means)`: the objectives in
  `objectives` (those on at this step) over the whole batch, by gradient caching in `plan.k`
  micro-batches. `tower_outputs(tower_params, batch)` runs the towers (train mode);
  `split_params(params)` picks the towers' parameters; `teacher_targets(teacher, batch)` gives
  the distillation targets and their batch means, or None without a teacher."""
  k = plan.k
  coupled = [o for o in objectives if o.coupled]
  local = [o for o in objectives if not o.coupled]

  def embeddings(params, micro):
    """Pass 1: the whole batch's zimg, ztxt [B, D], and t, b; no activations kept."""
    def one(_, mb):
      out = tower_outputs(split_params(_per_micro_batch(params, mb)), mb)
      return None, {key: out[key] for key in ("zimg", "ztxt", "t", "b") if key in out}
    _, z = jax.lax.scan(one, None, micro)
    scalars = {key: z.pop(key)[0] for key in ("t", "b") if key in z}   # the same in every one
    return dict(plan.merge(z), **scalars)

  def contrastive_grads(params, micro):
    """The coupled loss on the whole batch and its gradient w.r.t. zimg, ztxt, t, b."""
    if not coupled:
      return jnp.zeros((), jnp.float32), {}, None

    (total, metrics), g = jax.value_and_grad(
        lambda z: registry.weighted_sum(coupled, params, None, z), has_aux=True)(
            embeddings(params, micro))
    return total, metrics, g

  def fn(params, batch, teacher):
    micro = plan.split(batch)
    norms = {o.name: o.normalizer(batch) for o in local}
    total, metrics, g = contrastive_grads(params, micro)
    cotangents = {} if g is None else plan.split({key: g[key] for key in ("zimg", "ztxt")})

    def surrogate(p, mb, cot, targets):
      """sum(z * dL/dz) (+ t, b's share) has the coupled loss's parameter gradient; the local
      objectives' shares are their own."""
      out = tower_outputs(split_params(p), mb)
      value = jnp.zeros((), jnp.float32)
      if g is not None:
        value = sum(jnp.sum(out[key] * cot[key]) for key in ("zimg", "ztxt"))
        value = value + sum(jnp.sum(out[key] * g[key]) / k for key in ("t", "b") if key in g)
      shares, extra_metrics = registry.weighted_sum(local, p, mb, dict(out, **targets), norms)
      return value + shares, (shares, extra_metrics)

    def one(acc, xs):
      mb, cot = xs
      targets, means = teacher_targets(teacher, mb) if teacher_targets else ({}, {})
      grads, (shares, extra) = jax.grad(surrogate, has_aux=True)(
          _per_micro_batch(params, mb), mb, cot, targets)
      return plan.constrain_like_params(_sum_f32(acc, grads)), (shares, extra, means)

    zeros = plan.constrain_like_params(
        jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), params))
    grads, (shares, extra, means) = jax.lax.scan(one, zeros, (micro, cotangents))
    grads = jax.tree_util.tree_map(lambda s, p: s.astype(p.dtype), grads, params)
    metrics.update(jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), extra))
    means = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), means)
    return total + jnp.sum(shares), metrics, grads, means

  return fn


def _per_micro_batch(params, micro_batch):
  """`params`, tied to this micro-batch: XLA would otherwise hoist the loop-invariant FSDP
  all-gathers out of the micro-batch loops and hold every layer's gathered weights through them
  (FSDP's memory gone); tied, each micro-batch gathers layer by layer as a K = 1 step does."""
  params, _ = jax.lax.optimization_barrier((params, micro_batch))
  return params
