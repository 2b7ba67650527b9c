"""siglip_jax.checkpoint and siglip_jax.model_init on small synthetic train states."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import glob  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from siglip_jax import checkpoint, checkpoint_fingerprint, checkpoint_read, model_init  # noqa: E402


@flax.struct.dataclass
class State:   # the fields of siglip_jax.step.TrainState
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array
  bad_step: jax.Array


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def _shard(tree, mesh):
  """Matrices split over the mesh along their first axis (so restores must re-shard)."""
  def spec(x):
    return P("data") if x.ndim >= 2 and x.shape[0] % mesh.size == 0 else P()
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, spec(x)), tree)


def _state(mesh, *, seed=0, grid=4):
  rng = np.random.default_rng(seed)
  params = {"img": {"embedding": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
                    "pos_embedding": rng.normal(size=(1, grid * grid, 8)).astype(np.float32)},
            "txt": {"head": {"kernel": rng.normal(size=(8, 8)).astype(np.float32),
                             "bias": rng.normal(size=(8,)).astype(np.float32)}},
            "t": np.array([2.3], np.float32)}
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), opt_state, params)
  state = State(step=jnp.array(7, jnp.int32), params=params, opt_state=opt_state,
                rng=jax.random.key_data(jax.random.key(seed)), bad_step=jnp.array(0, jnp.int32))
  return jax.device_put(state, _shard(state, mesh))


def _target(state, mesh):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, _shard(state, mesh))


def _cfg(every_steps=2, keep=2, keep_every=0):
  return ml_collections.ConfigDict(dict(every_steps=every_steps, keep=keep, keep_every=keep_every))


def _assert_same(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _snapshot(path):
  return sorted((os.path.relpath(f, path), os.path.getsize(f), os.path.getmtime(f))
                for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


def _save(workdir, steps, state, cfg=None, config=None):
  ckpt = checkpoint.Checkpointer(workdir, cfg or _cfg(), config=config)
  for s in steps:
    ckpt.save(s, state.replace(step=jnp.array(s, jnp.int32)), {"data_position": 10 * s})
  ckpt.close()


def test_round_trip_is_bit_exact(tmp_path):
  mesh = _mesh(4)
  state = _state(mesh)
  config = ml_collections.ConfigDict({"seed": 3, "model": {"width": 8}})
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg(), config=config)
  assert ckpt.latest_step() is None
  ckpt.save(7, state, {"data_position": 120})
  # The save is async and the trainer donates the state right after: the checkpoint must hold
  # the values at save() time, not what the donated buffers hold later.
  jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 0 + 1, s), donate_argnums=0)(
      jax.tree_util.tree_map(jnp.copy, state))
  ckpt.wait()
  assert ckpt.latest_step() == 7
  restored, extra = ckpt.restore(_target(state, mesh))
  ckpt.close()
  _assert_same(restored, state)
  assert extra == {"data_position": 120}
  assert checkpoint.read_config(tmp_path) == {"seed": 3, "model": {"width": 8}}
  assert sorted(checkpoint.read_params(tmp_path)) == [
      "img/embedding/kernel", "img/pos_embedding", "t", "txt/head/bias", "txt/head/kernel"]


@pytest.mark.parametrize("devices", [8, 2])
def test_restore_onto_another_mesh(tmp_path, devices):
  state = _state(_mesh(4))
  _save(tmp_path, [7], state)
  mesh = _mesh(devices)
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  restored, _ = ckpt.restore(_target(state, mesh))
  _assert_same(restored, state)
  kernel = restored.params["img"]["embedding"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P("data"))
  assert len(kernel.addressable_shards) == devices
  # The fingerprints saved from 4 devices are those of the state restored onto `devices`...
  path = tmp_path / "checkpoints" / "7" / "fingerprints" / "metadata"
  record = json.loads(path.read_text())
  sums, _ = checkpoint_fingerprint.compute(restored)
  assert {n: a["sums"] for n, a in record["arrays"].items()} == sums and len(sums) == 19
  # ... and the restore compares them: a recorded sum that differs is damage.
  record["arrays"]["params/txt/head/bias"]["sums"][1] ^= 1
  path.write_text(json.dumps(record))
  with pytest.raises(checkpoint.DamagedCheckpointError, match="params/txt/head/bias"):
    ckpt.restore(_target(state, mesh), step=7)
  ckpt.close()


def test_checkpoint_without_fingerprints_still_loads(tmp_path, caplog):
  state = _state(_mesh(1))
  _save(tmp_path, [2, 4], state)
  for step in (2, 4):   # as a siglip_jax from before fingerprints saved them
    shutil.rmtree(tmp_path / "checkpoints" / str(step) / "fingerprints")
  checkpoint_read._warned_unverified.clear()
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  with caplog.at_level(logging.WARNING):
    restored, extra = ckpt.restore(_target(state, _mesh(2)))
    assert sorted(checkpoint.read_params(tmp_path)) == sorted(
        k.split("/", 1)[1] for k in checkpoint_fingerprint.compute(state)[0] if "params/" in k)
  ckpt.close()
  _assert_same(restored, state.replace(step=jnp.array(4, jnp.int32)))
  assert extra == {"data_position": 40}
  assert len([r for r in caplog.records if "hold no fingerprints" in r.getMessage()]) == 1


def test_preservation_keeps_latest_and_every_nth(tmp_path):
  state = _state(_mesh(1))
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg(every_steps=2, keep=2, keep_every=10))
  for step in range(1, 26):   # maybe_save decides: every 2nd step and the last
    assert not ckpt.maybe_save(step, state, lambda: {"data_position": step}, last=step == 25)
  ckpt.close()
  assert _steps(tmp_path) == [10, 20, 24, 25]


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
  state = _state(_mesh(1))
  _save(tmp_path, [2, 4], state)
  ckdir = tmp_path / "checkpoints"
  # What a process killed mid-write leaves: the step's tmp dir, partly written.
  for name in ("6.orbax-checkpoint-tmp", "8.orbax-checkpoint-tmp-1712345678"):
    shutil.copytree(ckdir / "4", ckdir / name)
    for f in glob.glob(str(ckdir / name / "state" / "**"), recursive=True)[::2]:
      if os.path.isfile(f):
        os.truncate(f, os.path.getsize(f) // 2)
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  assert ckpt.latest_step() == 4
  _, extra = ckpt.restore(_target(state, _mesh(1)))
  assert extra == {"data_position": 40}
  ckpt.close()
  assert sorted(os.listdir(ckdir)) == ["2", "4"]


def test_damaged_latest_falls_back_with_a_warning(tmp_path, caplog):
  state = _state(_mesh(1))
  _save(tmp_path, [2, 4], state)
  # Truncate the array data files (which of OCDBT's copies a read uses is orbax's business).
  for f in glob.glob(str(tmp_path / "checkpoints/4/state/**/d/*"), recursive=True):
    os.truncate(f, os.path.getsize(f) // 2)
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  with caplog.at_level(logging.WARNING):
    restored, extra = ckpt.restore(_target(state, _mesh(1)))
  assert extra == {"data_position": 20} and int(restored.step) == 2
  assert any("step 4" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  assert _steps(tmp_path) == [2]
  assert os.path.isdir(tmp_path / "checkpoints.damaged" / "4")   # kept for inspection
  ckpt.save(4, state, {"data_position": 40})   # the run can write that step again
  ckpt.close()
  assert _steps(tmp_path) == [2, 4]


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  state = _state(_mesh(1))
  _save(tmp_path, [2], state)
  for f in glob.glob(str(tmp_path / "checkpoints/2/state/**/d/*"), recursive=True):
    os.remove(f)
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  with pytest.raises(checkpoint.NoCheckpointError, match="no readable checkpoint .* step 2: "):
    ckpt.restore(_target(state, _mesh(1)))
  ckpt.close()
  assert _steps(tmp_path) == [2] and not os.path.exists(tmp_path / "checkpoints.damaged")


def test_mismatched_target_names_params_and_touches_nothing(tmp_path):
  state = _state(_mesh(1))
  _save(tmp_path, [2, 4], state)
  before = _snapshot(tmp_path)
  other = _state(_mesh(1), grid=5)   # pos_embedding [1, 25, 8] instead of [1, 16, 8]
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  with pytest.raises(ValueError) as e:
    ckpt.restore(_target(other, _mesh(1)))
  msg = str(e.value)
  assert "params/img/pos_embedding: checkpoint (1, 16, 8) vs config (1, 25, 8)" in msg
  assert "checkpoints/4" in msg
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_non_finite_state_is_not_saved(tmp_path):
  state = _state(_mesh(1))
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  bad = state.replace(params={**state.params, "t": jnp.array([np.nan], np.float32)})
  with pytest.raises(checkpoint.NonFiniteStateError):
    ckpt.save(2, bad, {})
  with pytest.raises(checkpoint.NonFiniteStateError):
    ckpt.save(2, state.replace(bad_step=jnp.array(2, jnp.int32)), {})
  ckpt.close()
  assert _steps(tmp_path) == []


def test_sigterm_saves_at_the_next_step_and_stops(tmp_path, monkeypatch):
  state = _state(_mesh(1))
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg(every_steps=4))
  asked = []
  real = ckpt.reached_preemption
  monkeypatch.setattr(ckpt, "reached_preemption", lambda s: asked.append(s) or real(s))
  try:
    assert signal.getsignal(signal.SIGTERM) == ckpt._on_sigterm
    assert not ckpt.maybe_save(1, state, {})   # not scheduled, no notice: nothing saved
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.maybe_save(3, state, {"data_position": 3})   # off-schedule: saved, stop
    assert _steps(tmp_path) == [3]   # committed by the time maybe_save says stop
    assert not ckpt.maybe_save(5, state, {}, last=True)   # the last step: saved, no stop
  finally:
    ckpt.close()
  assert asked == [1, 3, 5]   # once per step (a collective sync point with several processes)
  assert _steps(tmp_path) == [3, 5]
  assert signal.getsignal(signal.SIGTERM) != ckpt._on_sigterm


def _ramp(grid, width):
  """A posemb whose value is linear in the grid position: bilinear resampling keeps it linear."""
  i, j = np.meshgrid(np.linspace(0, 1, grid), np.linspace(0, 1, grid), indexing="ij")
  w = np.arange(1, width + 1, dtype=np.float32)
  return ((2 * i + 3 * j)[..., None] * w).reshape(1, grid * grid, width).astype(np.float32)


def test_load_init_params(tmp_path):
  saved = _state(_mesh(1), grid=4)
  saved = saved.replace(params={**saved.params, "img": {**saved.params["img"],
                                                        "pos_embedding": _ramp(4, 8)}})
  _save(tmp_path, [3], saved)
  mesh = _mesh(2)
  init = _state(mesh, seed=1, grid=7).params   # another image size: a 7x7 token grid
  init["txt"]["head"] = {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros((4,))}
  init = jax.device_put(init, _shard(init, mesh))
  params = model_init.load_init_params(tmp_path / "checkpoints" / "3", init,
                                       dont_load=("txt/head/.*",))
  np.testing.assert_array_equal(params["img"]["embedding"]["kernel"],
                                saved.params["img"]["embedding"]["kernel"])
  assert params["img"]["embedding"]["kernel"].sharding == NamedSharding(mesh, P("data"))
  np.testing.assert_array_equal(params["txt"]["head"]["kernel"], np.zeros((8, 4)))
  np.testing.assert_allclose(params["img"]["pos_embedding"], _ramp(7, 8), atol=1e-5)
  # A workdir means its latest checkpoint; without dont_load the head does not fit.
  with pytest.raises(ValueError, match=r"txt/head/kernel: \(8, 8\) in .* vs \(8, 4\)"):
    model_init.load_init_params(tmp_path, init)
  init["txt"]["extra"] = jnp.zeros((3,))
  with pytest.raises(ValueError, match="not in .*txt/extra"):
    model_init.load_init_params(tmp_path, init, dont_load=("txt/head/.*",))


def test_failing_async_save_is_raised_not_logged(tmp_path, monkeypatch):
  import errno
  import orbax.checkpoint as ocp

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, "No space left on device")

  state = _state(_mesh(1))
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
  ckpt.save(2, state, {})   # async: the write fails in the background
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 2 .* was not saved") as e:
    ckpt.close()
  assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
  assert _steps(tmp_path) == []


_HANGING_SAVE = """
import sys, threading
import orbax.checkpoint as ocp
sys.path.insert(0, {tests!r})
import test_checkpoint as t
from siglip_jax import checkpoint

