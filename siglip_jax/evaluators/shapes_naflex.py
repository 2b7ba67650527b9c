"""The NaFlex demo's evaluator: zero-shot on the shapes set at each aspect ratio.

Writes `<prefix>/zeroshot_top1_<aspect>` (held-out images of seen pairs) and
`<prefix>/zeroshot_top1_<aspect>_unseen` (never-seen pairs) for aspect in wide, tall, square,
each classified among all colour-shape classes with the shapes evaluator's prompt ensemble.

A NaFlex handle (`image_size` None) gets the images as they are, a list of uint8 arrays that it
resizes at their own aspect ratio to its patch budget. A fixed-size handle gets each squashed to
image_size x image_size (aspect ratio not kept: a wide circle becomes a thin ellipse) with the
same PIL bilinear filter, as floats in [-1, 1]: the same images for both kinds of model, for the
comparison the NaFlex demo makes.
"""
import numpy as np

from siglip_jax.data import naflex, preprocess
from siglip_jax.evaluators import zeroshot

_SPLITS = (("heldout", ""), ("unseen", "_unseen"))


def squash(images, size):
  """uint8 [H, W, 3] images of any sizes -> float32 [N, size, size, 3] in [-1, 1]."""
  return preprocess.to_float(np.stack([naflex.resize(im, size, size) for im in images]))


class ShapesNaflexEvaluator:

  def __init__(self, dataset, *, every_steps, prefix="shapes_naflex", batch_size=256):
    """`dataset`: a `shapes_naflex.AspectShapesDataset`; its splits are rendered here, once."""
    self.dataset, self.every_steps, self.prefix = dataset, int(every_steps), prefix
    self.batch_size = int(batch_size)
    if self.batch_size <= 0:
      raise ValueError(f"batch_size must be positive; got {batch_size}")
    self._splits = {(name, aspect): dataset.eval_split(name, aspect)
                    for aspect in dataset.aspects for name, _ in _SPLITS}

  def _encode(self, model, images):
    # In batches: a fixed handle's floats and a NaFlex handle's patches stay bounded in memory.
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = list(images[start:start + self.batch_size])
      x = chunk if model.image_size is None else squash(chunk, int(model.image_size))
      out.append(np.asarray(model.encode_image(x), np.float32))
    return np.concatenate(out)

  def run(self, model):
    """`model`: a `siglip_jax.inference.SigLIP` handle, NaFlex or fixed-size (or anything with
    `image_size`, `encode_image` and `encode_strings`)."""
    classes = zeroshot.class_embeddings(model.encode_strings, self.dataset.prompts())
    out = {}
    for aspect in self.dataset.aspects:
      for name, suffix in _SPLITS:
        images, labels = self._splits[name, aspect]
        if not len(images):
          continue
        ranks = zeroshot.true_class_rank(self._encode(model, images), classes, labels)
        acc = zeroshot.accuracy_from_ranks(ranks, len(classes), ks=(1,))
        out[f"{self.prefix}/zeroshot_top1_{aspect}{suffix}"] = acc[1]
    return out
