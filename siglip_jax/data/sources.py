"""Random-access image-text sources: `len(src)` records, `src[i]` -> a raw record dict.

A raw record is `{"image": encoded bytes | uint8 array | None, "texts": caption(s) | None,
"key": str}`, plus `"error": reason` when the source already knows it is unusable; decoding and
the usability checks live in `preprocess.py`, so a source only moves bytes.

- `WebDatasetSource(glob)`: tar shards as img2dataset writes them (`key.jpg|jpeg|png|webp`,
  `key.txt`, optional `key.json`). Random access without extracting: an index of each member's
  byte offset is built from the tar headers once, then `os.pread` reads a member directly.
- `FolderSource(dir)`: images under `dir` listed in `dir/captions.jsonl`.
- `ArrayRecordSource(dir)`: what `python -m siglip_jax.data.prepare` writes.
- `TfdsSource(name, ...)`: any TFDS image-text set prepared as ArrayRecord, via
  `tfds.data_source`, with a field mapping (`coco_captions`: "image", "captions/text").
- `Mixture(sources, weights)`: a weighted, deterministic interleave of the above.

Sources are picklable (Grain's worker processes get a copy): file handles are opened lazily
per process. Record order is a pure function of the file list (sorted), so every process sees
the same numbering.
"""
import glob as glob_lib
import json
import os
import struct
import tarfile

import numpy as np

from siglip_jax.data.preprocess import IMAGE_EXTS

ARRAY_RECORD_FORMAT = "siglip_jax.array_record.v1"


def expand(patterns):
  """'a/*.tar,b/{0..9}.tar'-style: comma-separated globs -> sorted unique paths."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  paths = set()
  for pattern in patterns:
    pattern = os.path.expanduser(pattern.strip())
    found = glob_lib.glob(pattern)
    if not found and os.path.exists(pattern):
      found = [pattern]
    paths.update(os.path.abspath(p) for p in found if os.path.isfile(p))
  return sorted(paths)


def split_member(name):
  """WebDataset's convention: the key is the path up to the first '.' of the file name."""
  head, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return (os.path.join(head, stem) if head else stem), ext.lower() if dot else ""


