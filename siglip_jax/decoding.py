"""What a model with a LocCa decoder does at inference: caption an image, locate a referring
expression (text -> box), describe a box (box -> text). Greedy decoding, jitted and batched.

Used by `inference.SigLIP` (`caption`, `locate`, `describe`) for `siglip_jax.load` of a workdir
or checkpoint trained with `objectives.locca`, and by the scenes evaluators during training.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.data import decoder_text
from siglip_jax.models import decoder as decoder_lib
from siglip_jax.objectives import locca


class Decoding:
  """`towers`/`tower_params`: the two-tower model and its params; `decoder`/`decoder_params`:
  the LocCa decoder; `tokenizer`: the run's (its `ids` and `decode`)."""

  def __init__(self, towers, tower_params, decoder, decoder_params, tokenizer, *,
               batch_size=128):
    self.towers, self.tower_params = towers, tower_params
    self.decoder, self.decoder_params, self.tok = decoder, decoder_params, tokenizer
    self.text_vocab, self.loc_bins = decoder.text_vocab, decoder.loc_bins
    self.length = decoder.max_len
    self.special = decoder_lib.special_ids(self.text_vocab, self.loc_bins)
    self.batch_size = int(batch_size)
    vocab = decoder_lib.vocab_size(self.text_vocab, self.loc_bins)
    ids = np.arange(vocab)
    self._text_ids = ids < self.text_vocab                       # captions: text tokens only
    self._loc_ids = (ids >= self.text_vocab) & (ids < self.text_vocab + self.loc_bins)

  @functools.partial(jax.jit, static_argnums=(0, 6))
  def _decode(self, tower_params, decoder_params, images, prefix, prefix_len, steps, allowed):
    out = self.towers.apply({"params": tower_params}, images, None)[2]
    return locca.greedy_decode(self.decoder, decoder_params, out["img/encoded"], prefix,
                               prefix_len, steps=steps, allowed=allowed)

  def _run(self, images, prefixes, steps, allowed):
    """Rows of `steps` decoded tokens for images [N, H, W, 3] and token prefixes (lists)."""
    images = np.asarray(images, np.float32)
    if len(images) != len(prefixes):
      raise ValueError(f"{len(images)} images but {len(prefixes)} prefixes")
    if len(images) == 0:
      raise ValueError("nothing to decode: the input is empty")
    width = self.length - steps
    out = []
    for start in range(0, len(images), self.batch_size):
      imgs = images[start:start + self.batch_size]
      rows = prefixes[start:start + self.batch_size]
      n = len(imgs)
      pad = self.batch_size - n
      prefix = np.zeros((self.batch_size, width), np.int32)
      plen = np.ones(self.batch_size, np.int32)
      for i, p in enumerate(rows):
        prefix[i, :len(p)], plen[i] = p, len(p)
      if pad:
        imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, 0)])
      got = self._decode(self.tower_params, self.decoder_params, jnp.asarray(imgs),
                         jnp.asarray(prefix), jnp.asarray(plen), steps, jnp.asarray(allowed))
      out.append(np.asarray(got)[:n])
    return np.concatenate(out)

  def _text(self, rows):
    """Token rows -> strings, read up to the first EOS."""
    texts = []
    for row in rows:
      ids = [int(t) for t in row]
      if self.tok.eos_id in ids:
        ids = ids[:ids.index(self.tok.eos_id)]
      texts.append(self.tok.decode(np.array([t for t in ids if 0 < t < self.text_vocab])))
    return texts

  def caption(self, images):
    """Captions of images float32 [N, H, W, 3] in [-1, 1] -> list of str."""
    rows = self._run(images, [[self.special["caption"]]] * len(images), self.length - 1,
                     self._text_ids)
    return self._text(rows)

  def locate(self, images, texts):
    """The box each text (a referring expression) names in its image -> float [N, 4]
    (x0, y0, x1, y1 in [0, 1])."""
    room = self.length - 4 - 1   # the prefix: task token, words, EOS
    prefixes = [[self.special["refexp"]] + self.tok.ids(t)[:room - 2] + [self.tok.eos_id]
                for t in texts]
    rows = self._run(images, prefixes, 4, self._loc_ids)
    return np.array([decoder_text.tokens_to_box(r, self.text_vocab, self.loc_bins)
                     for r in rows], np.float32)

  def describe(self, images, boxes):
    """A caption of each box [x0, y0, x1, y1] in its image (grounded captioning) -> str."""
    prefixes = [[self.special["grounded"]] +
                decoder_text.box_to_tokens(b, self.text_vocab, self.loc_bins) for b in boxes]
    rows = self._run(images, prefixes, self.length - 5, self._text_ids)
    return self._text(rows)