async def stalled(self, item, directory):
  threading.Event().wait()   # a filesystem that never answers

ocp.JsonCheckpointHandler._save_fn = stalled
checkpoint._EXIT_GRACE_S = 1.0
ckpt = checkpoint.Checkpointer({workdir!r}, t._cfg(), save_timeout_s=1)
ckpt.save(2, t._state(t._mesh(1)), {{}})
try:
  ckpt.close()
except checkpoint.CheckpointSaveError as e:
  print("close raised:", e, flush=True)
"""


def test_hanging_save_bounds_close_and_exit(tmp_path):
  """A save stuck in the filesystem: close() reports it after save_timeout_s, and the process
  exits although orbax's writer threads never end (the interpreter would wait for them)."""
  import subprocess
  import sys
  from conftest import REPO, cli_env
  script = _HANGING_SAVE.format(tests=os.path.dirname(__file__), workdir=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(1),
                        capture_output=True, text=True, timeout=120)
  assert "close raised: checkpoint step 2" in proc.stdout, proc.stderr[-3000:]
  assert proc.returncode == 1 and "exit is held up by a checkpoint save" in proc.stderr
  assert _steps(tmp_path) == []


def test_model_init_from_a_workdir_skips_a_damaged_step(tmp_path, caplog):
  older, newer = _state(_mesh(1), seed=0), _state(_mesh(1), seed=1)
  _save(tmp_path, [2], older)
  _save(tmp_path, [4], newer)
  os.remove(tmp_path / "checkpoints" / "4" / "state" / "_METADATA")
  checkpoint_read._warned_damaged.clear()
  with caplog.at_level(logging.WARNING):
    params = model_init.load_init_params(tmp_path, _state(_mesh(2), seed=2).params)
  _assert_same(params, older.params)
  assert any("checkpoint step 4" in r.getMessage() and "_METADATA is missing" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(checkpoint.DamagedCheckpointError, match="checkpoints/4 is damaged"):
    model_init.load_init_params(tmp_path / "checkpoints" / "4", older.params)
  assert _steps(tmp_path) == [2, 4]   # a reader moves nothing


def _write_array(step_dir, name, value):
  """Overwrites one saved array in place (a valid OCDBT write through tensorstore), as bit rot
  that still decodes would leave it."""
  import tensorstore as ts
  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "path": name + "/",
                                        "base": f"file://{step_dir}/state/"}}
  ts.open(spec, open=True).result().write(value).result()


