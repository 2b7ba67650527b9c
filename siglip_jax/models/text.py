"""Text transformer with big_vision's `proj/image_text/text_transformer` names (flax.linen).

big_vision's numerics, which published SigLIP checkpoints were trained with: no padding mask
and no causal mask; texts are padded with the EOS token ("sticky EOS"), so with "last" pooling the
representation is read from the final position, which is always EOS.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from siglip_jax.models.transformer import Dtype, Encoder, MAPHead
from siglip_jax.models.vit import resolve_dims

POOL_TYPES = ("last", "first", "map", "gap", "mean", "max", "gmp")


class TextTransformer(nn.Module):
  """Text tower. `__call__(text, *, train=False) -> (x, out)` like big_vision.

  text: int [N, L] token ids (L fixes `pos_embedding`'s length). x: [N, num_classes] with a
  head, else the pooled [N, width]. Dimensions: explicit values override `variant` ("B", "L",
  "So400m", ...), which overrides big_vision's text defaults (width 512, depth 12, mlp 2048,
  8 heads).
  """
  num_classes: int | None = None
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  vocab_size: int = 32_000
  pool_type: str = "last"
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @property
  def dims(self) -> dict[str, Any]:
    """The resolved width, depth, mlp_dim and num_heads."""
    cfg = resolve_dims(self.variant, dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
                       width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                       num_heads=self.num_heads)
    cfg.pop("patch_size", None)  # a "B/16" variant string is accepted; the patch is moot here
    return cfg

  @nn.compact
  def __call__(self, text, *, train: bool = False):
    del train  # no dropout, as SigLIP
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool_type {self.pool_type!r}; use one of {POOL_TYPES}")
    dims = self.dims
    out = {}

    x = out["embedded"] = nn.Embed(num_embeddings=self.vocab_size, features=dims["width"],
                                   dtype=self.dtype, param_dtype=jnp.float32,
                                   name="Embed_0")(text)
    _, l, d = x.shape
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                    (1, l, d), jnp.float32)
    x = x + pe.astype(x.dtype)

    x, encoder_out = Encoder(
        depth=dims["depth"], mlp_dim=dims["mlp_dim"], num_heads=dims["num_heads"],
        scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
        attention_impl=self.attention_impl, name="Encoder_0")(x)
    out.update({"transformed": x, **encoder_out})
    # big_vision also returns `vocab_logits` (tied-embedding logits, [N, L, vocab]); nothing in a
    # contrastive model reads them and outside jit they cost a vocab-sized matmul, so not here.

    if self.pool_type == "last":
      x = x[:, -1, :]  # sticky EOS: the last token is always EOS
    elif self.pool_type == "first":
      x = x[:, 0, :]
    elif self.pool_type in ("mean", "gap"):
      x = x.mean(axis=1)
    elif self.pool_type in ("max", "gmp"):
      x = x.max(axis=1)
    elif self.pool_type == "map":
      x = MAPHead(num_heads=dims["num_heads"], mlp_dim=dims["mlp_dim"], dtype=self.dtype,
                  name="MAPHead_0")(x)
    out["pre_logits"] = x

    if self.num_classes:
      x = out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                   name="head")(x)
    return x, out
