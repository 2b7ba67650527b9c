"""SILC/TIPS's extra views of an image: one global and `n_local` local random-resized crops
(flips and colour jitter as configured) and TIPS's patch mask, drawn on the host.

Their randomness has a stream of its own, `rng_for(seed, slot)`, apart from the one the caption,
crop and regions of the original image draw from, so turning the views on changes nothing
else an example holds; a view is a pure function of (seed, slot), whichever process draws it.
numpy/PIL only, like the rest of the preprocessing (it runs in Grain's workers).
"""
import numpy as np

VIEW_STREAM = 0x5EED_0F_1E   # the third word of the views' generator seed
KEYS = ("view_global", "view_local", "tips_mask")


def rng_for(seed, slot):
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(slot), VIEW_STREAM])


def color_jitter(pixels, rng, strength):
  """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] (SimCLR's
  order), on uint8 RGB pixels."""
  x = pixels.astype(np.float32)
  lo, hi = 1.0 - strength, 1.0 + strength
  x = x * rng.uniform(lo, hi)                                   # brightness
  grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
  x = (x - grey.mean()) * rng.uniform(lo, hi) + grey.mean()     # contrast
  grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  x = (x - grey) * rng.uniform(lo, hi) + grey                   # saturation
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def draw(img, rng, settings, resample):
  """{"view_global": uint8 [G, G, 3], "view_local": uint8 [n, L, L, 3] (SILC),
  "tips_mask": bool [grid] (TIPS: exactly `num_masked` patches True)} for a PIL RGB image.
  `settings`: `objectives.distill.view_settings`'s dict."""
  from siglip_jax.data import preprocess   # it imports this module
  w, h = img.size

  def crop(size, scale):
    box = preprocess.random_box(w, h, rng, scale, (3 / 4, 4 / 3))
    out = np.asarray(img.resize((size, size), resample, box=box), np.uint8)
    if settings["flip"] and rng.random() < 0.5:
      out = out[:, ::-1]
    if settings["color_jitter"]:
      out = color_jitter(out, rng, settings["color_jitter"])
    return np.ascontiguousarray(out)

  out = {"view_global": crop(settings["global_size"], settings["global_scale"])}
  if settings["n_local"]:
    out["view_local"] = np.stack([crop(settings["local_size"], settings["local_scale"])
                                  for _ in range(settings["n_local"])])
  if settings["num_masked"]:
    mask = np.zeros(settings["grid"], bool)
    mask[rng.permutation(settings["grid"])[:settings["num_masked"]]] = True
    out["tips_mask"] = mask
  return out
