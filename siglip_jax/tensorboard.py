"""TensorBoard event files beside metrics.jsonl, written by tensorboardX (no TensorFlow needed).

The GPU machines have JAX but no TensorFlow; tensorboardX writes TensorBoard's own format with
protobuf alone. Only finite numeric scalars are written (arrays, strings and NaN have no
`simple_value` home; metrics.jsonl keeps them all).

A URL workdir (`gs://bucket/run`): tensorboardX writes into a local folder, and the event file
is mirrored to the URL through `paths.AppendFile` (object stores cannot append: the object is
rewritten at most every `paths.REMOTE_FLUSH_SECONDS`, and on close). That serves any scheme
etils.epath knows, where tensorboardX's own bucket writers need each store's client.

`read_scalars` reads a folder's events back through TensorBoard's own reader (the `tensorboard`
package, in the [test] and [data] extras): what TensorBoard shows is what tests check.
"""
import math
import os
import shutil
import tempfile
import uuid

import numpy as np

from etils import epath

from siglip_jax import paths


def _scalars(metrics):
  out = {}
  for tag, value in metrics.items():
    try:
      arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - whatever cannot become an array is not a scalar
      continue
    if arr.size == 1 and arr.dtype.kind in "biuf":
      v = float(arr.reshape(()))
      if math.isfinite(v):
        out[str(tag)] = v
  return out


def _import_tensorboardx():
  """tensorboardX, imported without torch: its writer imports torch (when installed) only to
  accept torch tensors, which are never passed here, and that costs 1-2 s per process start."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None   # makes `import torch` raise ImportError, for this import only
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


class TensorBoardWriter:
  """`write(step, {tag: value})`, flushed per write; `close()`."""

  def __init__(self, logdir):
    tensorboardX = _import_tensorboardx()
    self._url = logdir if paths.is_remote(logdir) else None
    self._local = tempfile.mkdtemp(prefix="siglip_jax_tb_") if self._url else logdir
    # Names carry the second the file was opened: a random suffix keeps two writers opened in
    # one second (train, then evaluate) from writing into one file.
    self._w = tensorboardX.SummaryWriter(self._local,
                                         filename_suffix=f".{uuid.uuid4().hex[:12]}.siglip_jax")
    self._mirror, self._mirrored = None, 0
    self._sync()

  def _sync(self):
    """Appends what tensorboardX wrote since the last call to the URL's copy (the local
    folder is this writer's own, so its one event file is the one)."""
    if self._url is None:
      return
    (name,) = [f for f in os.listdir(self._local) if ".tfevents." in f]
    if self._mirror is None:
      self._mirror = paths.AppendFile(paths.join(self._url, name))
    with open(os.path.join(self._local, name), "rb") as f:
      f.seek(self._mirrored)
      new = f.read()
    self._mirrored += len(new)
    self._mirror.write(new)
    self._mirror.flush()

  def write(self, step, metrics):
    scalars = _scalars(metrics)
    if not scalars:
      return
    for tag, value in scalars.items():
      self._w.add_scalar(tag, value, int(step))
    self._w.flush()
    self._sync()

  def close(self):
    if self._w is None:
      return
    self._w.close()
    self._sync()
    if self._mirror is not None:
      self._mirror.close()
      shutil.rmtree(self._local, ignore_errors=True)
    self._w = None


def make_writer(workdir):
  return TensorBoardWriter(workdir)


def event_files(logdir):
  return sorted(paths.join(logdir, p.name) for p in epath.Path(logdir).iterdir()
                if ".tfevents." in p.name)


def read_scalars(logdir):
  """{tag: [(step, value), ...]} from every event file directly in `logdir` (local or URL),
  read by TensorBoard's EventAccumulator."""
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for path in event_files(logdir):
      local = os.path.join(tmp, os.path.basename(path))
      with open(local, "wb") as f:
        f.write(epath.Path(path).read_bytes())
      acc = event_accumulator.EventAccumulator(local, size_guidance={"scalars": 0})
      acc.Reload()
      for tag in acc.Tags()["scalars"]:
        out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
  return out
