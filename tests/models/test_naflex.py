"""The NaFlex position-embedding resize (models/naflex_vit.py `resize_posemb`) against torch's
`F.interpolate(mode="bilinear", antialias=True, align_corners=False)`, the operation transformers'
Siglip2 resize reproduces, and against big_vision's naflex_vit resize (jax.image
.scale_and_translate onto a 64 x 64 canvas, then cropped)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.models.naflex_vit import resize_posemb

# (height, width) patch grids: 1:4 and 4:1, single rows and columns, shrinking and growing.
GRIDS = [(1, 4), (4, 1), (2, 8), (8, 2), (4, 16), (16, 4), (3, 5), (5, 3), (1, 1), (1, 7),
         (7, 1), (3, 1), (16, 1), (1, 16), (4, 4), (16, 16), (12, 12), (32, 8), (8, 32),
         (20, 1), (9, 13), (6, 42)]


def _ours_all(table, grids):
  """Every grid's resize from one batched call (one compile): [[h*w, D], ...]."""
  length = max(h * w for h, w in grids)
  out = np.asarray(resize_posemb(jnp.asarray(table), jnp.asarray(grids), length))
  return [out[b, :h * w] for b, (h, w) in enumerate(grids)]


def _torch(table, h, w):
  """torch's resize of the [g, g, D] table to [h, w] -> [h*w, D], row-major."""
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  x = torch.from_numpy(table).permute(2, 0, 1)[None]
  if w == 1:
    # torch's antialiased bilinear kernel is wrong for an output width of 1 (when the height is
    # not 1): from a 4 x 4 table to 3 x 1 it is 0.81 off our weights, while the same resize
    # posed transposed (to 1 x 3, the table transposed) agrees to 6e-8. Resizing is separable
    # and the same per axis, so the transposed problem is the reference there.
    y = f.interpolate(x.transpose(2, 3), size=(w, h), mode="bilinear", align_corners=False,
                      antialias=True).transpose(2, 3)
  else:
    y = f.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
  return y[0].permute(1, 2, 0).reshape(h * w, -1).numpy()


@pytest.mark.parametrize("g", [4, 16])
def test_resize_matches_torch_interpolate(g):
  table = np.random.default_rng(g).standard_normal((g, g, 6)).astype(np.float32)
  for (h, w), ours in zip(GRIDS, _ours_all(table, GRIDS)):
    np.testing.assert_allclose(ours, _torch(table, h, w), atol=1e-5,
                               err_msg=f"grid {g} -> {h}x{w}")


def test_a_batch_resizes_each_image_to_its_own_grid():
  """One call, several grids, padded to one length: each image's rows are its own resize and
  its padding rows take the first patch's embedding (transformers' choice; masked anyway)."""
  table = np.random.default_rng(0).standard_normal((4, 4, 3)).astype(np.float32)
  grids = [(1, 4), (4, 1), (2, 3)]
  out = np.asarray(resize_posemb(jnp.asarray(table), jnp.asarray(grids), 8))
  for b, (h, w) in enumerate(grids):
    np.testing.assert_allclose(out[b, :h * w], _torch(table, h, w), atol=1e-5)
    np.testing.assert_array_equal(out[b, h * w:], np.repeat(out[b, :1], 8 - h * w, 0))


def test_big_vision_canvas_resize_agrees_up_to_64_a_side():
  """big_vision's naflex_vit resizes the table onto a fixed 64 x 64 canvas with
  jax.image.scale_and_translate (bilinear, antialiased) and gathers each patch's row: within
  the canvas that is the same resize (what interop/naflex_spec.py's refusal of a big_vision
  export says); past 64 patches a side big_vision's gather has nothing to read."""
  grids = [(1, 4), (4, 1), (3, 5), (16, 16), (32, 8), (20, 1), (64, 2), (3, 64)]
  rng = np.random.default_rng(1)
  # The scale is an argument, so one compile serves every grid (as big_vision's vmap does).
  canvas = jax.jit(lambda t, scale: jax.image.scale_and_translate(
      t, (64, 64, t.shape[-1]), (0, 1), scale, jnp.zeros(2), method="bilinear",
      antialias=True))
  for g in (4, 16):
    table = rng.standard_normal((g, g, 5)).astype(np.float32)
    for (h, w), ours in zip(grids, _ours_all(table, grids)):
      theirs = np.asarray(canvas(table, jnp.asarray([h / g, w / g], jnp.float32)))
      np.testing.assert_allclose(theirs[:h, :w].reshape(h * w, 5), ours, atol=1e-6,
                                 err_msg=f"{g} -> {h}x{w}")
