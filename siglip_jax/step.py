"""The one jitted train step (forward, objectives, grads, update), shared by train, bench and
preflight.

The loss is `sum_k weight_k * loss_k` over the objectives on at this step (`objectives`): the
two towers run once, and each objective reads what it needs of their outputs (the embeddings,
the image patch tokens). The state is sharded by the mesh's regex rules and donated; the batch
is sharded over all batch axes. A non-finite loss or gradient leaves the weights untouched and
records the step in `state.bad_step`, so non-finite weights can never reach a checkpoint.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from siglip_jax import microbatch
from siglip_jax.models import naflex_vit
from siglip_jax.objectives import distill, registry


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # completed updates (int32 scalar)
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 key data, so checkpoints need no key-type support
  bad_step: jax.Array    # 0, or the first step whose loss or gradient was not finite
  teacher: Any = flax.struct.field(default_factory=dict)   # SILC/TIPS's EMA teacher, or {}


def tower_params(params, objectives):
  """The two towers' parameters: all but the objectives' own top-level names."""
  own = {name for o in objectives for name in o.param_names}
  return {k: v for k, v in params.items() if k not in own}


def image_input(batch):
  """What the image tower takes from a batch: `image`, or a NaFlex batch's three arrays."""
  if "image" in batch:
    return batch["image"]
  return {k: batch[k] for k in naflex_vit.INPUT_KEYS}


def tower_outputs(model, params, batch, train=False):
  """The towers' intermediates plus `zimg`, `ztxt`: what objectives read."""
  zimg, ztxt, out = model.apply({"params": params}, image_input(batch), batch["text"],
                                train=train)
  return dict(out, zimg=zimg, ztxt=ztxt)


def init_params(model, objectives, rng, example_batch):
  """The towers' parameters and every objective's own (the decoder's, ...)."""
  params = dict(model.init(rng, image_input(example_batch), example_batch["text"])["params"])
  extra = [o for o in objectives if o.param_names]
  if extra:
    tower_out = tower_outputs(model, params, example_batch)
    for k, o in enumerate(extra):
      params.update(o.init(jax.random.fold_in(rng, k + 1), example_batch, tower_out))
  return params


def init_state(model, objectives, tx, rng, example_batch):
  """Initial state (call under jit with out_shardings, or via jax.eval_shape)."""
  init_rng, rng = jax.random.split(rng)
  params = init_params(model, objectives, init_rng, example_batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(rng), bad_step=jnp.zeros((), jnp.int32),
                    teacher=distill.init_teacher(params, objectives))


def _global_norm(tree):
  return optax.tree.norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))


def make_loss_and_grads(model, objectives, active=None, plan=None):
  """`fn(params, batch, teacher) -> (loss, metrics, grads, teacher_means)` of the objectives
  named in `active` (default: all); `teacher_means`: the distillation targets' batch means
  (the centers follow them), {} without SILC/TIPS. `plan` (`microbatch.Plan`, k > 1): the
  batch in k micro-batches by gradient caching, the same loss and gradients."""
  on = [o for o in objectives if active is None or o.name in active]
  distilling = distill.on(on)

  def targets_and_means(teacher, batch):
    targets = distill.teacher_targets(on, teacher, batch)
    return targets, distill.target_means(on, targets)

  if plan is not None and plan.k > 1:
    return microbatch.cached_loss_and_grads(
        plan, objectives=on, split_params=lambda p: tower_params(p, objectives),
        tower_outputs=lambda towers, b: tower_outputs(model, towers, b, train=True),
        teacher_targets=targets_and_means if distilling else None)

  def forward_loss(params, batch, targets):
    tower_out = tower_outputs(model, tower_params(params, objectives), batch, train=True)
    return registry.weighted_sum(on, params, batch, dict(tower_out, **targets))

  def loss_and_grads(params, batch, teacher):
    # The teacher's outputs come from outside the differentiated function: no gradient.
    targets, means = targets_and_means(teacher, batch) if distilling else ({}, {})
    (loss, aux), grads = jax.value_and_grad(forward_loss, has_aux=True)(params, batch, targets)
    return loss, aux, grads, means

  return loss_and_grads


def make_train_step(model, tx, objectives, lr_fn, active=None, teacher_momentum=None,
                    update_mults=None, plan=None):
  """Returns `step(state, batch) -> (state, metrics)` training the objectives named in `active`
  (default: all); jit it with shardings and donation, once per set of active objectives.
  With SILC/TIPS on, `teacher_momentum(step, switch_step)` gives the teacher's EMA momentum.
  `update_mults` (`optim.update_multipliers`): per-param factors on the updates, or None.
  `plan` (`microbatch.Plan`, k > 1): the batch in k micro-batches by gradient caching."""
  on = [o for o in objectives if active is None or o.name in active]
  distilling = distill.on(on)
  loss_and_grads = make_loss_and_grads(model, objectives, active, plan)

  def step(state, batch):
    loss, aux, grads, means = loss_and_grads(state.params, batch, state.teacher)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if update_mults is not None:
      updates = jax.tree_util.tree_map(lambda u, m: u * m if m != 1.0 else u, updates,
                                       update_mults)
    params = optax.apply_updates(state.params, updates)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_step = state.step + 1
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda a, o: jnp.where(finite, a, o), new, old)
    teacher, extra = state.teacher, {}
    if distilling:
      momentum = teacher_momentum(state.step, state.teacher["switch_step"])
      teacher = distill.next_teacher(teacher, params, means, on, momentum)
      extra["train/teacher_momentum"] = momentum
    new_state = TrainState(
        step=new_step,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
        bad_step=jnp.where((state.bad_step == 0) & ~finite, new_step, state.bad_step),
        teacher=keep(teacher, state.teacher))
    metrics = {
        "train/loss": loss,
        "train/lr": lr_fn(state.step),
        "train/grad_norm": grad_norm,
        "train/param_norm": _global_norm(params),
        "train/update_norm": _global_norm(updates),
        **aux,
        **extra,
    }
    return new_state, metrics

  return step
