"""The self-distillation projection head (DINO's, as SILC and iBOT/TIPS use it).

MLP (hidden, GELU, hidden, GELU, bottleneck) -> L2 normalisation -> a linear layer without bias
whose weight columns are normalised (DINO's weight norm with its gain fixed at 1), giving
`out_dim` prototype scores. The normalised last layer keeps the scores in [-1, 1] * |x|, so the
temperatures alone set how peaked the softmax is.
"""
import flax.linen as nn
import jax.numpy as jnp

from siglip_jax.models.transformer import Dtype


class DistillHead(nn.Module):
  """`__call__(x [..., D]) -> float32 [..., out_dim]`."""
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  out_dim: int = 65536
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.initializers.truncated_normal(0.02))
    x = nn.gelu(dense(self.hidden_dim, "hidden_0")(x))
    x = nn.gelu(dense(self.hidden_dim, "hidden_1")(x))
    x = dense(self.bottleneck_dim, "bottleneck")(x).astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    v = self.param("prototypes", nn.initializers.truncated_normal(0.02),
                   (self.bottleneck_dim, self.out_dim), jnp.float32)
    w = v / (jnp.linalg.norm(v, axis=0, keepdims=True) + 1e-6)
    return jnp.einsum("...d,dk->...k", x.astype(self.dtype), w.astype(self.dtype)).astype(
        jnp.float32)
