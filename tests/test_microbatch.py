"""Gradient caching (`input.microbatches`, siglip_jax/microbatch.py): K micro-batches give the
loss and gradients of the whole batch — with the ring loss under FSDP on 4 devices and LocCa,
SILC and TIPS on, and over 20 demo steps. Its memory: tests/test_preflight.py (--max_batch) and
tests/test_loss_row_chunk.py; figures in docs/performance.md."""
import jax
import numpy as np
import pytest

from siglip_jax import cli, microbatch, step, trainer
from siglip_jax import mesh as mesh_lib
from conftest import REPO

MAKE_MESH = mesh_lib.make_mesh
DEVICES = 4


def _build(config, monkeypatch, devices=DEVICES):
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(trainer.mesh_lib, "make_mesh",
                      lambda spec: MAKE_MESH(spec, devices=jax.devices()[:devices]))
  return trainer.build(config)


def _loss_and_grads(parts, k, active=None):
  """The jitted (loss, metrics, grads, teacher means) of K micro-batches, as the step's."""
  plan = microbatch.Plan(k, parts["mesh"], parts["state_sharding"].params)
  fn = step.make_loss_and_grads(parts["model"], parts["objectives"], active, plan)
  return jax.jit(fn)


def _assert_same_gradients(g_k, g_1):
  """Every leaf: |g_K - g_1| <= 1e-5 |g_1|, or <= 1e-6 of the global norm where the leaf's own
  gradient is (near) zero (the attention key biases: softmax ignores them)."""
  flat_k, flat_1 = (jax.tree_util.tree_flatten_with_path(jax.device_get(g))[0]
                    for g in (g_k, g_1))
  global_norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for _, x in flat_1))
  assert global_norm > 0
  for (path, a), (_, b) in zip(flat_k, flat_1):
    diff, own = np.linalg.norm((a - b).ravel()), np.linalg.norm(b.ravel())
    assert diff <= 1e-5 * own or diff <= 1e-6 * global_norm, (
        f"{jax.tree_util.keystr(path)}: |g_K - g_1| = {diff:.3g}, |g_1| = {own:.3g}, "
        f"global {global_norm:.3g}")


def _tiny(config):
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.out_dim = (None, 32)
  config.evals = {}
  return config


def test_bad_microbatches_are_named_before_anything_is_built():
  """K < 1, or a batch that does not split into K micro-batches over the
  batch-axis devices (each NaFlex length's too): one error naming `input.microbatches`."""
  config = cli.load_config_file("configs/demo.py")
  for k in (0, -1):
    config.input.microbatches = k
    with pytest.raises(microbatch.MicrobatchConfigError, match="`input.microbatches`"):
      microbatch.check_config(config)
  config.input.microbatches = 8
  microbatch.check_config(config, batch_devices=16)            # 128 = 8 x 16
  with pytest.raises(microbatch.MicrobatchConfigError, match=r"128 .* 8 micro-batches x 32"):
    microbatch.check_config(config, batch_devices=32)
  naflex = cli.load_config_file("configs/naflex_demo.py")
  naflex.input.microbatches = 4
  naflex.input.batch_size_by_len = ((max(naflex.input.seq_lens), 6),)
  with pytest.raises(microbatch.MicrobatchConfigError, match="batch 6 at length"):
    microbatch.check_config(naflex)


def _siglip2_config():
  config = _tiny(cli.load_config_file("configs/siglip2_demo.py"))
  config.input.batch_size = 16
  config.input.image_size = 32
  for name in ("silc", "tips"):
    config.objectives[name].update(head_hidden=16, head_bottleneck=8, head_dim=12,
                                   start_fraction=0.25)
  config.objectives.silc.update(n_local=2, local_size=16)
  config.total_steps = 4
  config.loss.kind = "sigmoid_ring"
  config.mesh, config.sharding_rules, config.fsdp_min_size_mb = (("fsdp", DEVICES),), \
      ((".*", "fsdp"),), 0.0
  return config


@pytest.mark.skipif(len(jax.devices()) < DEVICES, reason="needs 4 simulated CPU devices")
def test_ring_fsdp_and_every_objective_k4_equal_k1(monkeypatch):
  """The ring sigmoid loss on 4 devices, every array FSDP-sharded, every SigLIP 2 objective on
  (after the switch): K = 4 gives K = 1's loss, each objective's loss and metrics (LocCa's
  per-task token averages over the global batch), the parameter gradients and the teacher's
  batch means (the centers move once, from all)."""
  from siglip_jax.data import pipeline
  config = _siglip2_config()
  parts = _build(config, monkeypatch)
  assert dict(parts["mesh"].shape) == {"fsdp": DEVICES}
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(parts["state_sharding"].params))
  batches = pipeline.make_batches(config, parts["batch_sharding"], views_from=0)
  try:
    _, batch, _ = next(batches)
  finally:
    batches.close()
  assert {"dec_task", "view_global", "view_local", "tips_mask"} <= set(batch)
  state = parts["init"](jax.random.key(0), batch)
  # The teacher differs from the student (as after some updates): its targets matter.
  teacher = jax.tree_util.tree_map(lambda x: x * 0.9 if x.dtype == np.float32 else x,
                                   state.teacher)
  teacher["centers"] = jax.tree_util.tree_map(lambda c: c + 0.1, teacher["centers"])
  out_1 = _loss_and_grads(parts, 1)(state.params, batch, teacher)
  out_k = _loss_and_grads(parts, 4)(state.params, batch, teacher)
  (loss_1, m_1, g_1, means_1), (loss_k, m_k, g_k, means_k) = jax.device_get((out_1, out_k))
  np.testing.assert_allclose(loss_k, loss_1, rtol=1e-5)
  for name in ("contrastive", "locca", "silc", "tips"):
    assert m_1[f"train/loss_{name}"] > 0
  assert set(m_k) == set(m_1)
  for key in m_1:
    np.testing.assert_allclose(m_k[key], m_1[key], rtol=2e-5, err_msg=key)
  for name in ("silc", "tips"):
    np.testing.assert_allclose(means_k[name], means_1[name], rtol=1e-5, atol=1e-7)
  _assert_same_gradients(g_k, g_1)
  # The tolerance is tight: the K = 1 gradients off by 3e-5 of themselves do not pass.
  with pytest.raises(AssertionError):
    _assert_same_gradients(jax.tree_util.tree_map(lambda g: g * (1 + 3e-5), g_1), g_1)


def test_twenty_demo_steps_log_the_same_losses(monkeypatch):
  """The demo (one device, its data, batch 128, optimizer and schedule; the towers one block
  deep and 32 wide, to compile in seconds), 20 steps of K = 4 against K = 1: the same losses
  within 1e-4 relative. docs/performance.md has the full-size demo's."""
  from siglip_jax.data import pipeline

  def losses(k):
    config = _tiny(cli.load_config_file("configs/demo.py"))
    config.input.microbatches = k
    parts = _build(config, monkeypatch, devices=1)
    batches = pipeline.make_batches(config, parts["batch_sharding"])
    try:
      _, batch, _ = next(batches)
      state = parts["init"](jax.random.key(config.seed), batch)
      out = []
      for _ in range(20):
        state, metrics = parts["train_step"](state, batch)
        out.append(metrics["train/loss"])
        _, batch, _ = next(batches)
    finally:
      batches.close()
    return np.array(jax.device_get(out))

  one, four = losses(1), losses(4)
  assert one[-1] < one[0]       # it trains
  np.testing.assert_allclose(four, one, rtol=1e-4)
