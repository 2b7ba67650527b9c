"""Damaged checkpoints: every reader (training resume, evaluate, convert, load) falls back to the
previous step with a warning naming the damaged one, readers write nothing (on a read-only copy
too), and a flipped bit that still decodes to finite values is caught by the fingerprints.

One tiny trained run (conftest's `tiny_run`: checkpoints 3 and 6, saved on 2 devices) is copied
per case and its step 6 damaged in one of three ways, at the bytes that hold a parameter.
"""
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorstore as ts

import siglip_jax
from conftest import REPO, TINY_DEMO, cli_env, read_only
from test_remote_workdir import URL, gcs  # noqa: F401 (gcs: the fake bucket fixture)
from siglip_jax import checkpoint, checkpoint_read, convert, evaluate, inference, mesh as mesh_lib
from siglip_jax import trainer
from siglip_jax.interop import big_vision


# ------------------------------------------------------------------ damage, at a param's bytes

def _largest_params_chunk(step_dir):
  """-> (data file, offset, length) of the largest params chunk of a step, as stored: its bytes
  read through the step's OCDBT key-value store (tensorstore) and found in the data files."""
  state = os.path.join(step_dir, "state") + "/"
  kv = ts.KvStore.open({"driver": "ocdbt", "base": "file://" + state}).result()
  chunks = [kv.read(k).result().value for k in kv.list().result()
            if k.startswith(b"params.") and not k.endswith(b".zarray")]
  value = max(chunks, key=len)
  for path in glob.glob(os.path.join(state, "**", "d", "*"), recursive=True):
    with open(path, "rb") as f:
      at = f.read().find(value)
    if at >= 0:
      return path, at, len(value)
  raise AssertionError(f"no data file under {state} holds the chunk")