class _Files:
  """Per-process cache of read-only file descriptors (never pickled, never shared across a
  fork: a descriptor's offset is not used since reads go through pread)."""

  def __init__(self, paths):
    self.paths = list(paths)
    self._pid, self._fds = None, {}

  def __getstate__(self):
    return {"paths": self.paths}

  def __setstate__(self, state):
    self.__init__(state["paths"])

  def pread(self, file_id, offset, size):
    if self._pid != os.getpid():
      self._pid, self._fds = os.getpid(), {}
    fd = self._fds.get(file_id)
    if fd is None:
      fd = self._fds[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
      raise OSError(f"{self.paths[file_id]}: short read at {offset} ({len(data)} of {size} bytes)")
    return data


class WebDatasetSource:
  """Records of WebDataset tar shards; one record per key, in shard then member order."""

  # Columns of the index: shard, then (offset, size) of image, txt and json (-1: absent).
  _COLS = ("shard", "img_off", "img_size", "txt_off", "txt_size", "json_off", "json_size")

  def __init__(self, patterns):
    self.shards = expand(patterns)
    if not self.shards:
      raise FileNotFoundError(f"no WebDataset shards match {patterns!r}")
    rows = []
    for shard_id, path in enumerate(self.shards):
      rows.extend(self._index_shard(shard_id, path))
    self._index = np.array(rows, np.int64).reshape(-1, len(self._COLS))
    self._files = _Files(self.shards)

  @staticmethod
  def _index_shard(shard_id, path):
    """Reads only the tar headers (tarfile seeks over member data)."""
    members = {}   # key -> {ext: (offset, size)}, in order of first appearance
    try:
      with tarfile.open(path, mode="r:") as tar:
        for info in tar:
          if not info.isfile():
            continue
          key, ext = split_member(info.name)
          members.setdefault(key, {})[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
      # A damaged shard keeps the records indexed before the damage; say so, never crash.
      import logging
      logging.getLogger(__name__).warning("%s: tar index stops early (%s); %d keys kept",
                                          path, e, len(members))
    rows = []
    for parts in members.values():
      img = next((parts[e] for e in IMAGE_EXTS if e in parts), (-1, -1))
      rows.append((shard_id, *img, *parts.get("txt", (-1, -1)), *parts.get("json", (-1, -1))))
    return rows

  def __len__(self):
    return len(self._index)

  def key(self, i):
    return f"{os.path.basename(self.shards[self._index[i, 0]])}#{i}"

  def __getitem__(self, i):
    shard, img_off, img_size, txt_off, txt_size, _, _ = (int(v) for v in self._index[i])
    rec = {"key": self.key(i), "image": None, "texts": None}
    try:
      if img_off >= 0:
        rec["image"] = self._files.pread(shard, img_off, img_size)
      if txt_off >= 0:
        rec["texts"] = self._files.pread(shard, txt_off, txt_size)
    except OSError as e:
      rec["error"], rec["detail"] = "read_error", str(e)
    return rec


_IMAGE_FIELDS = ("image", "file", "file_name", "filename", "path")
_TEXT_FIELDS = ("captions", "texts", "caption", "text")


class FolderSource:
  """`dir/captions.jsonl`, one JSON object a line: {"image": "rel/path.jpg", "caption": "..."}
  (or "captions": [...]; "file"/"file_name" and "text"/"texts" also accepted)."""

  def __init__(self, directory, captions_file="captions.jsonl"):
    self.directory = os.path.abspath(os.path.expanduser(directory))
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
    except (ValueError, TypeError, AttributeError):
      rec["error"] = "bad_metadata"
      return rec
    if name is not None:
      rec["key"] = str(name)
      try:
        with open(os.path.join(self.directory, str(name)), "rb") as f:
          rec["image"] = f.read()
      except FileNotFoundError:
        rec["error"] = "missing_image"
      except OSError:
        rec["error"] = "read_error"
    return rec


# ------------------------------------------------------------------------ ArrayRecord (prepared)

def encode_record(rec):
  """A raw record -> bytes: 4-byte length, JSON header (key, texts), then the image bytes."""
  texts = rec.get("texts")
  from siglip_jax.data.preprocess import caption_list
  header = json.dumps({"key": rec.get("key", ""),
                       "texts": None if texts is None else caption_list(texts)}).encode()
  return struct.pack("<I", len(header)) + header + bytes(rec.get("image") or b"")


def decode_record(data):
  (n,) = struct.unpack_from("<I", data)
  header = json.loads(bytes(data[4:4 + n]))
  image = bytes(data[4 + n:])
  return {"key": header.get("key", ""), "texts": header.get("texts"), "image": image or None}


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
  """

  def __init__(self, name, *, split="train", data_dir=None, image_key="image",
               text_key="captions/text"):
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

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    ex = self._source[int(i)]
    return {"key": f"{self.name}[{i}]", "image": _get_path(ex, self.image_key),
            "texts": _get_path(ex, self.text_key)}


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

def _one(kind, spec):
  if kind == "webdataset":
    return WebDatasetSource(spec["shards"])
  if kind == "folder":
    d = spec["dir"]
    return ArrayRecordSource(d) if is_prepared(d) else FolderSource(d)
  if kind == "tfds":
    return TfdsSource(spec["tfds_name"], split=spec.get("split", "train"),
                      data_dir=spec.get("tfds_data_dir", "") or None,
                      image_key=spec.get("image_key", "image"),
                      text_key=spec.get("text_key", "captions/text"))
  raise ValueError(f"unknown data kind {kind!r}")


def from_config(config):
  """The training source of a config: `input.data` with its keys, or a mixture of
  `input.mixture` = ((kind, {keys}, weight), ...) when that is non-empty."""
  inp = config.input
  mixture = inp.get("mixture", ()) or ()
  if mixture:
    parts = [(_one(kind, dict(spec)), float(weight)) for kind, spec, weight in mixture]
    return Mixture([p for p, _ in parts], [w for _, w in parts], seed=config.seed)
  kind = inp.get("data", "webdataset")
  spec = {k: inp.get(k) for k in ("shards", "dir", "tfds_name", "split", "tfds_data_dir",
                                  "image_key", "text_key") if inp.get(k) is not None}
  if kind == "webdataset" and not spec.get("shards"):
    raise ValueError("config key `input.shards` is empty: give --config.input.shards=GLOB")
  if kind == "folder" and not spec.get("dir"):
    raise ValueError("config key `input.dir` is empty: give --config.input.dir=DIR")
  return _one(kind, spec)
