"""The demo set's evaluator: zero-shot on seen and unseen colour-shape pairs, retrieval.

Writes `shapes/zeroshot_top1` (held-out images of pairs seen in training),
`shapes/zeroshot_top1_unseen` (pairs never seen in training), both classified among all
colour-shape classes, and `shapes/retrieval_{i2t,t2i}_r{1,5}` on the held-out images and their
captions.
"""
from siglip_jax.evaluators import retrieval, zeroshot


class ShapesEvaluator:

  def __init__(self, dataset, *, every_steps, prefix="shapes"):
    self.dataset, self.every_steps, self.prefix = dataset, int(every_steps), prefix
    self._heldout = dataset.eval_split("heldout")
    self._unseen = dataset.eval_split("unseen")

  def run(self, model):
    """`model`: a `siglip_jax.inference.SigLIP` handle (or anything with its encode methods)."""
    classes = zeroshot.class_embeddings(model.encode_strings, self.dataset.prompts())
    seen_img = model.encode_image(self._heldout["image"])
    unseen_img = model.encode_image(self._unseen["image"])
    seen = zeroshot.topk_accuracy(seen_img, classes, self._heldout["label"])
    unseen = zeroshot.topk_accuracy(unseen_img, classes, self._unseen["label"])
    texts = model.encode_strings(self._heldout["text"])
    recall = retrieval.recall_at_k(seen_img, texts, range(len(texts)), ks=(1, 5))
    p = self.prefix
    out = {f"{p}/zeroshot_top1": seen[1], f"{p}/zeroshot_top5": seen[5],
           f"{p}/zeroshot_top1_unseen": unseen[1], f"{p}/zeroshot_top5_unseen": unseen[5]}
    out.update({f"{p}/retrieval_{k}": v for k, v in recall.items()})
    return out
