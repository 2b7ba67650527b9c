"""Small WebDataset shards made with PIL (a helper module, not a conftest: tests/conftest.py
is imported as `conftest` by tests elsewhere), with the bad records real crawls contain.

Every good image is a flat colour chosen from its record number (and its caption names the
number), so a test can tell which record an image came from after decoding and resizing.
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

# The unusable records every data set made here holds, and the reason each is counted under.
BAD = {"trunc_a": "truncated_image", "trunc_b": "truncated_image",
       "notimage": "undecodable_image", "blank": "blank_caption", "nocaption": "missing_caption"}
# Odd but usable: converted to RGB and used.
ODD = ("cmyk", "gray", "rgba", "palette", "webp")


def colour(i):
  return ((37 * i) % 256, (91 * i + 50) % 256, (151 * i + 100) % 256)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _jpeg(i, rng):
  w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
  return _encode(Image.new("RGB", (w, h), colour(i)), "JPEG", quality=95)


def _noisy_jpeg(rng, size=(80, 60)):
  return _encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)), "JPEG")


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def record_members(kind, i, rng):
  """(members {ext: bytes}) of one record of `kind` ("good", a BAD key or an ODD key)."""
  caption = f"photo number {i}".encode()
  meta = json.dumps({"key": f"{i:06d}", "width": 64}).encode()
  if kind == "good":
    return {"jpg": _jpeg(i, rng), "txt": caption, "json": meta}
  if kind in ("trunc_a", "trunc_b"):
    data = _noisy_jpeg(rng)
    return {"jpg": data[:len(data) * (2 if kind == "trunc_a" else 9) // 10], "txt": caption}
  if kind == "notimage":
    return {"jpg": b"<html>404 not found</html>\n", "txt": caption}
  if kind == "blank":
    return {"jpg": _jpeg(i, rng), "txt": b"  \n\t "}
  if kind == "nocaption":
    return {"jpg": _jpeg(i, rng), "json": meta}
  base = Image.new("RGB", (50, 40), colour(i))
  if kind == "cmyk":
    return {"jpg": _encode(base.convert("CMYK"), "JPEG"), "txt": caption}
  if kind == "gray":
    return {"jpg": _encode(base.convert("L"), "JPEG"), "txt": caption}
  if kind == "rgba":
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    return {"png": _encode(rgba, "PNG"), "txt": caption}
  if kind == "palette":
    return {"png": _encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
            "txt": caption}
  if kind == "webp":
    return {"webp": _encode(base, "WEBP"), "txt": caption}
  raise ValueError(kind)


def make_shards(directory, *, num_good=40, num_shards=3, seed=0, odd_and_bad=True):
  """Writes `directory/shard-%05d.tar`; returns a description of what is in them."""
  os.makedirs(directory, exist_ok=True)
  kinds = ["good"] * num_good + (list(BAD) + list(ODD) if odd_and_bad else [])
  np.random.default_rng(seed).shuffle(kinds)
  rng = np.random.default_rng(seed + 1)
  records = []
  per = -(-len(kinds) // num_shards)
  for s in range(num_shards):
    with tarfile.open(os.path.join(directory, f"shard-{s:05d}.tar"), "w") as tar:
      for i in range(s * per, min((s + 1) * per, len(kinds))):
        for ext, data in record_members(kinds[i], i, rng).items():
          _add(tar, f"{i:06d}.{ext}", data)
        records.append(kinds[i])
  usable = [i for i, k in enumerate(records) if k not in BAD]
  skipped = {}
  for k in records:
    if k in BAD:
      skipped[BAD[k]] = skipped.get(BAD[k], 0) + 1
  return {"glob": os.path.join(directory, "shard-*.tar"), "dir": directory, "kinds": records,
          "records": len(records), "usable": usable, "skipped": skipped}


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
  """Import it into a test module (`from wds_fixtures import wds`) to use it there."""
  return make_shards(str(tmp_path_factory.mktemp("wds")))


TFDS_NAME = "siglip_tiny_captions"
_TFDS_DIRS = {}


def tiny_tfds_dir(tmp_path_factory, n=12):
  """A TFDS data set built here and prepared offline as ArrayRecord (no download), once per
  test session; None where tensorflow_datasets is not installed. Record 3 has a blank caption."""
  try:
    import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if n in _TFDS_DIRS:
    return _TFDS_DIRS[n]

  class SiglipTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(n):
        caps = ["   "] if i == 3 else [f"caption {i} a", f"caption {i} b"]
        yield i, {"image": np.full((30 + i, 40, 3), 10 * i, np.uint8),
                  "captions": {"text": caps}}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  SiglipTinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
  _TFDS_DIRS[n] = data_dir
  return data_dir
