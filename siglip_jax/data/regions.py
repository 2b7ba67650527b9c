"""Regions of an example for the LocCa decoder: read, checked, moved with the pixels, picked.

A region is `{"box": [x0, y0, x1, y1], "caption": str}`, corners in [0, 1] of the image, x right,
y down (../shared/design.md, "Regions and location tokens"). Raw records carry them as a list in
`raw["regions"]` (the scenes set, TFDS through a field mapping) or as JSON (`raw["json"]`: a
WebDataset `key.json` member, a folder's captions.jsonl row) holding `{"regions": [...]}`.

A region whose box is not four finite numbers inside [0, 1] with x0 < x1 and y0 < y1, or whose
caption is blank, is dropped and counted; so is a region that a crop leaves less than half
visible (its box is clipped to the crop otherwise), and any beyond `max_regions`. The example is
used all the same: it trains captioning, and the tasks its remaining regions allow.
"""
import json
import math

import numpy as np

MIN_VISIBLE = 0.5


def _blank(text):
  from siglip_jax.data.preprocess import is_blank
  return is_blank(text)


def _valid(region):
  if not isinstance(region, dict):
    return False
  box, caption = region.get("box"), region.get("caption")
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8", "replace")
  if not isinstance(caption, str) or _blank(caption):
    return False
  try:
    x0, y0, x1, y1 = (float(v) for v in box)
  except (TypeError, ValueError):
    return False
  if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
    return False
  return 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0


def raw_regions(raw):
  """The record's regions as it carries them (unchecked), or None when it carries none."""
  regions = raw.get("regions")
  if regions is None and raw.get("json") is not None:
    try:
      meta = raw["json"]
      meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
      regions = meta.get("regions") if isinstance(meta, dict) else None
    except (ValueError, UnicodeDecodeError):
      regions = None
  return regions


def parse(raw):
  """-> (valid regions as {"box": [4 floats], "caption": str}, number dropped as invalid)."""
  return parse_regions(raw_regions(raw))


def parse_regions(regions):
  """`parse` of what `raw_regions` returned (for callers that read it already)."""
  if regions is None:
    return [], 0
  if not isinstance(regions, (list, tuple)):
    return [], 1
  good = []
  for r in regions:
    if _valid(r):
      caption = r["caption"]
      caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
      good.append({"box": [float(v) for v in r["box"]], "caption": caption.strip()})
  return good, len(regions) - len(good)


def move(regions, crop, width, height, flipped):
  """Boxes after cropping `crop` (left, top, right, bottom in pixels of a width x height image)
  and an optional horizontal flip: clipped to the crop, dropped when less than half stays
  visible. -> (kept, number dropped)."""
  left, top, right, bottom = crop
  cw, ch = right - left, bottom - top
  kept = []
  for r in regions:
    x0, y0, x1, y1 = r["box"]
    # To the crop's [0, 1] frame.
    bx = np.array([(x0 * width - left) / cw, (y0 * height - top) / ch,
                   (x1 * width - left) / cw, (y1 * height - top) / ch])
    clipped = np.clip(bx, 0.0, 1.0)
    area = (bx[2] - bx[0]) * (bx[3] - bx[1])
    visible = max(clipped[2] - clipped[0], 0.0) * max(clipped[3] - clipped[1], 0.0)
    if area <= 0 or visible < MIN_VISIBLE * area:
      continue
    if flipped:
      clipped = np.array([1.0 - clipped[2], clipped[1], 1.0 - clipped[0], clipped[3]])
    kept.append({"box": [float(v) for v in clipped], "caption": r["caption"]})
  return kept, len(regions) - len(kept)


def pick(regions, rng):
  """One region for the referring-expression pass and one for the grounded-captioning pass,
  each drawn with `rng` (the example's; deterministic per slot), or (None, None)."""
  if not regions:
    return None, None
  a, b = rng.integers(len(regions), size=2)
  return regions[int(a)], regions[int(b)]


def padded(regions, max_regions):
  """boxes float32 [max_regions, 4] and mask bool [max_regions] of the first regions."""
  boxes = np.zeros((max_regions, 4), np.float32)
  mask = np.zeros(max_regions, bool)
  for k, r in enumerate(regions[:max_regions]):
    boxes[k], mask[k] = r["box"], True
  return boxes, mask
