"""Transformer blocks shared by the image and text towers (flax.linen).

Module and parameter names follow big_vision's `vit.py` exactly (`MlpBlock_0/Dense_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `encoderblock_{i}`, `encoder_norm`,
`MAPHead_0/probe`, ...), so a published SigLIP checkpoint loads without renaming. The numerics are
big_vision's too: pre-LayerNorm blocks (eps 1e-6), tanh-approximate GELU, xavier-uniform kernels.

Precision: parameters are always float32; `dtype` is the compute dtype (activations, matmuls).
LayerNorm statistics are computed in float32 by flax whatever `dtype` is.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any  # a jnp dtype or its name ("float32", "bfloat16")

# Attention through `jax.nn.dot_product_attention`; "xla" forced where a fused kernel can't run.
XLA_ATTENTION = "xla"


def policy_from_name(remat_policy: str | None):
  """Maps a `jax.checkpoint_policies` name to (remat?, policy).

  "none" (or None) means no rematerialization at all; any other value must name a policy in
  `jax.checkpoint_policies` ("nothing_saveable", "dots_saveable", ...).
  """
  if remat_policy is None or remat_policy == "none":
    return False, None
  policy = getattr(jax.checkpoint_policies, remat_policy, None)
  if policy is None or remat_policy.startswith("_"):
    known = sorted(p for p in dir(jax.checkpoint_policies) if not p.startswith("_"))
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; use 'none' or one of {known}")
  return True, policy


class MultiHeadAttention(nn.Module):
  """Multi-head attention with flax `MultiHeadDotProductAttention`'s parameter layout.

  Instantiated as `MultiHeadDotProductAttention_0` so the names match big_vision. The attention
  itself goes through `jax.nn.dot_product_attention`, so `attention_impl="cudnn"` selects the
  fused GPU kernel; None/"xla" is the portable path (scale 1/sqrt(head_dim), as flax).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None):
    """`mask`: boolean, broadcastable to [B, heads, Tq, Tkv]; True where a query may attend."""
    d = inputs_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    head_dim = d // self.num_heads
    dense = lambda name, **kw: nn.DenseGeneral(  # noqa: E731
        name=name, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros, **kw)
    # kernel [D, heads, head_dim]; flax's DenseGeneral applies xavier to the flattened [D, D].
    q = dense("query", features=(self.num_heads, head_dim))(inputs_q)
    k = dense("key", features=(self.num_heads, head_dim))(inputs_kv)
    v = dense("value", features=(self.num_heads, head_dim))(inputs_kv)
    # Looked up at call time (not imported by name) so tests can observe the implementation used.
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    return dense("out", features=d, axis=(-2, -1))(y)  # kernel [heads, head_dim, D]


class MlpBlock(nn.Module):
  """Dense -> tanh-approximate GELU -> Dense (big_vision's feed-forward block)."""
  mlp_dim: int | None = None  # None: 4x the input width
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype, param_dtype=jnp.float32, **inits)(x)
    x = nn.gelu(x, approximate=True)  # big_vision (and HF's gelu_pytorch_tanh) use the tanh form
    return nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  Returns (x, out) so that `nn.scan` can carry x and stack the per-block intermediates.
  """
  mlp_dim: int | None = None
  num_heads: int = 12
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, mask=None):
    """`mask`: None, or boolean [B, 1, 1, T] (True: a real token keys may come from)."""
    out = {}
    ln = lambda: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)  # noqa: E731
    y = ln()(x)  # LayerNorm_0
    y = out["sa"] = MultiHeadAttention(
        num_heads=self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
        name="MultiHeadDotProductAttention_0")(y, y, mask=mask)
    x = out["+sa"] = x + y
    y = ln()(x)  # LayerNorm_1
    y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    x = out["+mlp"] = x + y
    return x, out


class Encoder(nn.Module):
  """A stack of `depth` Encoder1DBlocks and a final LayerNorm `encoder_norm`.

  scan=False: blocks `encoderblock_{i}` (big_vision's per-layer layout, the published one).
  scan=True: one `encoderblock` whose params carry a leading depth axis (big_vision's scanned
  layout); compiles once per block instead of once per layer, which matters for deep models.
  `remat_policy` rematerializes each block in both modes ("none" turns it off).
  """
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, mask=None):
    """`mask`: None, or boolean [B, T] (True: a real token; padding is never attended to)."""
    out = {}
    block_cls = Encoder1DBlock
    remat, policy = policy_from_name(self.remat_policy)
    if remat:
      # Under scan the loop body is already a CSE barrier, so prevent_cse can be off (faster).
      block_cls = nn.remat(Encoder1DBlock, prevent_cse=not self.scan, policy=policy)
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
              attention_impl=self.attention_impl)
    # Padding is masked as keys only: a padding query still attends to real tokens (no row of
    # -inf), and no real token ever reads padding, so padding cannot change a real output.
    args = (x,) if mask is None else (x, mask[:, None, None, :].astype(bool))
    if self.scan:
      broadcast = {"in_axes": nn.broadcast} if mask is not None else {}
      stack = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True}, length=self.depth,
                      **broadcast)
      x, scan_out = stack(name="encoderblock", **kw)(*args)
      for lyr in range(self.depth):
        out[f"block{lyr:02d}"] = jax.tree.map(lambda o, lyr=lyr: o[lyr], scan_out)
    else:
      for lyr in range(self.depth):
        x, out[f"block{lyr:02d}"] = block_cls(name=f"encoderblock_{lyr}", **kw)(x, *args[1:])
    out["pre_ln"] = x  # the last block's output, before the final norm
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32,
                     name="encoder_norm")(x)
    return x, out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then LN + MLP.

  Always uses XLA attention: cuDNN's fused kernel rejects a single query
  ("Unsupported sequence length Q 1").
  """
  mlp_dim: int | None = None
  num_heads: int = 12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """`mask`: None, or boolean [B, T]: the probe attends to the True tokens only."""
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype,
                           attention_impl=XLA_ATTENTION,
                           name="MultiHeadDotProductAttention_0")(
                               probe, x, mask=None if mask is None
                               else mask[:, None, None, :].astype(bool))
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    return x[:, 0]
