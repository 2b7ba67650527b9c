"""WebDataset tar shards (img2dataset's layout) as a random-access source, safe on hostile tars.

Members `key.jpg|jpeg|png|webp` + `key.txt`, optional `key.json`. An index of each member's
byte offset is built from the tar headers once (tarfile parses them; nothing is extracted),
then a record's members are read directly (`os.pread`, or seek + read for a URL).

A shard is untrusted input. Its index:
- checks every member against the file's real size, and reads headers through a reader that
  refuses any read past the end or above `_MAX_HEADER_BYTES` (a pax or GNU long-name header may
  claim a terabyte, which tarfile would try to allocate);
- never pairs one sample's image with another's caption: a key seen with the same member twice
  (two images, two captions, ...) is ambiguous, and all its records are dropped (see `_rows`);
- notices a shard that ends early (mid-header, mid-member, or without the end-of-archive
  blocks), which tarfile treats as a normal end;
- keeps a row for each key it drops, with the reason, so that `check` counts it in `records`
  and `skipped`, and training counts it in `data/skipped` whenever it is met (as any bad
  record); and warns once per shard.
Reading is bounded as well: an image member above `max_image_bytes` or a caption above
`MAX_CAPTION_BYTES` is reported (`image_too_large`, `caption_too_large`), never read.
"""
import collections
import logging
import os
import tarfile
import threading

import numpy as np

from siglip_jax import paths
from siglip_jax.data import shard_patterns
from siglip_jax.data.preprocess import IMAGE_EXTS

_log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 64 << 20     # default of input.max_image_bytes
MAX_CAPTION_BYTES = 1 << 20    # a caption is a sentence or a paragraph, never a megabyte
_MAX_HEADER_BYTES = 1 << 20    # pax / GNU long-name data of one header
_BLOCK = tarfile.BLOCKSIZE
# Reasons of the rows that stand for keys dropped at index time (all in preprocess.REASONS).
INDEX_REASONS = ("duplicate_key", "member_out_of_bounds", "truncated_shard", "read_error")
# Shards kept open per process: fewer than `ulimit -n` (1,024 here and there, img2dataset
# writes 1,243 shards for CC12M); a URL's file object holds a read-ahead buffer: fewer still.
_MAX_OPEN_SHARDS, _MAX_OPEN_URLS = 128, 16


def split_member(name):
  """WebDataset's convention: the key is the path up to the first '.' of the file name."""
  head, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return (os.path.join(head, stem) if head else stem), ext.lower() if dot else ""


class _OutOfBounds(Exception):
  pass


class _BoundedReader:
  """The file object tarfile parses headers through. Header blocks (<= 512 bytes) pass; a
  larger read (extended header data) must fit in the file and under _MAX_HEADER_BYTES."""

  def __init__(self, f, size):
    self._f, self.size = f, size

  def read(self, n=-1):
    if n is None or n < 0 or n > _BLOCK:
      pos = self._f.tell()
      if n is None or n < 0 or pos + n > self.size:
        raise _OutOfBounds(f"a header at byte {pos} claims {n} bytes; the file holds "
                           f"{self.size - pos} more")
      if n > _MAX_HEADER_BYTES:
        raise tarfile.HeaderError(f"a header at byte {pos} claims {n} bytes of metadata")
    return self._f.read(n)

  def seek(self, offset, whence=os.SEEK_SET):
    return self._f.seek(offset, whence)

  def tell(self):
    return self._f.tell()


def _open(path):
  """(binary file object, size in bytes) for a local path or a URL."""
  if paths.is_remote(path):
    f = paths.resolve(path).open("rb")
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    return f, size
  f = open(path, "rb")   # pylint: disable=consider-using-with
  return f, os.fstat(f.fileno()).st_size


