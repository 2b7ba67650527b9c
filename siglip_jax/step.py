"""The one jitted train step (forward, loss, grads, update), shared by train, bench and preflight.

The state is sharded by the mesh's regex rules and donated; the batch is sharded over all batch
axes. A non-finite loss or gradient leaves the weights untouched and records the step in
`state.bad_step`, so non-finite weights can never reach a checkpoint.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from siglip_jax import losses, mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # completed updates (int32 scalar)
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 key data, so checkpoints need no key-type support
  bad_step: jax.Array    # 0, or the first step whose loss or gradient was not finite


def init_state(model, tx, rng, example_batch):
  """Initial state (call under jit with out_shardings, or via jax.eval_shape)."""
  init_rng, rng = jax.random.split(rng)
  params = model.init(init_rng, example_batch["image"], example_batch["text"])["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(rng), bad_step=jnp.zeros((), jnp.int32))


def _mean_logits(zimg, ztxt, t, b):
  """Mean logit of matching and of non-matching pairs in O(B*D), without the BxB matrix."""
  n = zimg.shape[0]
  diag = jnp.sum(zimg * ztxt)                                  # sum_i <zimg_i, ztxt_i>
  total = jnp.dot(jnp.sum(zimg, 0), jnp.sum(ztxt, 0))          # sum_ij <zimg_i, ztxt_j>
  pos = t * diag / n + b
  neg = t * (total - diag) / max(n * (n - 1), 1) + b
  return pos, neg


def _global_norm(tree):
  return optax.global_norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(model, tx, loss_fn, lr_fn):
  """Returns `step(state, batch) -> (state, metrics)`; jit it with shardings and donation."""

  def forward_loss(params, batch):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"], train=True)
    t = out["t"].reshape(())
    b = out["b"].reshape(()) if "b" in out else jnp.zeros((), jnp.float32)
    loss = loss_fn(zimg, ztxt, t, b)
    pos, neg = _mean_logits(zimg, ztxt, t, b)
    return loss, dict(t=t, b=b, pos_logit=pos, neg_logit=neg)

  def step(state, batch):
    (loss, aux), grads = jax.value_and_grad(forward_loss, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_step = state.step + 1
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, o: jnp.where(finite, a, o), new, old)
    new_state = TrainState(
        step=new_step,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
        bad_step=jnp.where((state.bad_step == 0) & ~finite, new_step, state.bad_step))
    metrics = {
        "train/loss": loss,
        "train/t": aux["t"],
        "train/b": aux["b"],
        "train/lr": lr_fn(state.step),
        "train/grad_norm": grad_norm,
        "train/param_norm": _global_norm(params),
        "train/update_norm": _global_norm(updates),
        "train/pos_logit": aux["pos_logit"],
        "train/neg_logit": aux["neg_logit"],
    }
    return new_state, metrics

  return step


def make_loss_fn(loss_kind, mesh):
  return losses.make_loss_fn(loss_kind, mesh=mesh, batch_axes=mesh_lib.batch_axes(mesh))
