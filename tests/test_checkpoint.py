"""siglip_jax.checkpoint and siglip_jax.model_init on small synthetic train states."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import glob  # noqa: E402
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

from siglip_jax import checkpoint, model_init  # noqa: E402


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
  restored, _ = checkpoint.Checkpointer(tmp_path, _cfg()).restore(_target(state, mesh))
  _assert_same(restored, state)
  kernel = restored.params["img"]["embedding"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P("data"))
  assert len(kernel.addressable_shards) == devices


def test_preservation_keeps_latest_and_every_nth(tmp_path):
  state = _state(_mesh(1))
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg(every_steps=2, keep=2, keep_every=10))
  for step in range(1, 26):
    if ckpt.should_save(step, last=step == 25):
      ckpt.save(step, state, {"data_position": step})
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
  with pytest.raises(RuntimeError, match="no readable checkpoint .* step 2: "):
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


def test_sigterm_sets_reached_preemption(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, _cfg())
  try:
    assert signal.getsignal(signal.SIGTERM) == ckpt._on_sigterm
    assert not ckpt.reached_preemption(3)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.reached_preemption(3)
    assert ckpt.should_save(3, last=True) and not ckpt.should_save(3) and ckpt.should_save(4)
  finally:
    ckpt.close()
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
