"""Workdir and checkpoint paths: a local folder or an object-store URL (`gs://`, `s3://`).

Every workdir and checkpoint path operation goes through here. Local paths behave as they
always did: made absolute (`os.path.abspath`) where they were, and read and written with the
plain file API. URLs are kept as they are (`gs://b/x` stays `gs://b/x`, never `/cwd/gs:/b/x`)
and go through `etils.epath.Path` (orbax takes the same paths), whose backend is TensorFlow's
`tf.io.gfile` where TensorFlow is installed (unless `EPATH_USE_TF=0`), else fsspec, which needs
`gcsfs` for `gs://` (`s3fs` for `s3://`). Orbax also needs `google-cloud-storage` on `gs://`
(it asks whether the bucket has a hierarchical namespace); the `[gcs]` extra has both. The
checkpoint arrays themselves go through TensorStore's own GCS driver.

Object stores cannot append to an object, so `AppendFile` (metrics.jsonl, TensorBoard event
files) keeps a remote file's whole content in memory and rewrites the object when it flushes,
at most every `REMOTE_FLUSH_SECONDS` (GCS allows about one write a second to one object) and
always on close. A crash loses at most that many seconds of rows; two processes appending to
the same remote file at once (an `evaluate` while the run still trains) would overwrite each
other's rows, since each rewrites the object from its own copy.
"""
import os
import shutil
import time

from etils import epath

REMOTE_FLUSH_SECONDS = 10.0


def is_remote(path) -> bool:
  """True for a URL such as `gs://bucket/dir`; False for a local path."""
  return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
  """An absolute local path, or the URL unchanged, as an `epath.Path`."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def join(base, *names) -> str:
  """`os.path.join` for a local path (not made absolute); the URL's child for a URL."""
  if is_remote(base):
    return os.fspath(epath.Path(os.fspath(base)).joinpath(*names))
  return os.path.join(base, *names)


def makedirs(path):
  """`os.makedirs(path, exist_ok=True)` for local paths and URLs alike."""
  if is_remote(path):
    epath.Path(os.fspath(path)).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(os.fspath(path)).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return epath.Path(os.fspath(path)).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  if is_remote(path):
    p = epath.Path(os.fspath(path))
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def read_bytes(path) -> bytes:
  if is_remote(path):
    return epath.Path(os.fspath(path)).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def listdir(path) -> list[str]:
  """The names in a folder (a URL: the names under that prefix)."""
  if is_remote(path):
    return [p.name for p in epath.Path(os.fspath(path)).iterdir()]
  return os.listdir(path)


def move(src, dst):
  """`shutil.move` locally; a URL folder is renamed object by object by the store's client."""
  if is_remote(src) or is_remote(dst):
    epath.Path(os.fspath(src)).rename(os.fspath(dst))
  else:
    shutil.move(src, dst)


def upload_tree(local_dir, dst):
  """Copies the files under a local folder to `dst` (a URL or a local path), keeping the tree."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dst if rel == "." else join(dst, *rel.split(os.sep))
    makedirs(target)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        data = f.read()
      if is_remote(target):
        epath.Path(join(target, name)).write_bytes(data)
      else:
        with open(os.path.join(target, name), "wb") as f:
          f.write(data)


class AppendFile:
  """A binary file opened for appending: `open(path, "ab")` for a local path; for a URL, the
  content in memory, the object rewritten on flush (see the module docstring)."""

  def __init__(self, path, flush_seconds=REMOTE_FLUSH_SECONDS):
    self.path = os.fspath(path)
    self._remote = is_remote(self.path)
    if self._remote:
      self._obj = epath.Path(self.path)
      # A resumed run or a later evaluation adds to what is already there.
      exists = self._obj.exists()
      self._data = bytearray(self._obj.read_bytes() if exists else b"")
      self._dirty, self._last_upload = not exists, -float("inf")
      self._flush_seconds = flush_seconds
      self._file = None
      self.flush()   # the object exists from the start, as a local file would
    else:
      self._file = open(self.path, "ab")
    self.closed = False

  def write(self, data: bytes):
    if self._remote:
      self._data += data
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self, force=False):
    if not self._remote:
      self._file.flush()
    elif self._dirty and (force or time.monotonic() - self._last_upload >= self._flush_seconds):
      self._obj.write_bytes(bytes(self._data))
      self._dirty, self._last_upload = False, time.monotonic()

  def close(self):
    if self.closed:
      return
    self.closed = True
    if self._remote:
      self.flush(force=True)
    else:
      self._file.close()