def scan_members(f, size):
  """The regular-file members of a tar -> ([(name, data offset, data size)], stop), where stop
  is None for a clean end, else (reason, detail, name of the member it concerns or None)."""
  members, tar = [], None
  try:
    tar = tarfile.TarFile(fileobj=_BoundedReader(f, size), mode="r")
    while True:
      info = tar.next()
      if info is None:
        break
      tar.members.clear()   # tarfile keeps every TarInfo; one at a time is all we need
      if not info.isfile():
        continue
      if info.offset_data + info.size > size:
        return members, ("member_out_of_bounds", f"{info.name} claims {info.size} bytes at "
                         f"byte {info.offset_data}; the file holds {size}", info.name)
      members.append((info.name, info.offset_data, info.size))
  except _OutOfBounds as e:
    return members, ("member_out_of_bounds", str(e), None)
  except OSError as e:
    return members, ("read_error", f"{type(e).__name__}: {e}", None)
  except Exception as e:  # pylint: disable=broad-except
    # tarfile.ReadError/HeaderError and whatever a damaged header trips on: this shard's index
    # ends here; the run goes on.
    return members, ("truncated_shard", f"unreadable header ({type(e).__name__}: {e})", None)
  # tarfile ends quietly at the end of the file or at a bad header; only a zero block (the
  # end-of-archive marker) is a real end.
  end = tar.offset
  if end + _BLOCK <= size:
    f.seek(end)
    if f.read(_BLOCK) == bytes(_BLOCK):
      return members, None
    return members, ("truncated_shard", f"unreadable header at byte {end}", None)
  where = "without the end-of-archive blocks" if end >= size else "inside a header"
  return members, ("truncated_shard", f"the file ends {where} (cut short?)", None)


def _slot(ext):
  return "image" if ext in IMAGE_EXTS else ext


def _rows(shard_id, members, stop):
  """Index rows (see WebDatasetSource._COLS) of one shard, and {reason: n} of dropped keys.

  Counting (what `check` reports, exactly):
  - `duplicate_key`: a key with any member slot twice (two images, whatever their extensions,
    two captions, two json, ...) stands for as many records as its most repeated slot, and all
    of them are dropped, one `duplicate_key` each (`K.jpg K.txt ... K.jpg K.txt`: 2;
    `K.jpg K.txt K.txt`: 2). Its members are never paired.
  - a shard whose index stops early gives exactly one drop, under the stop's reason
    (`member_out_of_bounds`, `truncated_shard`, `read_error`): the key it cut (the key owning
    the out-of-bounds member, or a last key left without its image or caption) becomes that
    record; when the cut fell between complete keys, an extra record stands for the unseen rest.
  """
  keys = collections.OrderedDict()   # key -> {slot: [(offset, size), ...]}
  for name, offset, size in members:
    key, ext = split_member(name)
    keys.setdefault(key, {}).setdefault(_slot(ext), []).append((offset, size))
  stop_key = None
  if stop is not None:
    name = stop[2]
    if name is not None:   # an out-of-bounds member: its key is cut
      stop_key = split_member(name)[0]
      keys.setdefault(stop_key, {})
    elif keys:
      last = next(reversed(keys))
      slots = keys[last]
      if max(len(v) for v in slots.values()) == 1 and not ("image" in slots and "txt" in slots):
        stop_key = last
  status = {r: 1 + i for i, r in enumerate(INDEX_REASONS)}
  rows, dropped = [], collections.Counter()
  for key, slots in keys.items():
    if key == stop_key:
      rows.append((shard_id, -1, -1, -1, -1, -1, -1, status[stop[0]]))
      dropped[stop[0]] += 1
      continue
    repeats = max(len(v) for v in slots.values())
    if repeats > 1:
      rows.extend([(shard_id, -1, -1, -1, -1, -1, -1, status["duplicate_key"])] * repeats)
      dropped["duplicate_key"] += repeats
      continue
    first = {slot: places[0] for slot, places in slots.items()}
    none = (-1, -1)
    rows.append((shard_id, *first.get("image", none), *first.get("txt", none),
                 *first.get("json", none), 0))
  if stop is not None and stop_key is None:
    rows.append((shard_id, -1, -1, -1, -1, -1, -1, status[stop[0]]))
    dropped[stop[0]] += 1
  return rows, dict(dropped)


def index_shard(shard_id, path):
  """(rows, {reason: n}) of one shard; warns once if it drops anything."""
  stop = None
  try:
    f, size = _open(path)
  except OSError as e:
    members, stop = [], ("read_error", f"cannot open: {e}", None)
  else:
    with f:
      members, stop = scan_members(f, size)
  rows, dropped = _rows(shard_id, members, stop)
  if dropped:
    counts = ", ".join(f"{n} {r}" for r, n in sorted(dropped.items()))
    _log.warning("%s: %d record(s) dropped and counted as skipped (%s)%s", path,
                 sum(dropped.values()), counts, f"; {stop[1]}" if stop else "")
  return rows, dropped


