"""The LocCa decoder (SigLIP 2, stage A): a transformer decoder over the image tower's patch
tokens, trained on captioning, referring expressions and grounded captioning (flax.linen).

Tokens: the text vocabulary `[0, text_vocab)`, then `loc_bins` location tokens (a box is four of
them, y0 x0 y1 x1, each a coordinate quantised into `loc_bins` bins), then the special tokens
(`special_ids`): the mask token of parallel prediction and one task token per task.

Several passes (one per task) travel as segments of one sequence: `segments` [B, T] gives each
position its pass, and attention is causal within a pass and blind across passes, so the three
passes of an example share one call and one cross-attention over the patch tokens.

Location tokens get, besides their learned embedding, a Dense map of Fourier features of the bin
centre: nearby bins start out with nearby embeddings, which the learned table alone does not
know (LocCa's demo learns boxes at all only with it; docs/performance.md).

Parameters (under the top-level `decoder/` of the train state): `embed/embedding`,
`loc_fourier/{kernel,bias}`, `pos_embedding`, `block_{i}/{LayerNorm_0,SelfAttention,LayerNorm_1,
CrossAttention,LayerNorm_2,MlpBlock_0}`, `decoder_norm`, `head/{kernel,bias}`; the head is read
by the chunked cross-entropy (`siglip_jax.chunked_xent`), never as full logits in training.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.models.transformer import Dtype, MlpBlock, MultiHeadAttention

TASKS = ("caption", "refexp", "grounded")
NUM_FOURIER = 16


def special_ids(text_vocab, loc_bins):
  """{"mask": id, "caption": id, "refexp": id, "grounded": id} after the location tokens."""
  start = text_vocab + loc_bins
  return {"mask": start, **{task: start + 1 + k for k, task in enumerate(TASKS)}}


def vocab_size(text_vocab, loc_bins):
  return text_vocab + loc_bins + 1 + len(TASKS)


def attention_mask(segments):
  """[B, T] pass ids -> boolean [B, 1, T, T]: causal within a pass, nothing across passes."""
  t = segments.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segments[:, :, None] == segments[:, None, :]
  return (same & causal[None])[:, None]


class DecoderBlock(nn.Module):
  """Pre-LN: x + SelfAttn(LN(x)), x + CrossAttn(LN(x), image), x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image, self_mask, image_mask):
    ln = lambda: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)  # noqa
    y = ln()(x)
    x = x + MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, attention_impl="xla",
                               name="SelfAttention")(y, y, mask=self_mask)
    y = ln()(x)
    x = x + MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, attention_impl="xla",
                               name="CrossAttention")(y, image, mask=image_mask)
    y = ln()(x)
    return x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)


class Decoder(nn.Module):
  """`__call__(tokens [B, T], segments [B, T], image [B, N, Di], image_mask [B, N] or None)` ->
  hidden states [B, T, width] (float32 after the final LayerNorm). `logits(h)` applies the head
  (inference only: training takes the head's parameters to the chunked cross-entropy)."""
  text_vocab: int
  loc_bins: int
  width: int
  depth: int
  num_heads: int
  max_len: int
  mlp_dim: int | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    v = vocab_size(self.text_vocab, self.loc_bins)
    self.embed = nn.Embed(v, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                          name="embed")
    self.loc_fourier = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                                name="loc_fourier")
    self.pos_embedding = self.param("pos_embedding",
                                    nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                                    (1, self.max_len, self.width), jnp.float32)
    self.blocks = [DecoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                                name=f"block_{i}") for i in range(self.depth)]
    self.norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                             name="decoder_norm")
    self.head = nn.Dense(v, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=nn.initializers.zeros, name="head")

  def _fourier(self, tokens):
    """Fourier features of location tokens' bin centres (zeros elsewhere)."""
    bins = tokens - self.text_vocab
    is_loc = (bins >= 0) & (bins < self.loc_bins)
    centre = (jnp.clip(bins, 0, self.loc_bins - 1).astype(jnp.float32) + 0.5) / self.loc_bins
    freqs = np.pi * 2.0 ** np.arange(NUM_FOURIER // 2)
    angles = centre[..., None] * freqs
    feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return feats * is_loc[..., None]

  def __call__(self, tokens, segments, image, image_mask=None):
    b, t = tokens.shape
    if t > self.max_len * len(TASKS):  # one pass per task, each at most max_len
      raise ValueError(f"decoder sequence of {t} tokens > {len(TASKS)} passes of max_len "
                       f"{self.max_len}")
    positions = _positions_in_segment(segments)
    x = self.embed(tokens) + self.loc_fourier(self._fourier(tokens).astype(self.dtype))
    x = x + jnp.take(self.pos_embedding[0], positions, axis=0).astype(x.dtype)
    self_mask = attention_mask(segments)
    cross_mask = None if image_mask is None else image_mask[:, None, None, :].astype(bool)
    image = image.astype(self.dtype)
    for block in self.blocks:
      x = block(x, image, self_mask, cross_mask)
    return self.norm(x)

  def logits(self, hidden):
    return self.head(hidden).astype(jnp.float32)

  def init_all(self, tokens, segments, image, image_mask=None):
    """For `init` only: touches every parameter, the head included (training never calls it)."""
    return self.logits(self(tokens, segments, image, image_mask))


def _positions_in_segment(segments):
  """0, 1, 2, ... restarting where the segment id changes (passes are contiguous)."""
  t = segments.shape[-1]
  idx = jnp.arange(t)
  start = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                           segments[:, 1:] != segments[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(start, idx[None, :], 0), axis=1)
  return idx[None, :] - first
