"""LocCa (SigLIP 2, stage A): the decoder's captioning, referring-expression and grounded-
captioning losses over the image tower's patch tokens.

Per task, the token cross-entropy averaged over that task's trained target tokens in the whole
(global) batch; `loss_locca` is the mean over the tasks present in the batch (an example without
regions trains captioning only). The cross-entropy runs in vocabulary chunks
(`siglip_jax.chunked_xent`): the full float32 [tokens, vocab] logits never exist, in the forward
or the backward pass, so Gemma's 256k vocabulary fits.
"""
import jax
import jax.numpy as jnp

from siglip_jax import chunked_xent, flops
from siglip_jax.data import decoder_text
from siglip_jax.models import decoder as decoder_lib
from siglip_jax.objectives.registry import Objective, ObjectiveConfigError

BATCH_KEYS = ("dec_inputs", "dec_targets", "dec_task")
NEEDS_CAPTIONS = ("synthetic",)   # data kinds whose records carry no captions to decode


def decoder_dims(config):
  """width, depth, num_heads, mlp_dim of the decoder: `objectives.locca.*`, 0 meaning the text
  tower's (depth: max(1, text depth // 2), as SigLIP 2)."""
  from siglip_jax import experiment
  from siglip_jax.models import text as text_model
  txt = experiment.resolve_variant(config.model.text, "model.text")
  dims = text_model.TextTransformer(**{k: txt[k] for k in ("variant", "width", "depth",
                                                          "mlp_dim", "num_heads")
                                       if txt.get(k) is not None}).dims
  cfg = config.objectives.locca
  return dict(width=cfg.width or dims["width"], depth=cfg.depth or max(1, dims["depth"] // 2),
              num_heads=cfg.num_heads or dims["num_heads"],
              mlp_dim=cfg.mlp_dim or dims["mlp_dim"])


def check_config(config):
  if config.input.data in NEEDS_CAPTIONS:
    raise ObjectiveConfigError(f"config key `objectives.locca`: input.data="
                               f"{config.input.data!r} has no captions to train a decoder on")
  if config.input.decoder_len < decoder_text.min_decoder_len():
    raise ObjectiveConfigError(f"config key `input.decoder_len`: {config.input.decoder_len} "
                               "cannot hold a location target (a task token, a caption token, "
                               f"EOS, 4 location tokens, EOS): use >= "
                               f"{decoder_text.min_decoder_len()}")
  if not 0 <= config.objectives.locca.parallel_fraction <= 1:
    raise ObjectiveConfigError("config key `objectives.locca.parallel_fraction` must be in "
                               f"[0, 1]; got {config.objectives.locca.parallel_fraction!r}")
  if config.input.loc_bins < 2:
    raise ObjectiveConfigError(f"config key `input.loc_bins` must be >= 2; got "
                               f"{config.input.loc_bins!r}")
  dims = decoder_dims(config)
  if dims["width"] % dims["num_heads"]:
    raise ObjectiveConfigError(f"config key `objectives.locca.num_heads`: width "
                               f"{dims['width']} is not divisible by {dims['num_heads']} heads")


def make_decoder(config, text_vocab):
  dims = decoder_dims(config)
  return decoder_lib.Decoder(text_vocab=text_vocab, loc_bins=config.input.loc_bins,
                             max_len=config.input.decoder_len,
                             dtype=jnp.dtype(config.model.dtype), **dims)


def segments(batch_size, decoder_len):
  """[B, 3L]: the pass (task) of each position, passes side by side."""
  seg = jnp.repeat(jnp.arange(len(decoder_lib.TASKS), dtype=jnp.int32), decoder_len)
  return jnp.broadcast_to(seg, (batch_size, seg.shape[0]))


def task_counts(task):
  """[tasks]: how many trained target tokens each task has in `task` (float32)."""
  return jnp.stack([jnp.sum((task == k).astype(jnp.float32))
                    for k in range(len(decoder_lib.TASKS))])


def task_losses(nll, task, counts=None):
  """Per task: the sum of `nll` over that task's tokens over its count (`counts`: the whole
  global batch's, default this batch's, so that micro-batches' shares add up); with a count of
  0 the task is absent (its mean is 0 and it is left out of the mean over tasks)."""
  counts = task_counts(task) if counts is None else counts
  means = jnp.stack([jnp.sum(nll * (task == k).astype(jnp.float32)) / jnp.maximum(counts[k], 1.0)
                     for k in range(len(decoder_lib.TASKS))])
  present = (counts > 0).astype(jnp.float32)
  return jnp.sum(means * present) / jnp.maximum(jnp.sum(present), 1.0), means, present


class LocCa(Objective):
  name = "locca"
  batch_keys = BATCH_KEYS
  param_names = ("decoder",)

  def __init__(self, config, *, text_vocab, weight, start_step, **unused):
    del unused
    super().__init__(weight, start_step)
    self.decoder = make_decoder(config, text_vocab)
    self.decoder_len = int(config.input.decoder_len)
    self.chunk = int(config.objectives.locca.vocab_chunk)

  def forward_flops(self, *, image_tokens, image_width):
    d = self.decoder
    return flops.decoder_flops(
        tokens=len(decoder_lib.TASKS) * self.decoder_len, width=d.width, depth=d.depth,
        mlp_dim=d.mlp_dim or 4 * d.width, image_tokens=image_tokens, image_width=image_width,
        vocab=decoder_lib.vocab_size(d.text_vocab, d.loc_bins), fourier=decoder_lib.NUM_FOURIER)

  def batch_spec(self, config):
    shape = (len(decoder_lib.TASKS) * self.decoder_len,)
    return {k: (shape, jnp.int32) for k in BATCH_KEYS}

  def synthetic_batch(self, key, batch_size, text_vocab):
    """Every pass full: random text tokens as inputs and targets, each pass its task."""
    shape = (batch_size, len(decoder_lib.TASKS) * self.decoder_len)
    ki, kt = jax.random.split(key)
    task = jnp.broadcast_to(segments(1, self.decoder_len), shape)
    return {"dec_inputs": jax.random.randint(ki, shape, 1, text_vocab, jnp.int32),
            "dec_targets": jax.random.randint(kt, shape, 1, text_vocab, jnp.int32),
            "dec_task": task}

  def _hidden(self, decoder_params, batch, tower_out):
    inputs = batch["dec_inputs"]
    # A NaFlex tower's padding patches are masked out of the cross-attention.
    return self.decoder.apply({"params": decoder_params}, inputs,
                              segments(inputs.shape[0], self.decoder_len),
                              tower_out["img/encoded"], tower_out.get("img/patch_mask"))

  def init(self, rng, batch, tower_out):
    inputs = batch["dec_inputs"]
    params = self.decoder.init(rng, inputs, segments(inputs.shape[0], self.decoder_len),
                               tower_out["img/encoded"], tower_out.get("img/patch_mask"),
                               method=decoder_lib.Decoder.init_all)["params"]
    return {"decoder": params}

  def normalizer(self, batch):
    return task_counts(batch["dec_task"].reshape(-1))

  def loss(self, params, batch, tower_out, norm=None):
    dec = params["decoder"]
    h = self._hidden(dec, batch, tower_out)
    nll = chunked_xent.token_nll(h.reshape(-1, h.shape[-1]), dec["head"]["kernel"],
                                 dec["head"]["bias"], batch["dec_targets"].reshape(-1),
                                 chunk=self.chunk)
    loss, means, present = task_losses(nll, batch["dec_task"].reshape(-1), norm)
    metrics = {f"train/loss_locca_{task}": jnp.where(present[k] > 0, means[k], jnp.nan)
               for k, task in enumerate(decoder_lib.TASKS)}
    return loss, metrics


def greedy_decode(decoder, decoder_params, image_tokens, prefix, prefix_len, *, steps, allowed):
  """Greedy continuation, one pass per row: `prefix` [B, W] (row i's first `prefix_len[i]`
  tokens; the rest is room), `steps` tokens each the argmax over the ids where `allowed` [V] is
  True -> [B, steps]. Recomputes the whole sequence each step (decoder passes are short); jit
  it with `steps` static."""
  b, width = prefix.shape
  length = width + steps
  tokens = jnp.zeros((b, length), jnp.int32).at[:, :width].set(prefix)
  seg = jnp.zeros((b, length), jnp.int32)
  bias = jnp.where(allowed, 0.0, -jnp.inf)
  prefix_len = prefix_len.astype(jnp.int32)

  def body(t, tokens):
    h = decoder.apply({"params": decoder_params}, tokens, seg, image_tokens)
    last = jax.lax.dynamic_index_in_dim(h, t - 1, axis=1, keepdims=False)
    logits = decoder.apply({"params": decoder_params}, last, method=decoder.logits) + bias
    write = (t >= prefix_len) & (t < prefix_len + steps)
    current = jax.lax.dynamic_index_in_dim(tokens, t, axis=1, keepdims=False)
    new = jnp.where(write, jnp.argmax(logits, axis=-1).astype(jnp.int32), current)
    return jax.lax.dynamic_update_index_in_dim(tokens, new, t, axis=1)

  tokens = jax.lax.fori_loop(1, length, body, tokens)
  return jnp.take_along_axis(tokens, prefix_len[:, None] + jnp.arange(steps)[None], axis=1)
