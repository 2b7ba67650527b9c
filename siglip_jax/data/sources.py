"""Random-access image-text sources: `len(src)` records, `src[i]` -> a raw record dict.

A raw record is `{"image": encoded bytes | uint8 array | None, "texts": caption(s) | None,
"key": str}`, plus `"error": reason` when the source already knows it is unusable; decoding and
the usability checks live in `preprocess.py`, so a source only moves bytes.

- `WebDatasetSource(patterns)`: tar shards as img2dataset writes them (`webdataset.py`; the
  patterns, brace ranges included, in `shard_patterns.py`).
- `FolderSource(dir)`: images under `dir` listed in `dir/captions.jsonl`; only regular files
  inside `dir` are read, up to `max_image_bytes`.
- `ArrayRecordSource(dir)`: what `python -m siglip_jax.data.prepare` writes.
- `TfdsSource(name, ...)`: any TFDS image-text set prepared as ArrayRecord, via
  `tfds.data_source`, with a field mapping (`coco_captions`: "image", "captions/text").
- `Mixture(sources, weights)`: a weighted, deterministic interleave of the above.
- `shapes.TrainSource`: the embedded demo set, rendered on the fly; `from_config` builds each
  kind through `SOURCE_KINDS`, so the demo sets are read like real data.

Sources are picklable (Grain's worker processes get a copy): file handles are opened lazily
per process. Record order is a pure function of the file list (sorted), so every process sees
the same numbering.
"""
import json
import os
import stat
import struct

import numpy as np

# The WebDataset source and shard patterns live in their own modules; these names stay here.
from siglip_jax.data.shard_patterns import expand  # noqa: F401  pylint: disable=unused-import
from siglip_jax.data.webdataset import (MAX_IMAGE_BYTES, WebDatasetSource,  # noqa: F401
                                        split_member)

ARRAY_RECORD_FORMAT = "siglip_jax.array_record.v1"


_IMAGE_FIELDS = ("image", "file", "file_name", "filename", "path")
_TEXT_FIELDS = ("captions", "texts", "caption", "text")


