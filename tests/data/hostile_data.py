"""Hostile data sets: tar shards and a captioned folder holding every attack the loader must
survive (a helper module like wds_fixtures), each with the exact counts `check` must report.

The tar members are written by hand where tarfile would refuse to write them (a header that
claims a terabyte, a shard cut short), and the over-sized members are sparse files: they cost
no disk, but a reader that trusted their sizes would allocate gigabytes.
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from wds_fixtures import _jpeg, colour

HUGE = 1_200_000_000      # a sparse member / file: more than check may hold in memory (1 GB)
TERABYTE = 1 << 40


def _header(name, size, kind=tarfile.REGTYPE):
  info = tarfile.TarInfo(name)
  info.size, info.type = size, kind
  return info.tobuf(tarfile.GNU_FORMAT)   # sizes past 8 GiB in base-256, as GNU tar writes


def _member(name, data):
  return _header(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _sample(i, rng, caption=None):
  text = f"photo number {i}".encode() if caption is None else caption
  return _member(f"{i:06d}.jpg", _jpeg(i, rng)) + _member(f"{i:06d}.txt", text)


_END = bytes(2 * tarfile.BLOCKSIZE)   # the end-of-archive blocks


def make_hostile_shards(directory, seed=0):
  """Writes directory/h-0000{0..7}.tar; returns {"pattern", "records", "usable", "skipped",
  "good": [record numbers of usable samples]} where pattern is the brace form."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  shards = []
  # 0: duplicate keys and blank captions; a proper end.
  dup = (_member("dupA.jpg", _jpeg(100, rng)) + _member("dupA.txt", b"photo number 100")
         + _sample(2, rng)
         # the same key again, image and caption of another sample: never paired with the above
         + _member("dupA.jpg", _jpeg(101, rng)) + _member("dupA.txt", b"photo number 101")
         + _member("dupB.jpg", _jpeg(102, rng)) + _member("dupB.txt", b"one")
         + _member("dupB.txt", b"two")                                  # two captions
         + _member("dupC.jpg", _jpeg(103, rng)) + _member("dupC.png", b"\x89PNG")  # two images
         + _member("dupC.txt", b"which image?"))
  shards.append(_sample(0, rng) + _sample(1, rng) + dup
                + _sample(200, rng, caption=b"\x00\x00 \x01\t\x00")    # NULs and controls
                + _sample(201, rng, caption="\u200b\ufeff\x1b\x7f".encode())  # format chars
                + _sample(202, rng, caption=b"a " * (3 << 19))          # 1.5 MiB caption
                + _END)
  # 1: an image member of HUGE bytes (a sparse hole), then a good sample after it.
  shards.append([_sample(3, rng) + _header("huge.jpg", HUGE), HUGE + (-HUGE % 512),
                 _member("huge.txt", b"a huge image") + _sample(4, rng) + _END])
  # 2: a member header claiming a terabyte, with a good-looking member behind it.
  shards.append(_sample(5, rng) + _header("tera.jpg", TERABYTE) + _sample(300, rng) + _END)
  # 3: a pax extended header claiming a terabyte of metadata.
  shards.append(_sample(6, rng) + _header("././@PaxHeader", TERABYTE, tarfile.XHDTYPE)
                + _sample(301, rng) + _END)
  # 4: cut right after a complete sample: no end-of-archive blocks.
  shards.append(_sample(7, rng) + _sample(8, rng))
  # 5: cut at a header boundary inside a sample (its caption never came).
  shards.append(_sample(9, rng) + _member("000010.jpg", _jpeg(10, rng)))
  # 6: cut in the middle of a header.
  shards.append(_sample(11, rng) + _header("000302.jpg", 100)[:300])
  # 7: cut in the middle of a member's data (an interrupted download).
  shards.append(_sample(12, rng) + _header("000303.jpg", 5000) + b"\xff" * 100)
  for s, content in enumerate(shards):
    with open(os.path.join(directory, f"h-{s:05d}.tar"), "wb") as f:
      if isinstance(content, list):   # [before, hole size, after]
        before, hole, after = content
        f.write(before)
        f.seek(hole, os.SEEK_CUR)
        f.write(after)
      else:
        f.write(content)
  skipped = {"duplicate_key": 6, "blank_caption": 2, "caption_too_large": 1,
             "image_too_large": 1, "member_out_of_bounds": 3, "truncated_shard": 3}
  good = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
  return {"pattern": os.path.join(directory, "h-{00000..00007}.tar"), "good": good,
          "records": len(good) + sum(skipped.values()), "usable": len(good),
          "skipped": skipped}


def make_hostile_folder(directory, outside):
  """A folder whose captions.jsonl names things outside it or not files; returns its counts."""
  os.makedirs(directory, exist_ok=True)
  os.makedirs(outside, exist_ok=True)
  Image.new("RGB", (20, 20), colour(1)).save(os.path.join(directory, "ok.png"))
  Image.new("RGB", (20, 20), colour(2)).save(os.path.join(outside, "secret.png"))
  os.symlink("ok.png", os.path.join(directory, "link.png"))
  os.symlink(os.path.join(outside, "secret.png"), os.path.join(directory, "escape.png"))
  os.symlink("/dev/zero", os.path.join(directory, "zero_link"))
  os.mkfifo(os.path.join(directory, "pipe"))
  os.mkdir(os.path.join(directory, "subdir"))
  with open(os.path.join(directory, "big.png"), "wb") as f:
    f.truncate(HUGE)   # sparse
  rows = [("ok.png", None), ("link.png", None), ("subdir/../ok.png", None),
          ("/dev/zero", "outside_folder"), ("../" * 12 + "etc/passwd", "outside_folder"),
          (os.path.join(os.path.realpath(directory), "ok.png"), "outside_folder"),
          ("escape.png", "outside_folder"), ("zero_link", "outside_folder"),
          ("pipe", "not_a_regular_file"), ("subdir", "not_a_regular_file"),
          ("big.png", "image_too_large"), ("ok\0.png", "bad_metadata")]
  with open(os.path.join(directory, "captions.jsonl"), "w") as f:
    for name, _ in rows:
      f.write(json.dumps({"image": name, "caption": f"a picture called {name}"}) + "\n")
  skipped = {}
  for _, reason in rows:
    if reason:
      skipped[reason] = skipped.get(reason, 0) + 1
  usable = sum(reason is None for _, reason in rows)
  return {"dir": directory, "records": len(rows), "usable": usable, "skipped": skipped,
          "reasons": [r for _, r in rows]}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  """Both hostile sets (import it into a test module to use it there)."""
  root = tmp_path_factory.mktemp("hostile")
  return {"shards": make_hostile_shards(str(root / "shards")),
          "folder": make_hostile_folder(str(root / "folder"), str(root / "outside"))}


def read_caption(rec):
  texts = rec.get("texts")
  return texts.decode() if isinstance(texts, bytes) else texts


def image_colour(rec):
  return np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"), np.float64).mean((0, 1))
