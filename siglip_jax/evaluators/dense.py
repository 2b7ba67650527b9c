"""A dense-feature probe: a linear classifier on frozen patch tokens (before the MAP head).

Each patch is labelled with the scene's class map at its centre pixel (0 background, else the
colour-shape class of the object there); a multinomial logistic regression (bias, small L2
penalty, standardized features) is fitted on training scenes' patches and scored on held-out
ones:

- `dense_miou`: mean over the object classes present in the held-out labels (background
  excluded) of IoU = |pred == c & label == c| / |pred == c | label == c| over all held-out
  patches;
- `dense_acc`: accuracy on the held-out foreground patches.

The fit is full-batch L-BFGS, jitted, for at most `steps` iterations (fewer once the gradient
norm is below `tol`): deterministic, and about a second for 1024 scenes x 36 patches x 128 dims
on 2 CPU cores.
"""
import functools
import math
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
import optax


def patch_labels(class_maps, patch_size):
  """class_maps int [N, S, S] -> int32 [N, (S/p)^2]: each patch's label at its centre pixel
  (row i*p + p//2, column j*p + p//2; for even p the lower right of the central four), patches
  in row-major order like the ViT's tokens."""
  class_maps = np.asarray(class_maps)
  n, height, width = class_maps.shape
  p = int(patch_size)
  if height % p or width % p:
    raise ValueError(f"class maps of {height}x{width} are not a whole number of {p}-px patches")
  centres = class_maps[:, p // 2::p, p // 2::p]
  return centres.reshape(n, -1).astype(np.int32)


class Probe(NamedTuple):
  mean: np.ndarray   # [D] of the training features
  std: np.ndarray    # [D]
  w: np.ndarray      # [D, K] on standardized features
  b: np.ndarray      # [K]


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, y, l2, tol, *, num_classes, steps):
  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))

  def loss(p):
    w, b = p
    xent = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)
    return jnp.mean(xent) + 0.5 * l2 * jnp.sum(w * w)   # the bias is not penalized

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  # Stop at convergence too: past it each step's line search runs to its limit (float32 noise
  # defeats its decrease test): 40x the cost on separable features.
  def going(carry):
    count = optax.tree_utils.tree_get(carry[1], "count")
    grad = optax.tree_utils.tree_get(carry[1], "grad")
    return (count == 0) | ((count < steps) & (optax.tree_utils.tree_norm(grad) >= tol))

  return jax.lax.while_loop(going, step, (params, opt.init(params)))[0]


def fit(features, labels, num_classes, *, l2=1e-4, steps=100, tol=1e-4):
  """Multinomial logistic regression of `labels` int [M] in [0, num_classes) on `features`
  [M, D], standardized with the training mean and std (a constant feature stays 0)."""
  x = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes})")
  mean = x.mean(0)
  std = x.std(0)
  std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0)   # constant: left at 0
  w, b = _fit(jnp.asarray((x - mean) / std), jnp.asarray(labels, jnp.int32), jnp.float32(l2),
              jnp.float32(tol), num_classes=int(num_classes), steps=int(steps))
  return Probe(mean, std, np.asarray(w), np.asarray(b))


def predict(probe, features):
  """Class ids int [M] of `features` [M, D]."""
  x = (np.asarray(features, np.float32) - probe.mean) / probe.std
  return np.argmax(x @ probe.w + probe.b, axis=-1)


def scores(pred, labels):
  """{"dense_miou", "dense_acc"} of predicted vs true patch labels (any shape, 0 background);
  NaN where the held-out labels hold no object."""
  pred, labels = np.ravel(pred), np.ravel(labels)
  classes = np.unique(labels[labels != 0])
  if not len(classes):
    return {"dense_miou": float("nan"), "dense_acc": float("nan")}
  size = int(max(pred.max(), labels.max())) + 1
  inter = np.bincount(labels[pred == labels], minlength=size)
  union = np.bincount(pred, minlength=size) + np.bincount(labels, minlength=size) - inter
  fg = labels != 0
  return {"dense_miou": float(np.mean(inter[classes] / union[classes])),
          "dense_acc": float(np.mean(pred[fg] == labels[fg]))}


def _grid(num_tokens, image_size):
  """The patch size of a square image cut into `num_tokens` square patches."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens or image_size % side:
    raise ValueError(f"{num_tokens} patch tokens are not a square grid of a {image_size}-px "
                     "image")
  return image_size // side


def evaluate(model, train_images, train_class_maps, test_images, test_class_maps, num_classes,
             **fit_kwargs):
  """Fits the probe on the patch tokens `model.encode_patches` gives for the training images
  (float32 [N, S, S, 3] in [-1, 1]) and scores it on the test images -> {"dense_miou",
  "dense_acc"}. The patch size is the image side over the token grid's side."""
  def features_and_labels(images, class_maps):
    feats = model.encode_patches(images)
    labels = patch_labels(class_maps, _grid(feats.shape[1], np.shape(class_maps)[-1]))
    return feats.reshape(-1, feats.shape[-1]), labels.reshape(-1)

  x, y = features_and_labels(train_images, train_class_maps)
  probe = fit(x, y, num_classes, **fit_kwargs)
  x, y = features_and_labels(test_images, test_class_maps)
  return scores(predict(probe, x), y)
