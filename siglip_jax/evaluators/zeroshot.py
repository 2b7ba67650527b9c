"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy.

Ties count in the model's favour, the convention of CLIP's evaluation code (`topk` then
`any`): an example is right at k when fewer than k classes score strictly above its own class.

`ZeroShotEvaluator` runs it over any labelled source (evaluators.sources: a folder of images or
a TFDS data set), streaming images in batches; metrics `<name>/zeroshot_top1`, `_top5`.
"""
import numpy as np

from siglip_jax.evaluators import prompts as prompts_lib, sources

# Prompts encoded per call to encode_text: bounds the host memory of 1000 classes x 80 prompts.
_PROMPT_CHUNK = 4096


def class_embeddings(encode_text, prompts_per_class, chunk=_PROMPT_CHUNK):
  """Mean of each class's L2-normalized prompt embeddings, renormalized: [C, D].

  `encode_text(list_of_str) -> [N, D]`; prompts go through it in lists of whole classes of
  about `chunk` prompts, so the caller batches and shards as it likes."""
  counts = [len(p) for p in prompts_per_class]
  if min(counts, default=0) == 0:
    raise ValueError("every class needs at least one prompt")
  out, group = [], []

  def flush():
    flat = [t for prompts in group for t in prompts]
    emb = np.asarray(encode_text(flat), np.float32)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    start = 0
    for prompts in group:
      out.append(emb[start:start + len(prompts)].mean(0))
      start += len(prompts)
    group.clear()

  for prompts in prompts_per_class:
    if group and sum(map(len, group)) + len(prompts) > chunk:
      flush()
    group.append(prompts)
  flush()
  out = np.stack(out)
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def true_class_rank(image_emb, class_emb, labels):
  """For each image, how many classes score strictly above its own class ([N] ints)."""
  scores = np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T
  labels = np.asarray(labels)
  true = scores[np.arange(len(labels)), labels]
  return (scores > true[:, None]).sum(1)


def accuracy_from_ranks(ranks, num_classes, ks=(1, 5)):
  ranks = np.asarray(ranks)
  return {k: float(np.mean(ranks < k)) for k in ks if k <= num_classes}


def topk_accuracy(image_emb, class_emb, labels, ks=(1, 5)):
  """{k: accuracy} for image embeddings [N, D] against class embeddings [C, D]."""
  return accuracy_from_ranks(true_class_rank(image_emb, class_emb, labels),
                             np.shape(class_emb)[0], ks)


class ZeroShotEvaluator:
  """Zero-shot top-k over a labelled source with `class_names` and `batches(bs, size)`."""

  def __init__(self, source, *, every_steps=0, prefix="zeroshot", prompts="clip80",
               batch_size=256, ks=(1, 5)):
    self.source, self.every_steps, self.prefix = source, int(every_steps or 0), prefix
    self.prompts = prompts_lib.templates(prompts)   # fails now on a bad set, not mid-run
    self.batch_size, self.ks = int(batch_size), tuple(ks)

  def run(self, model):
    """`model`: a `siglip_jax.inference.SigLIP` handle (encode_image, encode_strings)."""
    names = self.source.class_names
    classes = class_embeddings(model.encode_strings,
                               prompts_lib.class_prompts(names, self.prompts))
    ranks = []
    for images, labels in self.source.batches(self.batch_size, model.image_size):
      ranks.append(true_class_rank(model.encode_image(images), classes, labels))
    if not ranks:
      raise ValueError(f"{self.prefix}: the zero-shot source has no images")
    acc = accuracy_from_ranks(np.concatenate(ranks), len(names), self.ks)
    return {f"{self.prefix}/zeroshot_top{k}": v for k, v in acc.items()}


def from_config(name, cfg):
  """`config.evals.<name> = dict(kind="zeroshot", every_steps=N, source="folder"|"tfds",
  path=..., tfds_name=..., split=..., class_names=[...] or "names.txt", prompts="clip80" |
  "short" | "name" | [templates], batch_size=256, max_examples=0)`."""
  return ZeroShotEvaluator(sources.classification_source(cfg),
                           every_steps=cfg.get("every_steps", 0), prefix=name,
                           prompts=cfg.get("prompts", "clip80"),
                           batch_size=cfg.get("batch_size", 256))
