"""Image-text two-tower model (SigLIP / CLIP / LiT), big_vision's `two_towers.Model` layout.

Parameters: `img/...` (ViT), `txt/...` (TextTransformer), `t` (log of the logit scale) and `b`
(the logit bias; absent when bias_init is None, as for CLIP-style softmax training).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from siglip_jax.models.naflex_vit import NaFlexViT
from siglip_jax.models.text import TextTransformer
from siglip_jax.models.transformer import Dtype
from siglip_jax.models.vit import ViT

# `image_model`: big_vision's names of the image towers implemented here.
IMAGE_MODELS = {"vit": ViT, "proj.image_text.naflex_vit": NaFlexViT}
NAFLEX = "proj.image_text.naflex_vit"


def _l2_normalize(z):
  """float32 norm and normalized copy; the epsilon is big_vision's."""
  z = z.astype(jnp.float32)
  norm = jnp.linalg.norm(z, axis=1, keepdims=True)
  return norm, z / (norm + 1e-8)


class TwoTowers(nn.Module):
  """`__call__(image, text, *, train=False) -> (zimg, ztxt, out)`.

  zimg [N, Di] / ztxt [M, Dt]: L2-normalized float32 embeddings, None where that input is None.
  out: each tower's intermediates under "img/..." / "txt/...", "img/norm", "img/normalized"
  (same for txt), "t" = exp(t param), "t/parameter", and "b" when the model has a bias.
  `image` / `text` hold ViT / TextTransformer keyword arguments; their `num_classes` defaults
  to `out_dim` (an int: both towers; a pair: (image, text); None: no head). `dtype` and
  `attention_impl` apply to both towers unless a tower's dict sets its own. `image_model`
  "proj.image_text.naflex_vit" makes the image tower a `NaFlexViT`: `image` is then the dict
  {"patches", "patch_mask", "spatial_shapes"}.
  """
  image: Mapping[str, Any] | None = None
  image_model: str = "vit"
  text: Mapping[str, Any] | None = None
  out_dim: int | tuple[int | None, int | None] = (None, 768)
  temperature_init: float = 10.0
  bias_init: float | None = -10.0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  def _tower_kwargs(self, cfg, num_classes):
    return {"num_classes": num_classes, "dtype": self.dtype,
            "attention_impl": self.attention_impl, **(cfg or {})}

  @nn.compact
  def __call__(self, image, text=None, *, train: bool = False):
    out_dims = pair_of_out_dims(self.out_dim)
    zimg = ztxt = None
    out = {}

    if text is not None:
      txt = TextTransformer(**self._tower_kwargs(self.text, out_dims[1]), name="txt")
      ztxt, out_txt = txt(text, train=train)
      out.update({f"txt/{k}": v for k, v in out_txt.items()})
      out["txt/norm"], ztxt = _l2_normalize(ztxt)
      out["txt/normalized"] = ztxt

    if image is not None:
      img = IMAGE_MODELS[self.image_model](**self._tower_kwargs(self.image, out_dims[0]),
                                           name="img")
      zimg, out_img = img(image, train=train)
      out.update({f"img/{k}": v for k, v in out_img.items()})
      out["img/norm"], zimg = _l2_normalize(zimg)
      out["img/normalized"] = zimg

    t_init = float(np.log(self.temperature_init))
    t = self.param("t", lambda _, shape, dtype: jnp.full(shape, t_init, dtype), (1,),
                   jnp.float32)
    out["t/parameter"] = t
    out["t"] = jnp.exp(t)
    if self.bias_init is not None:
      b_init = float(self.bias_init)
      out["b"] = self.param("b", lambda _, shape, dtype: jnp.full(shape, b_init, dtype), (1,),
                            jnp.float32)
    return zimg, ztxt, out


def image_tower(model: TwoTowers):
  """`model`'s image tower alone (applied to `params["img"]`): the EMA teacher and the
  distillation views run it without the text tower, t and b."""
  image_dim = pair_of_out_dims(model.out_dim)[0]
  return IMAGE_MODELS[model.image_model](**model._tower_kwargs(model.image, image_dim),  # noqa
                                         parent=None)


def is_naflex(model: TwoTowers) -> bool:
  return model.image_model == NAFLEX


def pair_of_out_dims(out_dim):
  """`out_dim` as (image, text): an int or None applies to both towers."""
  return (out_dim, out_dim) if out_dim is None or isinstance(out_dim, int) else tuple(out_dim)


# Keys of a model config that `from_config` understands; big_vision's `image_model` and
# `text_model` are accepted when they name the towers implemented here.
_KNOWN_KEYS = {"image", "text", "out_dim", "temperature_init", "bias_init", "dtype",
               "attention_impl", "image_model"}
_TEXT_MODEL = "proj.image_text.text_transformer"


def _plain(x):
  """ConfigDict / nested mappings -> dicts, lists -> tuples (hashable module fields)."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_plain(v) for v in x)
  return x


def _dtype(name) -> Any:
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"Unknown dtype {name!r}; use e.g. 'float32' or 'bfloat16'") from e


def _tower(cfg) -> dict | None:
  if cfg is None:
    return None
  cfg = dict(cfg)
  if "dtype_mm" in cfg:  # big_vision's name for the compute dtype
    cfg.setdefault("dtype", cfg.pop("dtype_mm"))
  if cfg.pop("dropout", 0.0):
    raise ValueError("dropout is not supported (SigLIP trains without it)")
  if "dtype" in cfg:
    cfg["dtype"] = _dtype(cfg["dtype"])
  return cfg


def from_config(model_cfg) -> TwoTowers:
  """Builds a TwoTowers from a dict or ml_collections ConfigDict (the `model` config block)."""
  cfg = _plain(model_cfg)
  if cfg.pop("text_model", _TEXT_MODEL) != _TEXT_MODEL:
    raise ValueError(f"text_model must be {_TEXT_MODEL!r} (the only text tower implemented)")
  image_model = cfg.pop("image_model", "vit")
  if image_model not in IMAGE_MODELS:
    raise ValueError(f"image_model {image_model!r} is not implemented; use one of "
                     f"{sorted(IMAGE_MODELS)}")
  unknown = set(cfg) - _KNOWN_KEYS
  if unknown:
    raise ValueError(f"Unknown model config keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
  kw = {k: cfg[k] for k in ("out_dim", "temperature_init", "bias_init", "attention_impl")
        if k in cfg}
  if "dtype" in cfg:
    kw["dtype"] = _dtype(cfg["dtype"])
  return TwoTowers(image=_tower(cfg.get("image")), text=_tower(cfg.get("text")),
                   image_model=image_model, **kw)
