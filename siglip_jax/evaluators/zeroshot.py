"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy.

Ties count in the model's favour, the convention of CLIP's evaluation code (`topk` then
`any`): an example is right at k when fewer than k classes score strictly above its own class.
"""
import numpy as np


def class_embeddings(encode_text, prompts_per_class):
  """Mean of each class's L2-normalized prompt embeddings, renormalized: [C, D].

  `encode_text(list_of_str) -> [N, D]`; all prompts go through it in one list so the caller can
  batch and shard as it likes."""
  counts = [len(p) for p in prompts_per_class]
  if min(counts, default=0) == 0:
    raise ValueError("every class needs at least one prompt")
  flat = [t for prompts in prompts_per_class for t in prompts]
  emb = np.asarray(encode_text(flat), np.float32)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  out, start = [], 0
  for n in counts:
    out.append(emb[start:start + n].mean(0))
    start += n
  out = np.stack(out)
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def topk_accuracy(image_emb, class_emb, labels, ks=(1, 5)):
  """{k: accuracy} for image embeddings [N, D] against class embeddings [C, D]."""
  scores = np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T
  labels = np.asarray(labels)
  true = scores[np.arange(len(labels)), labels]
  rank = (scores > true[:, None]).sum(1)     # classes strictly better than the right one
  return {k: float(np.mean(rank < k)) for k in ks if k <= scores.shape[1]}
