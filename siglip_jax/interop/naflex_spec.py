"""The spec of a NaFlex two-tower model (big_vision's `naflex_vit` image tower), from its arrays.

A NaFlex spec is the spec of interop/big_vision.py with `image_model` set to
"proj.image_text.naflex_vit", `image_size` None and `max_num_patches` (the patch budget the
handle and the HF processor resize images for: not a weight, so it comes from the run, the HF
processor config or the default). Its `image` holds patch_size, width, depth, mlp_dim,
num_heads, pool_type and `posemb_grid` (the side g of the learned [g, g, width] position table).
The arrays say NaFlex by a 2-D patch embedding (`img/embedding/kernel` [p*p*3, width]; the
fixed-size ViT's is a [p, p, 3, width] convolution).
"""
import math

import numpy as np

from siglip_jax.models import two_towers

NAFLEX = two_towers.NAFLEX
# transformers' Siglip2 processor default, and SigLIP 2's published NaFlex budget.
DEFAULT_MAX_NUM_PATCHES = 256


def is_naflex(spec) -> bool:
  return spec.get("image_model") == NAFLEX


def is_naflex_params(flat) -> bool:
  kernel = flat.get("img/embedding/kernel")
  return kernel is not None and np.ndim(kernel) == 2


def image_spec(flat, block, pool_type=None):
  """The NaFlex `image` dict and the image head width (None) of `flat`; `block`: the
  (width, depth, mlp_dim, num_heads) of its transformer (big_vision._block)."""
  k, width = flat["img/embedding/kernel"].shape
  p = math.isqrt(k // 3)
  if p * p * 3 != k:
    raise ValueError(f"img/embedding/kernel has shape {(k, width)}; a NaFlex patch embedding "
                     "is [p*p*3, width] (square RGB patches)")
  d, depth, mlp, heads = block
  if d != width:
    raise ValueError(f"image width: patch embedding {width} vs transformer {d}")
  pe = flat.get("img/pos_embedding")
  if pe is None or np.ndim(pe) != 3 or pe.shape[0] != pe.shape[1]:
    raise ValueError("img/pos_embedding of a NaFlex model must be a square [g, g, width] grid; "
                     f"got {None if pe is None else tuple(pe.shape)}")
  pool = pool_type or ("map" if any(n.startswith("img/MAPHead_0/") for n in flat) else "gap")
  out = flat["img/head/kernel"].shape[-1] if "img/head/kernel" in flat else None
  return dict(patch_size=(p, p), width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
              pool_type=pool, posemb_grid=int(pe.shape[0])), out


def dummy_image(spec):
  """A one-patch NaFlex batch: enough to build the model's params abstractly."""
  p = spec["image"]["patch_size"][0]
  return {"patches": np.zeros((1, 1, p * p * 3), np.float32),
          "patch_mask": np.ones((1, 1), np.int32),
          "spatial_shapes": np.ones((1, 2), np.int32)}


def describe(spec):
  i = spec["image"]
  return (f"NaFlex patch {i['patch_size'][0]} grid {i['posemb_grid']} max_num_patches "
          f"{spec['max_num_patches']}")


def check_big_vision_export(spec):
  """ValueError for a NaFlex spec: no big_vision `.npz` of it is written.

  The weights would map one to one, and the resize itself agrees (jax.image.scale_and_translate
  onto big_vision's canvas, cropped, is transformers' resize within 3e-7:
  tests/models/test_naflex.py), but big_vision's naflex_vit reads a (patches, ptype, yabs, xabs)
  tuple from preprocessing ops this export can neither write nor check, and its fixed 64x64
  canvas leaves any grid over 64 patches a side without position embeddings (NaN), so the file
  would not be known to give this model's embeddings."""
  if is_naflex(spec):
    raise ValueError(
        "a NaFlex model is not exported to big_vision: big_vision's naflex_vit resizes position "
        "embeddings on a fixed 64x64 canvas (NaN for grids over 64 patches a side) and reads its "
        "own (patches, ptype, yabs, xabs) preprocessing, so the .npz would not be known to give "
        "this model's embeddings; use --to=hf (a transformers Siglip2Model folder)")
