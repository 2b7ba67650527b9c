"""The scenes evaluators' scoring against hand-worked cases, and a model without a decoder
(SigLIP 1 on scenes) getting the retrieval metrics only."""
import numpy as np
import pytest

from siglip_jax.data import scenes
from siglip_jax.evaluators import scenes as scenes_eval


def test_iou_and_the_best_constant_box():
  assert scenes_eval.iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == pytest.approx(1.0)
  assert scenes_eval.iou([0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5]) == pytest.approx(1 / 3)
  assert scenes_eval.iou([0, 0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]) == 0.0
  # Two identical boxes and one far away: one constant box covers two of three.
  boxes = [[0.0, 0.0, 0.5, 0.5]] * 2 + [[0.5, 0.5, 1.0, 1.0]]
  assert scenes_eval.best_constant_box_acc(boxes, grid=4) == pytest.approx(2 / 3)


def test_caption_scoring_names_exactly_what_is_there():
  assert scenes_eval.names_exactly("a red circle", ("red", "circle"))
  assert not scenes_eval.names_exactly("a red circle, a blue star", ("red", "circle"))
  assert not scenes_eval.names_exactly("a red circle star", ("red", "circle"))
  assert scenes_eval.same_pairs("a blue star, a red circle.", [("red", "circle"),
                                                              ("blue", "star")])
  assert not scenes_eval.same_pairs("a red circle, a red circle", [("red", "circle"),
                                                                   ("blue", "star")])


class _TowersOnly:
  """An inference handle without a decoder: embeddings that match image i with caption i."""
  has_decoder = False

  def __init__(self, n):
    self.n = n

  def encode_image(self, images):
    return np.eye(len(images), self.n, dtype=np.float32)

  def encode_strings(self, texts):
    return np.eye(len(texts), self.n, dtype=np.float32)

  def caption(self, images):
    raise AssertionError("a model without a decoder is never asked to caption")


def test_a_model_without_a_decoder_gets_the_retrieval_metrics_only():
  ds = scenes.ScenesDataset(seed=0, image_size=48, num_heldout=8, num_unseen=8)
  # No dense probe here (test_dense_probe.py has it for a towers-only model).
  got = scenes_eval.ScenesEvaluator(ds, every_steps=0, num_probe_train=0).run(_TowersOnly(8))
  assert got == {"scenes/retrieval_i2t_r1": 1.0, "scenes/retrieval_t2i_r1": 1.0,
                 "scenes/retrieval_i2t_r1_unseen": 1.0, "scenes/retrieval_t2i_r1_unseen": 1.0}
