"""The train step with the LocCa decoder, as training builds it (`trainer.build`), on scenes
batches from the loader: on 4 CPU devices with FSDP rules and the ring loss it computes what the
1-device step computes, and every objective logs its loss."""
import jax
import numpy as np
import pytest

from siglip_jax import cli, trainer
from siglip_jax import mesh as mesh_lib

MAKE_MESH = mesh_lib.make_mesh
pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 simulated CPU devices")


def _config(mesh, rules):
  config = cli.load_config_file("configs/siglip2_demo.py")
  config.input.batch_size = 16
  config.input.image_size = 32
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.out_dim = (None, 32)
  config.evals = {}
  config.objectives.silc.weight = config.objectives.tips.weight = 0.0   # test_distill.py's
  config.total_steps = 10
  config.optim.schedule.warmup_steps = 2
  config.mesh, config.sharding_rules, config.fsdp_min_size_mb = mesh, rules, 0.0
  return config


def _two_steps(monkeypatch, num_devices, mesh, rules):
  monkeypatch.setattr(trainer.mesh_lib, "make_mesh",
                      lambda spec: MAKE_MESH(spec, devices=jax.devices()[:num_devices]))
  config = _config(mesh, rules)
  parts = trainer.build(config)
  from siglip_jax.data import pipeline
  batches = pipeline.make_batches(config, parts["batch_sharding"])
  try:
    first = next(batches)[1]
    state = parts["init"](jax.random.key(0), first)
    if rules != ((".*", "replicate"),):   # FSDP really shards the decoder's weights
      kernel = state.params["decoder"]["block_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
      assert len({str(s.index) for s in kernel.addressable_shards}) == num_devices
    logged = []
    for batch in (first, next(batches)[1]):
      state, metrics = parts["train_step"](state, batch)
      logged.append(jax.device_get(metrics))
  finally:
    batches.close()
  return logged, jax.device_get(state.params)


def test_locca_step_on_4_devices_with_fsdp_and_the_ring_equals_1_device(monkeypatch, repo):
  monkeypatch.chdir(repo)
  one, params_one = _two_steps(monkeypatch, 1, (("data", 1),), ((".*", "replicate"),))
  four, params_four = _two_steps(monkeypatch, 4, (("fsdp", 4),), ((".*", "fsdp"),))
  for a, b in zip(one, four):
    for name in ("train/loss", "train/loss_contrastive", "train/loss_locca",
                 "train/loss_locca_caption", "train/loss_locca_refexp",
                 "train/loss_locca_grounded"):
      assert np.isfinite(a[name]), name
      np.testing.assert_allclose(b[name], a[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(a["train/loss"], a["train/loss_contrastive"]
                               + a["train/loss_locca"], rtol=1e-6)
  # After two updates the weights (the decoder's too) still agree. atol 2% of one step at the
  # peak lr (1e-3): Adam divides by sqrt(v), so where a gradient entry is near zero, float
  # noise in it moves the update by up to ~lr. The attention key biases' gradient is exactly
  # zero in exact arithmetic (softmax ignores a shift shared by all keys): only that noise,
  # which Adam turns into steps of up to lr, so they are held to that bound instead.
  def close(path, x, y):
    if "key" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      np.testing.assert_array_less(np.abs(y - x), 2 * 2 * 1e-3)
    else:
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(close, params_one, params_four)


def test_bench_and_preflight_run_the_decoder_and_count_its_flops(monkeypatch, repo):
  """bench times the real step on synthetic decoder passes; preflight compiles it on the
  batch the objectives read; both count the decoder's FLOPs (flops.py against XLA:
  tests/test_flops.py)."""
  from siglip_jax import bench, flops, preflight
  monkeypatch.chdir(repo)
  config = _config((("data", 1),), ((".*", "replicate"),))
  monkeypatch.setattr(trainer.mesh_lib, "make_mesh",
                      lambda spec: MAKE_MESH(spec, devices=jax.devices()[:1]))
  parts = trainer.build(config)
  (locca,) = [o for o in parts["objectives"] if o.name == "locca"]
  batch = bench.synthetic_batches(config, parts["batch_sharding"], parts["vocab_size"], n=1,
                                  objectives=parts["objectives"])[0]
  assert set(batch) == set(preflight.abstract_batch(parts["example"], parts["batch_sharding"]))
  assert {"dec_inputs", "dec_targets", "dec_task"} <= set(batch)
  _, _, loss, _ = bench.time_train_step(parts, config, steps=1, warmup=0)
  assert np.isfinite(loss)
  towers = flops.train_flops_per_pair(parts["model"], image_size=32, text_len=20,
                                      global_batch=16)
  both = flops.train_flops_per_pair(parts["model"], image_size=32, text_len=20,
                                    global_batch=16, objectives=parts["objectives"])
  # 16 patch tokens of width 32 read by three passes of 20 tokens.
  assert both - towers == 3 * locca.forward_flops(image_tokens=16, image_width=32) > 0
