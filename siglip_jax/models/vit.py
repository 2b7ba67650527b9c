"""Vision Transformer with big_vision's `vit.Model` parameter names (flax.linen)."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.models.transformer import Dtype, Encoder, MAPHead

# big_vision's variant table (Table 2 of https://arxiv.org/abs/2106.04560, plus later additions):
# name: (width, depth, mlp_dim, num_heads).
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

POOL_TYPES = ("map", "gap", "tok", "0", "none")
POSEMB_TYPES = ("learn", "sincos2d")


def decode_variant(variant: str | None) -> dict:
  """"B" -> {width, depth, mlp_dim, num_heads}; "B/16" also gives patch_size (16, 16)."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"Unknown model variant {variant!r}; known variants: {list(VARIANTS)} "
                     "(optionally with a '/<patch>' suffix, e.g. 'B/16')")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f"Bad patch size in variant {variant!r}: expected e.g. 'B/16'")
    cfg["patch_size"] = (int(patch), int(patch))
  return cfg


def resolve_dims(variant, defaults: dict, **explicit) -> dict:
  """Defaults < variant < explicitly given (non-None) values, as big_vision's `Model(...)`."""
  cfg = {**defaults, **decode_variant(variant)}
  cfg.update({k: v for k, v in explicit.items() if v is not None})
  return cfg


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(s) for s in v)


def check_image_size(image_size, patch_size) -> None:
  """Raises ValueError unless each side of `image_size` is a multiple of `patch_size`.

  Both accept an int or an (h, w) pair. The trainer calls this before compiling, so a bad
  config fails in a second with a clear message instead of after tracing.
  """
  size, patch = _pair(image_size), _pair(patch_size)
  if any(p <= 0 for p in patch) or any(s % p for s, p in zip(size, patch)):
    raise ValueError(f"image_size {size} is not divisible by patch_size {patch}: the patch "
                     "embedding would silently drop border pixels")


def image_tower_dims(tower) -> dict[str, Any]:
  """An image tower's (ViT's, NaFlexViT's) resolved width, depth, mlp_dim, num_heads and
  patch_size: its explicit fields over its variant over B/16."""
  cfg = resolve_dims(tower.variant, dict(width=768, depth=12, mlp_dim=None, num_heads=12,
                                         patch_size=(16, 16)),
                     width=tower.width, depth=tower.depth, mlp_dim=tower.mlp_dim,
                     num_heads=tower.num_heads, patch_size=tower.patch_size)
  cfg["patch_size"] = _pair(cfg["patch_size"])
  return cfg


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.):
  """Fixed 2D sin-cos position embedding [1, h*w, width] (MoCo v3 / big_vision layout)."""
  if width % 4:
    raise ValueError(f"sincos2d posemb needs width divisible by 4, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)[None]


class PatchEmbedding(nn.Module):
  """big_vision's patch convolution (`embedding/kernel` [ph, pw, 3, width], `embedding/bias`,
  nn.Conv's initialisers) computed as patches @ kernel: the same sums, since patches do not
  overlap, but a plain matmul. XLA:CPU runs the convolution's backward pass ~35x slower inside a
  loop (gradient caching's micro-batch scan: 0.015 s -> 0.55 s for 512 demo images)."""
  width: int
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    ph, pw = self.patch_size
    n, height, width, c = image.shape
    kernel = self.param("kernel", nn.linear.default_kernel_init, (ph, pw, c, self.width),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.width,), jnp.float32)
    h, w = height // ph, width // pw
    patches = image.reshape(n, h, ph, w, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, h, w, ph * pw * c)
    kernel = jnp.asarray(kernel, self.dtype).reshape(ph * pw * c, self.width)
    return jnp.dot(patches, kernel) + jnp.asarray(bias, self.dtype)


class ViT(nn.Module):
  """ViT image tower. `__call__(image, *, train=False) -> (x, out)` like big_vision.

  image: [N, H, W, 3], H and W multiples of the patch size. x: [N, num_classes] with a head,
  else the pooled [N, width] ([N, tokens, width] for pool_type "none").
  Dimensions: explicit width/depth/mlp_dim/num_heads/patch_size override `variant`
  ("B/16", "So400m/14", ...), which overrides the defaults (B, patch 16).
  """
  num_classes: int | None = None
  variant: str | None = None
  patch_size: Sequence[int] | None = None  # None: the variant's, else (16, 16)
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None  # None (after the variant): 4 * width
  num_heads: int | None = None
  posemb: str = "learn"
  pool_type: str = "map"
  rep_size: int | bool = False
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @property
  def dims(self) -> dict[str, Any]:
    """The resolved width, depth, mlp_dim, num_heads and patch_size."""
    return image_tower_dims(self)

  @nn.compact
  def __call__(self, image, *, train: bool = False, masked=None, mask_token=None,
               posemb_grid=None):
    """`masked` [N, tokens] bool with `mask_token` [width]: those patch embeddings replaced by
    the token before the position embedding (TIPS, iBOT). `posemb_grid` (h, w): the grid the
    position embedding is defined on when `image` has another one (a distillation crop); it is
    resized to the image's grid (bilinear, antialiased)."""
    del train  # no dropout: SigLIP trains without it, and the forward is the same either way
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool_type {self.pool_type!r}; use one of {POOL_TYPES}")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f"Unknown posemb {self.posemb!r}; use one of {POSEMB_TYPES}")
    dims = self.dims
    check_image_size(image.shape[1:3], dims["patch_size"])
    out = {}
    image = jnp.asarray(image, self.dtype)

    x = out["stem"] = PatchEmbedding(dims["width"], dims["patch_size"], dtype=self.dtype,
                                     name="embedding")(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    if masked is not None:
      x = jnp.where(masked[..., None], jnp.asarray(mask_token, x.dtype), x)

    # Position embedding before any extra token, as big_vision (the [cls] token has none).
    gh, gw = posemb_grid or (h, w)
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)),
                      (1, gh * gw, c), jnp.float32)
    else:
      pe = posemb_sincos_2d(gh, gw, c)
    if (gh, gw) != (h, w):
      pe = jax.image.resize(pe.reshape(gh, gw, c), (h, w, c), "bilinear",
                            antialias=True).reshape(1, h * w, c)
    x = out["with_posemb"] = x + pe.astype(x.dtype)

    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)

    x, out["encoder"] = Encoder(
        depth=dims["depth"], mlp_dim=dims["mlp_dim"], num_heads=dims["num_heads"],
        scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
        attention_impl=self.attention_impl, name="Transformer")(x)
    encoded = out["encoded"] = x

    if self.pool_type == "map":
      x = MAPHead(num_heads=dims["num_heads"], mlp_dim=dims["mlp_dim"], dtype=self.dtype,
                  name="MAPHead_0")(x)
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "0":
      x = x[:, 0]
    elif self.pool_type == "tok":
      x, encoded = x[:, 0], encoded[:, 1:]
    out["head_input"] = x  # for "none": all tokens

    x_2d = jnp.reshape(encoded, [n, h, w, -1])
    if self.rep_size:
      rep_size = dims["width"] if self.rep_size is True else self.rep_size
      hid = nn.Dense(rep_size, dtype=self.dtype, param_dtype=jnp.float32, name="pre_logits")
      x_2d, x = nn.tanh(hid(x_2d)), nn.tanh(hid(x))
    out["pre_logits_2d"], out["pre_logits"] = x_2d, x

    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="head", **kw)
      x_2d = out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)
    return x, out
