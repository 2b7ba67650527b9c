"""The dense-feature probe: its scores against a loop-by-loop reference, patch labels on a
hand-made class map, the probe on decodable and on pure-noise features, `encode_patches` against
the model's own intermediates, and the scenes evaluator reporting it for a towers-only model."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from siglip_jax import cli, config_defaults, experiment, inference, models
from siglip_jax.data import scenes
from siglip_jax.evaluators import dense
from siglip_jax.evaluators import scenes as scenes_eval


def _reference_scores(pred, labels):
  """Loops only: IoU per object class present in `labels`, accuracy on foreground."""
  pred, labels = [int(v) for v in np.ravel(pred)], [int(v) for v in np.ravel(labels)]
  ious = []
  for c in sorted(set(labels) - {0}):
    inter = sum(1 for p, t in zip(pred, labels) if p == c and t == c)
    union = sum(1 for p, t in zip(pred, labels) if p == c or t == c)
    ious.append(inter / union)
  fg = [(p, t) for p, t in zip(pred, labels) if t != 0]
  return sum(ious) / len(ious), sum(p == t for p, t in fg) / len(fg)


def test_scores_by_hand_and_against_a_loop_reference():
  # class 1: 1 of 3 patches in the union; class 2: 1 of 1; class 3 is predicted, never true.
  got = dense.scores([1, 1, 0, 2, 3], [0, 1, 1, 2, 0])
  assert got["dense_miou"] == pytest.approx((1 / 3 + 1) / 2)
  assert got["dense_acc"] == pytest.approx(2 / 3)
  rng = np.random.default_rng(0)
  for _ in range(5):
    labels = rng.choice(7, (9, 12), p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.1, 0.0])   # class 6 absent
    pred = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 8, labels.shape))
    got = dense.scores(pred, labels)
    miou, acc = _reference_scores(pred, labels)
    assert got["dense_miou"] == pytest.approx(miou)
    assert got["dense_acc"] == pytest.approx(acc)


def test_patch_labels_read_each_patch_centre():
  cmap = np.zeros((1, 8, 8), np.int16)
  cmap[0, 0, :4] = 7          # a patch's top row: not its centre
  cmap[0, 2, 6] = 5           # patch (0, 1)'s centre (rows 0-3 -> 2, columns 4-7 -> 6)
  cmap[0, 6, 2] = 3           # patch (1, 0)'s centre
  cmap[0, 5, 5] = 9           # inside patch (1, 1), next to its centre (6, 6)
  np.testing.assert_array_equal(dense.patch_labels(cmap, 4), [[0, 5, 3, 0]])
  odd = np.arange(36).reshape(1, 6, 6)   # patch 3: centres at rows/columns 1 and 4
  np.testing.assert_array_equal(dense.patch_labels(odd, 3), [[7, 10, 25, 28]])
  with pytest.raises(ValueError, match="patches"):
    dense.patch_labels(odd, 4)


def _clusters(rng, n, num_classes, dim):
  labels = rng.integers(0, num_classes, n)
  centres = rng.standard_normal((num_classes, dim)) * 3
  # Dimensions of very different scales and offsets: standardization has to even them out.
  scale = np.exp(rng.uniform(-4, 4, dim))
  feats = (centres[labels] + 0.2 * rng.standard_normal((n, dim))) * scale + 100 * scale
  return feats.astype(np.float32), labels, (centres, scale)


def test_the_probe_decodes_linearly_separable_labels_and_not_noise():
  rng = np.random.default_rng(1)
  k, dim = 6, 16
  x, y, (centres, scale) = _clusters(rng, 1200, k, dim)
  x[:, 3] = 5.0               # a constant feature is harmless
  probe = dense.fit(x, y, k)
  test_y = rng.integers(0, k, 400)
  test_x = ((centres[test_y] + 0.2 * rng.standard_normal((400, dim))) * scale
            + 100 * scale).astype(np.float32)
  test_x[:, 3] = 5.0
  got = dense.scores(dense.predict(probe, test_x), test_y)
  assert got == {"dense_miou": 1.0, "dense_acc": 1.0}
  again = dense.fit(x, y, k)   # deterministic
  np.testing.assert_array_equal(again.w, probe.w)
  # Pure noise: labels independent of the features; chance is 1/6 for accuracy.
  noise = rng.standard_normal((1200, dim)).astype(np.float32)
  probe = dense.fit(noise, y, k)
  got = dense.scores(dense.predict(probe, rng.standard_normal((3000, dim))),
                     rng.integers(0, k, 3000))
  assert got["dense_acc"] < 0.25 and got["dense_miou"] < 0.15


@pytest.mark.parametrize("pool_type", ["map", "tok"])
def test_encode_patches_is_the_image_towers_patch_tokens(pool_type):
  model = models.from_config(dict(
      image=dict(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=2,
                 pool_type=pool_type),
      text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=11),
      out_dim=(None, 16)))
  images = jax.random.uniform(jax.random.key(0), (5, 12, 12, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.key(1), images[:1],
                               jnp.zeros((1, 4), jnp.int32))["params"]
  handle = inference.SigLIP(model, params, image_size=12, text_len=4, vocab_size=11,
                            batch_size=2)   # 5 images: batches of 2, the last one padded
  got = handle.encode_patches(np.asarray(images))
  want = jax.jit(lambda x: model.apply({"params": params}, x, None)[2]["img/encoded"])(images)
  want = want[:, 1:] if pool_type == "tok" else want   # the [cls] token left out
  assert got.shape == (5, 9, 16) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="encode_patches"):
    handle.encode_patches(np.zeros((1, 16, 16, 3), np.float32))


class _PatchOracle:
  """A towers-only handle whose patch tokens are one-hot of the true label at each patch's
  pixel (`offset`, `offset`) (found by the image's pixels, worked out here with loops): with
  the centre's (offset 4 of 8) a right probe scores 1.0."""
  has_decoder = False

  def __init__(self, ds, train_n, patch=8, offset=4):
    rows = ds.train_scenes(range(train_n)) + ds.eval_split("heldout")
    self.n, self.k = len(ds.eval_split("heldout")), 1 + len(scenes.COLORS) * len(scenes.SHAPES)
    self.labels = {}
    for s in rows:
      side = s["class_map"].shape[0] // patch
      self.labels[s["image"].tobytes()] = [int(s["class_map"][i * patch + offset,
                                                              j * patch + offset])
                                           for i in range(side) for j in range(side)]

  def encode_patches(self, images):
    pixels = np.round((np.asarray(images) + 1) * 127.5).astype(np.uint8)
    return np.stack([np.eye(self.k, dtype=np.float32)[self.labels[p.tobytes()]]
                     for p in pixels])

  def encode_image(self, images):
    return np.eye(len(images), self.n, dtype=np.float32)

  def encode_strings(self, texts):
    return np.eye(len(texts), self.n, dtype=np.float32)


def test_the_scenes_evaluator_reports_the_probe_for_a_model_without_a_decoder():
  ds = scenes.ScenesDataset(seed=0, image_size=48, num_heldout=8, num_unseen=4)
  # 256 training scenes hold every seen pair (the held-out split's classes).
  ev = scenes_eval.ScenesEvaluator(ds, every_steps=0, num_probe_train=256)
  got = ev.run(_PatchOracle(ds, 256))
  assert got["scenes/dense_miou"] == 1.0 and got["scenes/dense_acc"] == 1.0
  assert "scenes/dense_miou_unseen" not in got and "scenes/caption_acc" not in got
  # Tokens of each patch's corner pixel: not the labels the evaluator scores against.
  got = ev.run(_PatchOracle(ds, 256, offset=0))
  assert got["scenes/dense_miou"] < 0.9 and got["scenes/dense_acc"] < 0.9


def test_num_probe_train_reaches_the_evaluator_from_the_config():
  config = cli.load_config_file(os.path.join(REPO, "configs", "siglip2_demo.py"))
  config.evals.scenes.num_probe_train = 16
  assert not [k for k, _ in config_defaults.unknown_keys(config) if k.startswith("evals.")]
  (ev,) = experiment.make_evaluators(config)
  assert ev.num_probe_train == 16
