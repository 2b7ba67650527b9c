"""The one jitted train step on the real TrainState, as training builds it (`trainer.build`)."""
import jax
import numpy as np

from conftest import TINY_DEMO
from siglip_jax import cli, trainer


def _tiny_config():
  config = cli.load_config_file("configs/demo.py")
  for arg in TINY_DEMO[1:]:
    key, value = arg[len("--config."):].split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(eval(value)) if not isinstance(node[leaf], str) else value
  config.mesh = (("data", -1),)
  config.total_steps = 10
  return config


def _batch(config, parts, image_value=None):
  b, s, l = config.input.batch_size, config.input.image_size, config.input.text_len
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  if image_value is not None:
    image[0, 0, 0, 0] = image_value
  text = rng.integers(3, 100, (b, l)).astype(np.int32)
  put = lambda x: jax.device_put(x, parts["batch_sharding"])  # noqa: E731
  return {"image": put(image), "text": put(text)}


def test_non_finite_step_keeps_the_weights_and_records_the_step(monkeypatch, repo):
  monkeypatch.chdir(repo)
  config = _tiny_config()
  parts = trainer.build(config)
  state = parts["init"](jax.random.key(0), _batch(config, parts))
  before = jax.device_get(state.params)
  opt_before = jax.device_get(state.opt_state)
  state, metrics = parts["train_step"](state, _batch(config, parts, image_value=np.nan))
  assert not np.isfinite(float(metrics["train/loss"]))
  assert int(state.step) == 1 and int(state.bad_step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), opt_before)
  # A finite step afterwards updates the weights; the first bad step stays recorded.
  state, metrics = parts["train_step"](state, _batch(config, parts))
  assert np.isfinite(float(metrics["train/loss"]))
  assert int(state.step) == 2 and int(state.bad_step) == 1
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state.params)["img"], before["img"])
  assert any(jax.tree.leaves(changed))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_loss_kinds_train_alike_on_four_devices(monkeypatch, repo):
  """`loss.kind` as training builds it on a 4-device mesh: the ring, all-gather and plain
  sigmoid losses take the same two steps from the same state (the second step's loss is that
  of the first update: the weights are not compared entry by entry, as Adam's first step moves
  a weight by ~lr whatever its gradient's size, so float noise in a near-zero gradient shows);
  softmax trains too (its own loss)."""
  from siglip_jax import mesh as mesh_lib
  if len(jax.devices()) < 4:
    import pytest
    pytest.skip("needs 4 simulated CPU devices")
  make_mesh = mesh_lib.make_mesh
  monkeypatch.setattr(trainer.mesh_lib, "make_mesh",
                      lambda spec: make_mesh(spec, devices=jax.devices()[:4]))
  monkeypatch.chdir(repo)
  config = _tiny_config()
  config.mesh = (("data", 4),)
  first = None
  losses = {}
  for kind in ("sigmoid_ring", "sigmoid_gather", "sigmoid", "softmax"):
    config.loss.kind = kind
    parts = trainer.build(config)
    batches = [_batch(config, parts), _batch(config, parts, image_value=0.5)]
    if first is None:
      first = jax.device_get(parts["init"](jax.random.key(0), batches[0]))
    state = jax.device_put(first, parts["state_sharding"])   # a fresh copy: the step donates it
    losses[kind] = []
    for batch in batches:
      state, metrics = parts["train_step"](state, batch)
      losses[kind].append(float(metrics["train/loss"]))
  for kind in ("sigmoid_gather", "sigmoid"):
    np.testing.assert_allclose(losses[kind], losses["sigmoid_ring"], rtol=1e-5, err_msg=kind)
  assert np.all(np.isfinite(losses["softmax"]))
  assert abs(losses["softmax"][0] - losses["sigmoid_ring"][0]) > 1e-3
