"""Image-text retrieval recall@k both ways, with several captions per image.

Image -> text: an image is right at k when one of its own captions is among the k best texts;
text -> image: a caption is right at k when its image is among the k best images. Ties count
in the model's favour (fewer than k candidates strictly better).
"""
import numpy as np


def recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10)):
  """Returns {"i2t_r{k}": ..., "t2i_r{k}": ...}.

  image_emb [N, D], text_emb [M, D], text_to_image [M] (index of each caption's image)."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  owner = np.asarray(text_to_image)
  if owner.shape != (len(text_emb),) or owner.min(initial=0) < 0 or owner.max(initial=0) >= len(image_emb):
    raise ValueError("text_to_image must give, for each caption, the index of its image")
  scores = image_emb @ text_emb.T                      # [N, M]
  n_img = len(image_emb)
  own = owner[None, :] == np.arange(n_img)[:, None]    # [N, M]: caption j belongs to image i
  has_caption = own.any(1)
  best_own = np.where(own, scores, -np.inf).max(1)     # best score among each image's captions
  i2t_rank = (scores > best_own[:, None]).sum(1)
  t2i_true = scores[owner, np.arange(len(owner))]
  t2i_rank = (scores > t2i_true[None, :]).sum(0)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t_rank[has_caption] < k))
    out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
  return out
