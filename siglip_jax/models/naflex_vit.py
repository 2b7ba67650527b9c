"""NaFlex ViT: native aspect ratio, variable resolution (SigLIP 2), big_vision's `naflex_vit`
parameter names, transformers' `Siglip2VisionEmbeddings` numerics.

The input is already cut into patches on the host: `patches` [B, N, p*p*3] (each patch's pixels
in (row, column, channel) order, as transformers' `Siglip2ImageProcessor` writes them),
`patch_mask` [B, N] (1: a real patch, 0: padding) and `spatial_shapes` [B, 2] (each image's
patch grid, height and width; its h*w real patches come first, row by row).
Parameters: `embedding` (Dense [p*p*3, width]), `pos_embedding` [g, g, width] (a square grid,
resized to each image's grid), `Transformer/...` and `MAPHead_0/...` as the fixed-size ViT.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from siglip_jax.models.transformer import Dtype, Encoder, MAPHead
from siglip_jax.models.vit import image_tower_dims

POOL_TYPES = ("map", "gap", "none")
INPUT_KEYS = ("patches", "patch_mask", "spatial_shapes")


def resize_weights(grid: int, spatial_shapes, length: int):
  """[B, length, grid*grid] float32: row n of image b holds the weights with which the learned
  [grid, grid] table makes the position embedding of its n-th patch, its grid resized to
  `spatial_shapes[b]` as `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`.

  Written as weights (not an image resize) because each image has its own output size: one
  batched matmul serves them all under jit. Per axis: output i's centre in source coordinates is
  (i + 0.5) * scale - 0.5; source j weighs max(0, 1 - |j - centre| / max(scale, 1)) (a triangle
  widened by the scale when shrinking: the antialias), normalised over the grid. Padding slots
  (n >= h*w) take the first patch's weights, as transformers does; attention masks them anyway.
  """
  sizes = jnp.asarray(spatial_shapes, jnp.float32)[:, None, :]          # [B, 1, 2]
  n = jnp.arange(length, dtype=jnp.float32)[None, :, None]               # [1, L, 1]
  width = sizes[..., 1:]
  rows = jnp.floor(n / width)
  index = jnp.concatenate([rows, n - rows * width], axis=-1)              # [B, L, 2]
  index = index * (n < jnp.prod(sizes, axis=-1, keepdims=True))
  scale = grid / sizes                                                   # [B, 1, 2]
  support = jnp.maximum(scale, 1.0)
  centre = (index + 0.5) * scale - 0.5
  source = jnp.arange(grid, dtype=jnp.float32)
  w = jnp.maximum(1.0 - jnp.abs(source - centre[..., None]) / support[..., None], 0.0)
  w = w / jnp.sum(w, axis=-1, keepdims=True)                              # [B, L, 2, grid]
  return (w[..., 0, :, None] * w[..., 1, None, :]).reshape(w.shape[0], length, grid * grid)


def resize_posemb(posemb, spatial_shapes, length: int):
  """The [g, g, D] table resized to each image's grid: [B, length, D] float32."""
  g, _, d = posemb.shape
  weights = resize_weights(g, spatial_shapes, length)
  return jnp.einsum("blk,kd->bld", weights, posemb.reshape(g * g, d).astype(jnp.float32),
                    precision="highest")


def check_inputs(image) -> None:
  """A NaFlex batch needs exactly its three keys: one clear error, before tracing further."""
  if not isinstance(image, dict) or set(INPUT_KEYS) - set(image):
    got = sorted(image) if isinstance(image, dict) else type(image).__name__
    raise ValueError(f"a NaFlex image tower takes a dict with {list(INPUT_KEYS)}; got {got}")


class NaFlexViT(nn.Module):
  """`__call__({"patches", "patch_mask", "spatial_shapes"}, *, train=False) -> (x, out)`.

  x: [B, num_classes] with a head, else the pooled [B, width] ([B, N, width] for "none").
  out: "stem", "with_posemb", "encoder", "encoded" ([B, N, width], padding included),
  "patch_mask" (bool [B, N]), "head_input", "pre_logits", "logits" as the fixed-size ViT.
  `posemb_grid`: the side of the learned square position table (16: 256 entries, transformers'
  `num_patches`).
  """
  num_classes: int | None = None
  variant: str | None = None
  patch_size: Sequence[int] | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  posemb_grid: int = 16
  pool_type: str = "map"
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @property
  def dims(self) -> dict[str, Any]:
    return image_tower_dims(self)

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    del train  # no dropout, as the fixed-size tower
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown NaFlex pool_type {self.pool_type!r}; use one of {POOL_TYPES}")
    check_inputs(image)
    dims = self.dims
    ph, pw = dims["patch_size"]
    if ph != pw:
      raise ValueError(f"a NaFlex tower needs square patches; got {dims['patch_size']}")
    patches = jnp.asarray(image["patches"], self.dtype)
    if patches.ndim != 3 or patches.shape[-1] != ph * pw * 3:
      raise ValueError(f"patches must be [B, N, {ph * pw * 3}] (patch {ph}, RGB); got "
                       f"{patches.shape}")
    mask = jnp.asarray(image["patch_mask"]).astype(bool)
    out = {"patch_mask": mask}
    n, length, _ = patches.shape
    c = dims["width"]

    x = out["stem"] = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                               name="embedding")(patches)
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)),
                    (self.posemb_grid, self.posemb_grid, c), jnp.float32)
    pe = resize_posemb(pe, image["spatial_shapes"], length)
    x = out["with_posemb"] = x + pe.astype(x.dtype)

    x, out["encoder"] = Encoder(
        depth=dims["depth"], mlp_dim=dims["mlp_dim"], num_heads=dims["num_heads"],
        scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
        attention_impl=self.attention_impl, name="Transformer")(x, mask)
    out["encoded"] = x

    if self.pool_type == "map":
      x = MAPHead(num_heads=dims["num_heads"], mlp_dim=dims["mlp_dim"], dtype=self.dtype,
                  name="MAPHead_0")(x, mask)
    elif self.pool_type == "gap":
      m = mask[..., None].astype(x.dtype)
      x = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
    out["head_input"] = out["pre_logits"] = x

    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      x = out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype,
                                   param_dtype=jnp.float32, name="head", **kw)(x)
    return x, out
