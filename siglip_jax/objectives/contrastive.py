"""The contrastive objective: the loss of `loss.kind` (sigmoid, ring, gather or softmax) on the
two towers' embeddings, and the logit statistics training logs."""
import jax.numpy as jnp

from siglip_jax import losses, mesh as mesh_lib
from siglip_jax.objectives.registry import Objective


def loss_fn(loss_cfg, mesh, row_chunk=0):
  """The loss of the `loss` config block (`kind`, `bidirectional`) on `mesh` (None: one
  device): `fn(zimg, ztxt, t, b) -> scalar`; `row_chunk` > 0: logits in tiles of that many
  rows (losses.make_loss_fn)."""
  axes = mesh_lib.batch_axes(mesh) if mesh is not None else ("data",)
  return losses.make_loss_fn(loss_cfg.kind, mesh=mesh, batch_axes=axes,
                             bidirectional=bool(loss_cfg.get("bidirectional", False)),
                             row_chunk=row_chunk)


def micro_batch_rows(config, mesh):
  """Rows of one micro-batch a device holds with gradient caching (0 without it): the loss of
  the whole batch then holds logits of that many rows at a time, so its memory stays one
  micro-batch's as K grows."""
  from siglip_jax import microbatch, naflex_config
  k = microbatch.count(config)
  if k == 1:
    return 0
  devices = mesh_lib.batch_size_divisor(mesh) if mesh is not None else 1
  batches = (naflex_config.batch_sizes(config).values() if naflex_config.is_naflex(config)
             else [config.input.batch_size])
  return min(batches) // (k * devices)


def mean_logits(zimg, ztxt, t, b):
  """Mean logit of matching and of non-matching pairs in O(B*D), without the BxB matrix."""
  n = zimg.shape[0]
  diag = jnp.sum(zimg * ztxt)                                  # sum_i <zimg_i, ztxt_i>
  total = jnp.dot(jnp.sum(zimg, 0), jnp.sum(ztxt, 0))          # sum_ij <zimg_i, ztxt_j>
  pos = t * diag / n + b
  neg = t * (total - diag) / float(max(n * (n - 1), 1)) + b   # a float: n^2 passes int32
  return pos, neg


class Contrastive(Objective):
  name = "contrastive"
  coupled = True

  def __init__(self, config, *, mesh, weight, start_step, **unused):
    del unused
    super().__init__(weight, start_step)
    self._fn = loss_fn(config.loss, mesh, row_chunk=micro_batch_rows(config, mesh))

  def loss(self, params, batch, tower_out, norm=None):
    del params, batch, norm
    zimg, ztxt = tower_out["zimg"], tower_out["ztxt"]
    t = tower_out["t"].reshape(())
    b = tower_out["b"].reshape(()) if "b" in tower_out else jnp.zeros((), jnp.float32)
    pos, neg = mean_logits(zimg, ztxt, t, b)
    return self._fn(zimg, ztxt, t, b), {"train/t": t, "train/b": b, "train/pos_logit": pos,
                                          "train/neg_logit": neg}
