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