class FolderSource:
  """`dir/captions.jsonl`, one JSON object a line: {"image": "rel/path.jpg", "caption": "..."}
  (or "captions": [...]; "file"/"file_name" and "text"/"texts" also accepted).

  captions.jsonl is untrusted: a row may name `/dev/zero`, a FIFO, `../../etc/shadow` or a
  symlink out of the folder. Only a relative name that resolves (symlinks followed) to a
  regular file inside `dir` is read, at most `max_image_bytes` of it; the rest are skipped as
  `outside_folder`, `not_a_regular_file`, `image_too_large` (or `missing_image`).
  """

  def __init__(self, directory, captions_file="captions.jsonl", max_image_bytes=MAX_IMAGE_BYTES):
    self.directory = os.path.realpath(os.path.expanduser(directory))
    self.max_image_bytes = int(max_image_bytes)
    path = os.path.join(self.directory, captions_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: a folder source needs a {captions_file}")
    self._rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.strip():
          self._rows.append(line)

  def __len__(self):
    return len(self._rows)

  def __getitem__(self, i):
    rec = {"key": f"captions.jsonl:{i + 1}", "image": None, "texts": None}
    try:
      meta = json.loads(self._rows[i])
      name = next((meta[k] for k in _IMAGE_FIELDS if meta.get(k)), None)
      rec["texts"] = next((meta[k] for k in _TEXT_FIELDS if k in meta), None)
      if "regions" in meta:   # checked (and bad ones counted) by data/regions.py
        rec["regions"] = meta["regions"]
    except (ValueError, TypeError, AttributeError):
      rec["error"] = "bad_metadata"
      return rec
    if name is None:
      return rec
    if not isinstance(name, str) or "\0" in name:
      rec["error"] = "bad_metadata"
      return rec
    rec["key"] = name
    try:
      rec["image"] = self._read(name)
    except _Skip as e:
      rec["error"], rec["detail"] = e.reason, e.detail
    except FileNotFoundError:
      rec["error"] = "missing_image"
    except OSError as e:
      rec["error"], rec["detail"] = "read_error", str(e)
    return rec

  def _read(self, name):
    if os.path.isabs(name):
      raise _Skip("outside_folder", "an absolute path")
    path = os.path.realpath(os.path.join(self.directory, name))
    if os.path.commonpath([path, self.directory]) != self.directory:
      raise _Skip("outside_folder", f"resolves to {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):   # before open: opening a FIFO would block
      raise _Skip("not_a_regular_file")
    # O_NONBLOCK: should a FIFO take the file's place after the stat, open still returns;
    # O_NOFOLLOW: nor may a symlink. fstat then judges what was actually opened.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
      st = os.fstat(fd)
      if not stat.S_ISREG(st.st_mode):
        raise _Skip("not_a_regular_file")
      if st.st_size > self.max_image_bytes:
        raise _Skip("image_too_large", f"{st.st_size} bytes")
      chunks, left = [], st.st_size
      while left > 0:   # a file growing after fstat is read no further than its size then
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
          break
        chunks.append(chunk)
        left -= len(chunk)
      return b"".join(chunks)
    finally:
      os.close(fd)


class _Skip(Exception):
  def __init__(self, reason, detail=""):
    super().__init__(reason)
    self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------ ArrayRecord (prepared)

_UNPARSED = object()


def encode_record(rec, valid_regions=_UNPARSED):
  """A raw record -> bytes: 4-byte length, JSON header (key, texts, its valid regions if it
  carries any: `prepare` counts the bad ones), then the image bytes. `valid_regions`: the
  record's valid regions where the caller parsed them already (None: it carries none)."""
  texts = rec.get("texts")
  from siglip_jax.data import regions as regions_lib
  from siglip_jax.data.preprocess import caption_list
  head = {"key": rec.get("key", ""), "texts": None if texts is None else caption_list(texts)}
  if valid_regions is _UNPARSED:
    carried = regions_lib.raw_regions(rec)
    valid_regions = None if carried is None else regions_lib.parse_regions(carried)[0]
  if valid_regions is not None:
    head["regions"] = valid_regions
  header = json.dumps(head).encode()
  return struct.pack("<I", len(header)) + header + bytes(rec.get("image") or b"")


def decode_record(data):
  (n,) = struct.unpack_from("<I", data)
  header = json.loads(bytes(data[4:4 + n]))
  image = bytes(data[4 + n:])
  rec = {"key": header.get("key", ""), "texts": header.get("texts"), "image": image or None}
  if "regions" in header:
    rec["regions"] = header["regions"]
  return rec


class ArrayRecordSource:
  """A data set written by `prepare`: `dir/meta.json` and `dir/*.array_record`."""

  def __init__(self, directory):
    from array_record.python import array_record_data_source   # optional dependency
    self.directory = os.path.abspath(os.path.expanduser(directory))
    with open(os.path.join(self.directory, "meta.json")) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != ARRAY_RECORD_FORMAT:
      raise ValueError(f"{self.directory}: not a siglip_jax ArrayRecord set "
                       f"(format {self.meta.get('format')!r})")
    files = [os.path.join(self.directory, f) for f in self.meta["files"]]
    self._source = array_record_data_source.ArrayRecordDataSource(files)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return decode_record(self._source[int(i)])


def is_prepared(directory):
  return os.path.isfile(os.path.join(os.path.expanduser(directory), "meta.json"))


# --------------------------------------------------------------------------------------- TFDS

def _get_path(tree, path):
  for part in path.split("/"):
    if tree is None:
      return None
    tree = tree.get(part) if hasattr(tree, "get") else None
  return tree


class TfdsSource:
  """Any TFDS image-text data set prepared with `file_format="array_record"`.

  `image_key` / `text_key` name the fields ("/" for nesting): coco_captions has "image" and
  "captions/text". The image field is read undecoded (encoded bytes) so that decoding and
  resizing happen once, here, and bad images are skipped like any other source's.

  Regions (the LocCa decoder's): `region_key` names a sequence of objects ("objects" in
  ref_coco), each with a box (`region_box_key`, in `box_order`: TFDS's BBoxFeature is "yxyx",
  ymin xmin ymax xmax) and one or more captions (`region_caption_key`, "refexp/raw"): each
  caption of an object is one region. With `text_key` empty, the image caption names the objects
  (the first caption of each, joined by ", "): ref_coco has no image captions.
  """

  def __init__(self, name, *, split="train", data_dir=None, image_key="image",
               text_key="captions/text", region_key="", region_box_key="bbox",
               region_caption_key="refexp/raw", box_order="yxyx"):
    if box_order not in BOX_ORDERS:
      raise ValueError(f"box order {box_order!r}: one of {', '.join(BOX_ORDERS)}")
    import tensorflow_datasets as tfds   # optional dependency: only this source needs it
    decoders = tfds.decode.SkipDecoding()
    for part in reversed(image_key.split("/")):
      decoders = {part: decoders}
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False, decoders=decoders)
    except Exception as e:
      raise ValueError(
          f"TFDS data set {name!r} (split {split!r}, data_dir {data_dir!r}) cannot be read as "
          f"a random-access source: {e}. Prepare it with ArrayRecord files, e.g. "
          f"`tfds build {name} --file_format=array_record`") from e
    self.name, self.image_key, self.text_key = name, image_key, text_key
    self.region_key, self.region_box_key = region_key, region_box_key
    self.region_caption_key, self.box_order = region_caption_key, box_order

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    ex = self._source[int(i)]
    rec = {"key": f"{self.name}[{i}]", "image": _get_path(ex, self.image_key),
           "texts": _get_path(ex, self.text_key) if self.text_key else None}
    if self.region_key:
      rec["regions"] = tfds_regions(_get_path(ex, self.region_key), self.region_box_key,
                                    self.region_caption_key, self.box_order)
      if not self.text_key:
        firsts = [r["caption"] for r in rec["regions"] if r["first"]]
        rec["texts"] = ", ".join(firsts) if firsts else None
    return rec


BOX_ORDERS = ("yxyx", "xyxy")


def _text(value):
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def tfds_regions(objects, box_key, caption_key, box_order):
  """TFDS objects (a dict of per-object arrays, as `tfds.data_source` returns a Sequence of
  dicts) -> regions {"box": [x0, y0, x1, y1], "caption", "first"}; "first" marks an object's
  first caption. Boxes are not checked here: data/regions.py drops and counts bad ones."""
  if objects is None:
    return []
  boxes = _get_path(objects, box_key)
  captions = _get_path(objects, caption_key)
  if boxes is None or captions is None:
    return []
  out = []
  for box, texts in zip(np.asarray(boxes, np.float64).reshape(-1, 4), captions):
    a, b, c, d = (float(v) for v in box)
    xyxy = [b, a, d, c] if box_order == "yxyx" else [a, b, c, d]
    texts = [texts] if isinstance(texts, (bytes, str)) else list(texts)
    for k, text in enumerate(texts):
      out.append({"box": xyxy, "caption": _text(text), "first": k == 0})
  return out


# ------------------------------------------------------------------------------------ mixture

class Mixture:
  """Weighted interleave of sources, deterministic for a seed.

  Positions come in periods of `period`; each period holds round(w_j * period) items of source
  j in a fixed shuffled pattern, so any position maps to (source, item) in O(1) with no table
  as long as the data. Item numbers run through a source in order and wrap around (an
  oversampled source repeats); the loader's global shuffle scatters them. One pass over the
  mixture (`len`) covers every source at least once.
  """

  def __init__(self, sources, weights, seed=0, period=1000):
    if len(sources) != len(weights) or not sources:
      raise ValueError("Mixture needs one weight per source")
    w = np.asarray(weights, np.float64)
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"mixture weights must be >= 0 and not all 0: {list(weights)}")
    keep = [j for j in range(len(w)) if w[j] > 0]
    self.sources = [sources[j] for j in keep]
    w = w[keep] / w[keep].sum()
    period = max(int(period), len(w))
    counts = np.maximum(np.floor(w * period).astype(np.int64), 1)
    while counts.sum() < period:   # largest remainder
      counts[np.argmax(w * period - counts)] += 1
    while counts.sum() > period:
      counts[np.argmax(np.where(counts > 1, counts - w * period, -np.inf))] -= 1
    self.period, self.counts = period, counts
    pattern = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(pattern)
    self._pattern = pattern
    self._rank = np.zeros(period, np.int64)
    for j in range(len(counts)):
      self._rank[pattern == j] = np.arange(counts[j])
    sizes = np.array([len(s) for s in self.sources], np.int64)
    if np.any(sizes == 0):
      raise ValueError("a mixture source is empty")
    self._sizes = sizes
    self._len = int(np.max(-(-sizes // counts))) * period

  def __len__(self):
    return self._len

  def locate(self, i):
    q, r = divmod(int(i), self.period)
    j = int(self._pattern[r])
    return j, int((q * self.counts[j] + self._rank[r]) % self._sizes[j])

  def __getitem__(self, i):
    j, k = self.locate(i)
    return self.sources[j][k]


# ------------------------------------------------------------------------------- from config

def _webdataset(spec, config):
  return WebDatasetSource(spec["shards"], max_image_bytes=_max_image_bytes(config))


def _folder(spec, config):
  d = spec["dir"]
  return ArrayRecordSource(d) if is_prepared(d) else FolderSource(
      d, max_image_bytes=_max_image_bytes(config))


def _tfds(spec, config):
  del config
  return TfdsSource(spec["tfds_name"], split=spec.get("split", "train"),
                    data_dir=spec.get("tfds_data_dir", "") or None,
                    image_key=spec.get("image_key", "image"),
                    text_key=spec.get("text_key", "captions/text"),
                    **{k: spec[k] for k in TFDS_REGION_KEYS if k in spec})


def _shapes(spec, config):
  del spec
  from siglip_jax.data import shapes   # pylint: disable=import-outside-toplevel
  # Rendered at the training size, so preprocessing leaves the pixels as they are.
  return shapes.TrainSource(seed=config.seed, image_size=config.input.image_size)


def _scenes(spec, config):
  del spec
  from siglip_jax.data import scenes   # pylint: disable=import-outside-toplevel
  return scenes.TrainSource(seed=config.seed, image_size=config.input.image_size)


def _shapes_naflex(spec, config):
  del spec
  from siglip_jax.data import shapes_naflex   # pylint: disable=import-outside-toplevel
  # input.image_size is the canvas's short side: wide and tall canvases are 4x as long.
  return shapes_naflex.TrainSource(seed=config.seed, base_size=config.input.image_size)


def _max_image_bytes(config):
  # Bytes read for one image at most (tar members and folder files); larger ones are skipped.
  return config.input.get("max_image_bytes", MAX_IMAGE_BYTES)


# `input.data` kind -> (builder(spec, config) of its source, the spec key it cannot do without
# and its placeholder). The embedded demo sets are sources like any other: a new one (the
# scenes set, varied-aspect shapes for NaFlex) is one more entry here.
SOURCE_KINDS = {
    "webdataset": (_webdataset, "shards", "GLOB"),
    "folder": (_folder, "dir", "DIR"),
    "tfds": (_tfds, "tfds_name", "NAME"),
    "shapes": (_shapes, None, None),
    "scenes": (_scenes, None, None),
    "shapes_naflex": (_shapes_naflex, None, None),
}
TFDS_REGION_KEYS = ("region_key", "region_box_key", "region_caption_key", "box_order")
_SPEC_KEYS = ("shards", "dir", "tfds_name", "split", "tfds_data_dir", "image_key",
              "text_key") + TFDS_REGION_KEYS


def _one(kind, spec, config, where):
  if kind not in SOURCE_KINDS:
    raise ValueError(f"unknown data kind {kind!r} in {where}; training reads one of "
                     f"{', '.join(SOURCE_KINDS)}")
  build, needs, placeholder = SOURCE_KINDS[kind]
  if needs and not spec.get(needs):
    if where == "input":
      raise ValueError(f"config key `input.{needs}` is empty: give "
                       f"--config.input.{needs}={placeholder}")
    raise ValueError(f"{where} ({kind}) has no `{needs}`")
  return build(spec, config)


def from_config(config):
  """The training source of a config: `input.data` with its keys, or a mixture of
  `input.mixture` = ((kind, {keys}, weight), ...) when that is non-empty."""
  inp = config.input
  mixture = inp.get("mixture", ()) or ()
  if mixture:
    parts = [(_one(kind, dict(spec), config, f"input.mixture[{j}]"), float(weight))
             for j, (kind, spec, weight) in enumerate(mixture)]
    return Mixture([p for p, _ in parts], [w for _, w in parts], seed=config.seed)
  spec = {k: inp.get(k) for k in _SPEC_KEYS if inp.get(k) is not None}
  return _one(inp.get("data", "webdataset"), spec, config, "input")