def flip_a_bit(step_dir):
  path, at, length = _largest_params_chunk(step_dir)
  with open(path, "r+b") as f:
    f.seek(at + length // 2)
    byte = f.read(1)[0]
    f.seek(at + length // 2)
    f.write(bytes([byte ^ 0x10]))


def truncate_array_file(step_dir):
  path, at, length = _largest_params_chunk(step_dir)
  os.truncate(path, at + length // 2)


def remove_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


DAMAGE = {"flipped": flip_a_bit, "truncated": truncate_array_file, "no_metadata": remove_metadata}


def _damaged_copy(tiny_run, dst, kind):
  """The run's checkpoints/ (3 and 6) copied to `dst`, step 6 damaged."""
  shutil.copytree(os.path.join(tiny_run["workdir"], "checkpoints"), os.path.join(dst, "checkpoints"))
  DAMAGE[kind](os.path.join(dst, "checkpoints", "6"))
  return str(dst)


def _snapshot(path):
  """Every file (with a hash of its bytes) and folder under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = "dir"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _damage_warnings(records, step=6):
  """The warnings naming step `step` as damaged; readers warn once a process per damaged step,
  so this also forgets which they warned about."""
  checkpoint_read._warned_damaged.clear()
  return [r.getMessage() for r in records
          if f"checkpoint step {step} " in r.getMessage() and "damaged" in r.getMessage()]


@pytest.fixture(scope="module")
def step3(tiny_run):
  """The previous step's params and config, read from the undamaged run."""
  return checkpoint_read.read(os.path.join(tiny_run["workdir"], "checkpoints", "3"))


# ------------------------------------------------------------------ tests

def test_flipped_bit_decodes_to_finite_values_and_is_caught(tiny_run, tmp_path, caplog):
  work = _damaged_copy(tiny_run, tmp_path / "run", "flipped")
  # What orbax and tensorstore hand back: the damaged array decodes, silently, finite.
  name = "params.txt.Embed_0.embedding"   # the largest params array of the tiny demo
  spec = lambda run: {"driver": "zarr", "kvstore": {"driver": "ocdbt", "path": name + "/",
                      "base": "file://" + os.path.join(run, "checkpoints", "6", "state") + "/"}}
  good = ts.open(spec(tiny_run["workdir"]), open=True).result().read().result()
  bad = ts.open(spec(work), open=True).result().read().result()
  assert not np.array_equal(good, bad) and np.isfinite(bad).all()
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoint_read.read(work)
  assert ckpt.step == 3
  (warning,) = _damage_warnings(caplog.records)
  assert "txt/Embed_0/embedding" in warning and "not what was saved" in warning
  with pytest.raises(checkpoint.DamagedCheckpointError, match="checkpoints/6 is damaged"):
    evaluate.read_checkpoint(work, step=6)   # a step asked for by name: no fallback


def _flat(tree):
  return {mesh_lib.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_reader_falls_back_and_readers_write_nothing(kind, tiny_run, step3, tmp_path,
                                                           caplog):
  work = _damaged_copy(tiny_run, tmp_path / "run", kind)
  want = big_vision.unscan(step3.params)
  caplog.set_level(logging.WARNING)
  with read_only(work) as really:
    before = _snapshot(work)
    handle = siglip_jax.load(work)
    assert _damage_warnings(caplog.records)
    got = _flat(handle.params)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    caplog.clear()
    convert.convert(work, "hf", tmp_path / "hf")
    assert _damage_warnings(caplog.records)
    exported = inference.read_source(str(tmp_path / "hf")).params
    np.testing.assert_allclose(exported["b"], want["b"])
    np.testing.assert_allclose(exported["txt/Embed_0/embedding"], want["txt/Embed_0/embedding"])
    caplog.clear()
    assert evaluate.read_checkpoint(work).step == 3
    assert _damage_warnings(caplog.records)
    assert _snapshot(work) == before, f"a reader wrote (really read-only: {really})"
  # Training resumes from step 3 (onto this process's 8 devices; saved on 2) and moves 6 aside.
  caplog.clear()
  config = ml_collections.ConfigDict(step3.config)
  parts = trainer.build(config)
  ckpt = checkpoint.Checkpointer(work, config.checkpoint, config=config)
  try:
    state, data_state = trainer.initial_state(config, parts, ckpt)
  finally:
    ckpt.close()
  assert int(state.step) == 3 and data_state["data_position"] == 3
  params = _flat(state.params)
  assert all(np.array_equal(params[k], step3.params[k]) for k in step3.params)
  (warning,) = _damage_warnings(caplog.records)
  assert "moved it to" in warning
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["3"]
  assert os.path.isdir(os.path.join(work, "checkpoints.damaged", "6"))


def _start(module, args):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"rc {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if "checkpoint step 6 " in line]
  assert len(lines) == 1 and "damaged" in lines[0], err[-3000:]   # one line says it
  return out, lines[0]


def test_cli_readers_fall_back(tiny_run, tmp_path):
  """Each entry point as a user runs it, one kind of damage each, started together."""
  train_dir = _damaged_copy(tiny_run, tmp_path / "train", "no_metadata")
  eval_dir = _damaged_copy(tiny_run, tmp_path / "eval", "flipped")
  convert_dir = _damaged_copy(tiny_run, tmp_path / "convert", "truncated")
  with read_only(eval_dir) as eval_ro, read_only(convert_dir) as convert_ro:
    before = {d: _snapshot(d) for d in (eval_dir, convert_dir)}
    procs = [
        # total_steps=3: a resume with nothing left to train, so nothing compiles.
        _start("siglip_jax.train", [*TINY_DEMO, f"--workdir={train_dir}",
                                    "--config.total_steps=3"]),
        _start("siglip_jax.evaluate", [f"--workdir={eval_dir}"]),
        _start("siglip_jax.convert", [f"--src={convert_dir}", "--to=hf",
                                      f"--out={tmp_path / 'hf'}"])]
    (train_out, train_warning), (eval_out, _), (convert_out, _) = [_finish(p) for p in procs]
    after = {d: _snapshot(d) for d in (eval_dir, convert_dir)}
  assert "resuming at step 3" in train_out and "moved it to" in train_warning
  assert os.listdir(os.path.join(train_dir, "checkpoints")) == ["3"]
  assert eval_out.strip().splitlines()[-1].startswith('{"step": 3,')
  assert convert_out.startswith("wrote ")
  for d, really in ((eval_dir, eval_ro), (convert_dir, convert_ro)):
    if really:
      assert after[d] == before[d]
    else:   # root without a read-only mount: evaluate may append metrics.jsonl
      assert {k: v for k, v in after[d].items() if k.startswith("checkpoints")} == before[d]


# ------------------------------------------------------------------ object stores


def test_on_a_bucket_a_damaged_step_is_marked_in_place_and_skipped(gcs):  # noqa: F811
  # On GCS orbax writes <step>/ in place and commits it with commit_success.txt.
  for step in (2, 4, 6):
    gcs.pipe(f"{URL}/checkpoints/{step}/state/data", b"x")
    gcs.pipe(f"{URL}/checkpoints/{step}/commit_success.txt", b"")
  cfg = ml_collections.ConfigDict(dict(every_steps=2, keep=1))
  ckpt = checkpoint.Checkpointer(URL, cfg)
  try:
    ckpt._set_aside([(6, checkpoint.DamagedCheckpointError("state/_METADATA is missing"))],
                    used_step=4)
    # Not moved (a copy of every byte on a bucket): marked, and every reader skips it.
    assert gcs.cat(f"{URL}/checkpoints/6/state/data") == b"x"
    assert b"_METADATA is missing" in gcs.cat(f"{URL}/checkpoints/6/DAMAGED")
    assert not gcs.exists(f"{URL}/checkpoints.damaged")
    assert ckpt.latest_step() == 4
    assert checkpoint.committed_steps(URL + "/checkpoints") == [2, 4]
    with pytest.raises(checkpoint.DamagedCheckpointError, match="marked DAMAGED"):
      checkpoint_read.read(URL + "/checkpoints/6")
    # Orbax's `keep` counts only unmarked steps: a newer marked one must not push out the good.
    infos = [type("Info", (), {"step": s})() for s in (2, 4, 6)]
    assert ckpt._mngr._options.preservation_policy.should_preserve(
        infos, context=None) == [False, True, True]
  finally:
    ckpt.close()


def test_only_what_an_abandoned_read_leaves_is_kept_quiet():
  """A failed read's leftovers (futures completed on orbax's closed loop; orbax's pending shard
  reads closed by the garbage collector) print nothing; any other unraisable still does."""
  import types

  async def _read_array_index_and_device_put():
    pass

  async def some_other_coroutine():
    pass

  closed = Exception("Encountered error while reading array index")
  closed.__cause__ = GeneratorExit()
  read, other = _read_array_index_and_device_put(), some_other_coroutine()
  try:
    quiet = lambda e, obj: checkpoint_read._abandoned_read(  # noqa: E731
        types.SimpleNamespace(exc_value=e, object=obj))
    assert quiet(RuntimeError("Event loop is closed"), None)
    assert quiet(closed, read)
    assert not quiet(closed, other)
    assert not quiet(Exception("Encountered error while reading array index"), read)
    assert not quiet(RuntimeError("something else"), None)
  finally:
    read.close()
    other.close()