@pytest.mark.parametrize("damage", ["extra", "fingerprints", "nan_without_fingerprints"])
def test_unreadable_items_and_non_finite_values_are_damage(tmp_path, damage, caplog):
  state = _state(_mesh(1))
  _save(tmp_path, [2, 4], state)
  step_dir = tmp_path / "checkpoints" / "4"
  if damage == "nan_without_fingerprints":   # saved before fingerprints: isfinite still checks
    shutil.rmtree(step_dir / "fingerprints")
    _write_array(step_dir, "params.t", np.array([np.nan], np.float32))
  else:
    (step_dir / damage / "metadata").write_text('{"data_position": 4')   # cut JSON
  checkpoint_read._warned_damaged.clear()
  with caplog.at_level(logging.WARNING):
    # Readers check what they read: params, config, fingerprints (not the data position).
    assert checkpoint_read.read(tmp_path).step == (4 if damage == "extra" else 2)
    ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
    _, extra = ckpt.restore(_target(state, _mesh(1)))
    ckpt.close()
  assert extra == {"data_position": 20}
  warned = [r for r in caplog.records if "checkpoint step 4" in r.getMessage()]
  assert len(warned) == (1 if damage == "extra" else 2)
  assert _steps(tmp_path) == [2] and os.path.isdir(tmp_path / "checkpoints.damaged" / "4")


def test_a_step_marked_damaged_is_skipped_and_saved_again(tmp_path):
  # How training leaves a damaged step on an object store (here a local copy of such a run).
  state = _state(_mesh(1))
  _save(tmp_path, [2, 4], state)
  (tmp_path / "checkpoints" / "4" / "DAMAGED").write_text("state/_METADATA is missing\n")
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg(keep=1))
  assert ckpt.latest_step() == 2 and checkpoint.committed_steps(ckpt.directory) == [2]
  _, extra = ckpt.restore(_target(state, _mesh(1)))
  assert extra == {"data_position": 20}
  assert ckpt.maybe_save(3, state, {"data_position": 30}) is False   # off-schedule: nothing
  ckpt.save(4, state, {"data_position": 40})   # the marked step is replaced, not kept
  ckpt.close()
  assert _steps(tmp_path) == [4] and not (tmp_path / "checkpoints" / "4" / "DAMAGED").exists()
  assert checkpoint_read.read(tmp_path).step == 4