class _Shard:
  """One open shard: pread on a local descriptor (thread-safe), seek + read under a lock for
  a URL's file object."""

  def __init__(self, path):
    self.path, self.users = path, 0
    if paths.is_remote(path):
      self._f, self._fd = paths.resolve(path).open("rb"), None
      self._lock = threading.Lock()
    else:
      self._f, self._fd = None, os.open(path, os.O_RDONLY)

  def read(self, offset, size):
    if self._fd is not None:
      data = os.pread(self._fd, size, offset)
    else:
      with self._lock:
        self._f.seek(offset)
        data = self._f.read(size)
    if len(data) != size:
      raise OSError(f"{self.path}: short read at {offset} ({len(data)} of {size} bytes)")
    return data

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
    else:
      self._f.close()


class _ShardFiles:
  """Per-process cache of open shards, a bounded number (least recently used closed first,
  never while a thread reads it). Never pickled or shared across a fork."""

  def __init__(self, shard_paths):
    self.paths = list(shard_paths)
    self._pid, self._open, self._lock = None, collections.OrderedDict(), threading.Lock()
    self._max_open = (_MAX_OPEN_URLS if any(paths.is_remote(p) for p in self.paths)
                      else _MAX_OPEN_SHARDS)

  def __getstate__(self):
    return {"paths": self.paths}

  def __setstate__(self, state):
    self.__init__(state["paths"])

  def _acquire(self, shard_id):
    with self._lock:
      if self._pid != os.getpid():   # a forked child: the parent's handles are not ours
        self._pid, self._open = os.getpid(), collections.OrderedDict()
      shard = self._open.get(shard_id)
      if shard is None:
        shard = self._open[shard_id] = _Shard(self.paths[shard_id])
      self._open.move_to_end(shard_id)
      shard.users += 1
      idle = [k for k, s in self._open.items() if s.users == 0]
      for k in idle[:max(0, len(self._open) - self._max_open)]:
        self._open.pop(k).close()
      return shard

  def read(self, shard_id, offset, size):
    shard = self._acquire(shard_id)
    try:
      return shard.read(offset, size)
    finally:
      with self._lock:
        shard.users -= 1


class WebDatasetSource:
  """Records of WebDataset tar shards; one record per key, in shard then member order (plus
  one record for each key dropped at index time, which reads as its reason)."""

  # Columns of the index: shard, (offset, size) of image, txt and json (-1: absent), and the
  # status: 0, or 1 + the INDEX_REASONS position of the reason the key was dropped.
  _COLS = ("shard", "img_off", "img_size", "txt_off", "txt_size", "json_off", "json_size",
           "status")

  def __init__(self, patterns, max_image_bytes=MAX_IMAGE_BYTES):
    self.shards = shard_patterns.expand(patterns)
    self.max_image_bytes = int(max_image_bytes)
    rows, self.dropped = [], collections.Counter()
    for shard_id, path in enumerate(self.shards):
      shard_rows, dropped = index_shard(shard_id, path)
      rows.extend(shard_rows)
      self.dropped.update(dropped)
    self._index = np.array(rows, np.int64).reshape(-1, len(self._COLS))
    self._files = _ShardFiles(self.shards)

  def __len__(self):
    return len(self._index)

  def key(self, i):
    return f"{os.path.basename(self.shards[self._index[i, 0]])}#{i}"

  def __getitem__(self, i):
    shard, img_off, img_size, txt_off, txt_size, json_off, json_size, status = (
        int(v) for v in self._index[i])
    rec = {"key": self.key(i), "image": None, "texts": None}
    if status:
      rec["error"] = INDEX_REASONS[status - 1]
      return rec
    if img_size > self.max_image_bytes:
      rec["error"], rec["detail"] = "image_too_large", f"{img_size} bytes"
      return rec
    if txt_size > MAX_CAPTION_BYTES:
      rec["error"], rec["detail"] = "caption_too_large", f"{txt_size} bytes"
      return rec
    try:
      if img_off >= 0:
        rec["image"] = self._files.read(shard, img_off, img_size)
      if txt_off >= 0:
        rec["texts"] = self._files.read(shard, txt_off, txt_size)
      # key.json carries regions (data/regions.py); one too big to be metadata is not read.
      if 0 <= json_off and json_size <= MAX_CAPTION_BYTES:
        rec["json"] = self._files.read(shard, json_off, json_size)
    except OSError as e:
      rec["error"], rec["detail"] = "read_error", str(e)
    return rec
