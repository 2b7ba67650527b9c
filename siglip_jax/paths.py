"""What etils.epath does not do for workdir and checkpoint paths (local folders or URLs such as
`gs://`, `s3://`); everything else is `epath.Path(path).exists()`, `.mkdir()`, `.iterdir()`...

- `resolve`: local paths made absolute (`os.path.abspath`), URLs kept as they are (`gs://b/x`
  stays `gs://b/x`, never `/cwd/gs:/b/x`), an unknown URL scheme named in one error.
- `join`: a local path stays as given (not made absolute); a URL gets its child.
- `AppendFile`: object stores cannot append to an object, so for a URL (metrics.jsonl,
  TensorBoard event files) the content is kept in memory and the object rewritten when it
  flushes, at most every `REMOTE_FLUSH_SECONDS` (GCS allows about one write a second to one
  object) and always on close. A crash loses at most that many seconds of rows; two processes
  appending to the same remote file at once would overwrite each other's rows.
- `upload_tree`, `check_workdir`, `check_writable`.

epath's backend for URLs is TensorFlow's `tf.io.gfile` where TensorFlow is installed (unless
`EPATH_USE_TF=0`), else fsspec, which needs `gcsfs` for `gs://`; orbax also needs
`google-cloud-storage` on `gs://` (the `[gcs]` extra has both). Checkpoint arrays go through
TensorStore's own GCS driver.
"""
import os
import time

from etils import epath

from siglip_jax import errors

REMOTE_FLUSH_SECONDS = 10.0


class PathError(errors.UserError, ValueError):
  """A path that cannot serve its purpose (an unknown URL scheme, a file as a workdir)."""


def is_remote(path) -> bool:
  """True for a URL such as `gs://bucket/dir`; False for a local path."""
  return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
  """An absolute local path, or the URL unchanged, as an `epath.Path`."""
  path = os.fspath(path)
  if not is_remote(path):
    return epath.Path(os.path.abspath(path))
  try:
    return epath.Path(path)
  except KeyError:   # epath's table of URL schemes has no entry for it
    scheme = path.split("://", 1)[0]
    raise PathError(f"{path}: unknown URL scheme {scheme}:// (use a local path, gs://, s3:// "
                    "or another scheme etils.epath knows)") from None


def check_workdir(workdir):
  """Raises PathError unless `workdir` can be a training workdir: a folder (or a URL of a known
  scheme), not a file. Run before anything is built, so the mistake costs a second."""
  resolve(workdir)
  if not is_remote(workdir) and os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise PathError(f"workdir {workdir} is a file, not a folder")


def check_writable(folder):
  """Raises PathError naming `folder` unless a file can be created in it (local folders; a
  bucket's permissions show at the first write)."""
  if is_remote(folder):
    return
  probe = os.path.join(folder, f".siglip_jax_write_probe.{os.getpid()}")
  try:
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    raise PathError(f"workdir {folder} is not writable ({e.strerror.lower()})") from None


def join(base, *names) -> str:
  """`os.path.join` for a local path (not made absolute); the URL's child for a URL."""
  if is_remote(base):
    return os.fspath(epath.Path(os.fspath(base)).joinpath(*names))
  return os.path.join(base, *names)


def upload_tree(local_dir, dst):
  """Copies the files under a local folder to `dst` (a URL or a local path), keeping the tree
  (etils.epath copies one file at a time)."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = epath.Path(dst if rel == "." else join(dst, *rel.split(os.sep)))
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      epath.Path(os.path.join(root, name)).copy(target / name, overwrite=True)


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
