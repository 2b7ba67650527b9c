"""A `gs://` workdir without a network: etils.epath's real gs:// code path (its fsspec backend)
over an in-memory fake bucket that, like GCS, cannot append to an object."""
import io
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from ml_collections import ConfigDict

from siglip_jax import checkpoint, inference, metrics, paths, perf, tensorboard

URL = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
  """fsspec's memory filesystem under the gs:// protocol; appending fails, as on GCS."""
  protocol = ("gs", "gcs")
  store, pseudo_dirs = {}, [""]

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise OSError("an object store cannot append")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
  # etils would take TensorFlow's gfile (real GCS) where TensorFlow is installed: use fsspec.
  monkeypatch.setenv("EPATH_USE_TF", "false")
  # Once TensorFlow is imported (the TFDS tests do), other code paths still pick gfile: pin it.
  from etils.epath import gpath
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  fake, real = FakeGCS(skip_instance_cache=True), epath_backend.fsspec_backend.fs
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs",
                      lambda p: fake if os.fspath(p).startswith("gs://") else real(p))
  # Orbax asks the GCS API (google-cloud-storage) whether a bucket is hierarchical.
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  return fake


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  assert os.fspath(paths.resolve(URL)) == URL
  assert paths.join(URL, "checkpoints", "3") == URL + "/checkpoints/3"
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("rel")) == os.path.join(str(tmp_path), "rel")
  assert paths.join("rel", "metrics.jsonl") == os.path.join("rel", "metrics.jsonl")
  assert not paths.is_remote("rel") and paths.is_remote(URL)


def test_checkpointer_keeps_the_url(gcs):
  ckpt = checkpoint.Checkpointer(URL, ConfigDict(dict(every_steps=2, keep=1)))
  try:
    assert ckpt.directory == URL + "/checkpoints"   # not /cwd/gs:/bucket/run/checkpoints
    assert ckpt.latest_step() is None
    assert gcs.isdir(URL + "/checkpoints")
  finally:
    ckpt.close()


def test_committed_steps_and_set_aside_on_a_bucket(gcs):
  # On GCS orbax writes <step>/ in place and commits it with commit_success.txt.
  for step in (2, 4):
    gcs.pipe(f"{URL}/checkpoints/{step}/state/data", b"x")
    gcs.pipe(f"{URL}/checkpoints/{step}/commit_success.txt", b"")
  gcs.pipe(f"{URL}/checkpoints/6/state/data", b"half written")
  assert checkpoint.committed_steps(URL + "/checkpoints") == [2, 4]
  ckpt = checkpoint.Checkpointer(URL, ConfigDict(dict(every_steps=2, keep=3)))
  try:
    ckpt._set_aside([(4, ValueError("unreadable"))], used_step=2)
    assert gcs.cat(f"{URL}/checkpoints/4/DAMAGED") == b"unreadable\n"   # marked, not copied
    assert gcs.cat(f"{URL}/checkpoints/4/state/data") == b"x"
    assert ckpt.latest_step() == 2
  finally:
    ckpt.close()


def test_readers_name_the_url(gcs):
  with pytest.raises(FileNotFoundError, match=f"no siglip_jax checkpoint at {URL}"):
    checkpoint.read_config(URL)
  with pytest.raises(FileNotFoundError, match="gs://bucket/nothing"):
    inference.read_source("gs://bucket/nothing")


def test_big_vision_npz_from_a_bucket(gcs):
  from siglip_jax.interop import big_vision
  buf = io.BytesIO()
  np.savez(buf, **{"params/img/head/bias": np.arange(3, dtype=np.float32)})
  gcs.pipe("gs://bucket/w.npz", buf.getvalue())
  out = big_vision.read_npz("gs://bucket/w.npz")
  np.testing.assert_array_equal(out["img/head/bias"], [0, 1, 2])


def test_append_file_rewrites_the_object(gcs):
  gcs.pipe(URL + "/log", b"old\n")   # a resumed run keeps what is there
  f = paths.AppendFile(URL + "/log", flush_seconds=3600)
  f.write(b"a\n")
  f.flush()   # the first upload goes at once
  assert gcs.cat(URL + "/log") == b"old\na\n"
  f.write(b"b\n")
  f.flush()   # within flush_seconds of the last upload: kept in memory
  assert gcs.cat(URL + "/log") == b"old\na\n"
  f.write(b"c\n")
  f.close()   # always uploads
  assert gcs.cat(URL + "/log") == b"old\na\nb\nc\n"
  g = paths.AppendFile(URL + "/log", flush_seconds=0)
  g.write(b"d\n")
  g.flush()
  assert gcs.cat(URL + "/log") == b"old\na\nb\nc\nd\n"
  g.close()


def test_metrics_jsonl_and_events_on_a_bucket(gcs):
  epath.Path(URL).mkdir(parents=True, exist_ok=True)
  writer = metrics.make_writers(URL, is_main=True)
  assert [type(w).__name__ for w in writer.writers] == ["JsonlWriter", "TensorBoardWriter"]
  writer.write(2, {"train/loss": 1.5})
  writer.write(4, {"train/loss": np.float32(1.25), "x": float("nan")})
  writer.close()
  rows = [json.loads(line) for line in gcs.cat(URL + "/metrics.jsonl").decode().splitlines()]
  assert rows == [{"step": 2, "train/loss": 1.5}, {"step": 4, "train/loss": 1.25, "x": "nan"}]
  (event_file,) = tensorboard.event_files(URL)
  assert event_file.startswith(URL + "/events.out.tfevents.")
  assert tensorboard.read_scalars(URL) == {"train/loss": [(2, 1.5), (4, 1.25)]}
  # A later evaluation appends to the same metrics.jsonl.
  again = metrics.JsonlWriter(URL)
  again.write(4, {"eval/acc": 0.5})
  again.close()
  assert gcs.cat(URL + "/metrics.jsonl").decode().splitlines()[-1] == '{"step": 4, "eval/acc": 0.5}'


def test_profile_trace_is_copied_to_the_bucket(gcs, monkeypatch):
  calls = []

  def start_trace(logdir, **kwargs):   # stands in for jax.profiler, which writes local files
    calls.append(logdir)
    os.makedirs(os.path.join(logdir, "plugins", "profile", "run1"))
    with open(os.path.join(logdir, "plugins", "profile", "run1", "h.xplane.pb"), "wb") as f:
      f.write(b"trace")

  monkeypatch.setattr(perf.jax.profiler, "start_trace", start_trace)
  monkeypatch.setattr(perf.jax.profiler, "stop_trace", lambda: None)
  prof = perf.StepProfiler("1,1", URL)
  prof.before_step(1)
  prof.after_step(1, np.zeros(()))
  assert not paths.is_remote(calls[0]) and not os.path.exists(calls[0])   # local, cleaned up
  assert gcs.cat(URL + "/profile/plugins/profile/run1/h.xplane.pb") == b"trace"
  assert epath.Path(URL + "/profile").is_dir()
