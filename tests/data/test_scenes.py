"""The scenes set (the SigLIP 2 demo's): 1 to 3 objects that never overlap, each a region whose
box bounds its pixels and whose caption names it; word-sharing pairs in multi-object scenes;
never-seen pairs only in their split; every scene a pure function of (seed, stream, index)."""
import collections

import numpy as np

from siglip_jax.data import scenes, shapes
from siglip_jax.evaluators.scenes import iou


def _scenes(split, n=200, seed=0):
  ds = scenes.ScenesDataset(seed=seed, image_size=48, num_heldout=n, num_unseen=n)
  return ds, ds.eval_split(split)


def test_objects_are_regions_with_their_boxes_and_captions():
  _, split = _scenes("heldout")
  counts = collections.Counter(len(s["regions"]) for s in split)
  assert set(counts) == {1, 2, 3} and counts[3] > 0.2 * len(split)
  for s in split:
    # The image caption names every object (in an order of its own) and nothing else.
    named, other = scenes.parse_pairs(s["texts"])
    assert sorted(named) == sorted(map(tuple, s["pairs"])) and not other
    assert len({tuple(p) for p in s["pairs"]}) == len(s["pairs"])   # distinct pairs
    boxes = np.array([r["box"] for r in s["regions"]])
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    for k, (region, (color, shape)) in enumerate(zip(s["regions"], s["pairs"])):
      assert region["caption"] == f"{color} {shape}"
      # The box is the tight box of the object's pixels in the class map.
      label = 1 + scenes.COLORS.index(color) * len(scenes.SHAPES) + scenes.SHAPES.index(shape)
      rows, cols = np.nonzero(s["class_map"] == label)
      size = s["class_map"].shape[0]
      np.testing.assert_allclose(region["box"], [cols.min() / size, rows.min() / size,
                                                 (cols.max() + 1) / size,
                                                 (rows.max() + 1) / size])
      for other in s["regions"][k + 1:]:   # objects never overlap
        assert iou(region["box"], other["box"]) < 0.2


def test_multi_object_scenes_share_words_and_unseen_pairs_stay_in_their_split():
  ds, held = _scenes("heldout", n=400)
  multi = [s for s in held if len(s["pairs"]) >= 2]
  sharing = [s for s in multi if len({c for c, _ in s["pairs"]}) < len(s["pairs"])
             or len({sh for _, sh in s["pairs"]}) < len(s["pairs"])]
  assert len(sharing) >= 0.3 * len(multi)
  unseen = set(shapes.UNSEEN_PAIRS)
  train = ds.train_records(range(400))
  assert not any(tuple(p) in unseen for s in held for p in s["pairs"])
  assert not any(p in unseen for r in train for p in scenes.parse_pairs(r["texts"])[0])
  _, unseen_split = _scenes("unseen", n=50)
  assert all(tuple(p) in unseen for s in unseen_split for p in s["pairs"])


def test_scenes_are_a_pure_function_of_seed_stream_and_index():
  a = scenes.ScenesDataset(seed=3, image_size=48).train_records([17])[0]
  # Rendered in a batch with others (as the loader reads them): the same scene.
  b = scenes.ScenesDataset(seed=3, image_size=48).train_records(range(5, 40))[12]
  c = scenes.ScenesDataset(seed=4, image_size=48).train_records([17])[0]
  assert np.array_equal(a["image"], b["image"]) and a["regions"] == b["regions"]
  assert a["texts"] == b["texts"] and a["key"] == b["key"] == "scenes:17"
  assert not np.array_equal(a["image"], c["image"])
  _, h1 = _scenes("heldout", n=5)
  _, h2 = _scenes("heldout", n=5)
  assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(h1, h2))
