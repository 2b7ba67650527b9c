"""SILC and TIPS (objectives/distill.py): the losses against float64 numpy, the EMA teacher
through the switch as training builds it, and the loader's views."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax import cli, trainer
from siglip_jax import mesh as mesh_lib
from siglip_jax.objectives import distill
from conftest import REPO

MAKE_MESH = mesh_lib.make_mesh


# ------------------------------------------------------------------------ float64 references

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _xent_and_grad(student, teacher, center, ts, tt):
  """Per row: the loss and its gradient in the student logits, in float64."""
  target = _softmax((teacher - center) / tt)
  log_p = np.log(_softmax(student / ts))
  return -(target * log_p).sum(-1), (_softmax(student / ts) - target) / ts


def test_losses_and_gradients_match_float64_numpy():
  rng = np.random.default_rng(0)
  b, n, p, k, ts, tt = 3, 2, 4, 5, 0.1, 0.04
  s_local, t_global = rng.normal(size=(b, n, k)), rng.normal(size=(b, k))
  s_patch, t_patch = rng.normal(size=(b, p, k)), rng.normal(size=(b, p, k))
  center = rng.normal(size=k) * 0.3
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], bool)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  temps = dict(student_temp=ts, teacher_temp=tt)

  loss, (g_s, g_t, g_c) = jax.value_and_grad(
      lambda s, t, c: distill.silc_loss(s, t, c, **temps), argnums=(0, 1, 2))(
          f32(s_local), f32(t_global), f32(center))
  ref, ref_grad = _xent_and_grad(s_local, t_global[:, None], center, ts, tt)
  np.testing.assert_allclose(loss, ref.mean(), rtol=1e-5)
  np.testing.assert_allclose(g_s, ref_grad / (b * n), rtol=1e-4, atol=1e-7)
  assert not np.any(g_t) and not np.any(g_c)    # targets are constants: no gradient

  loss, (g_s, g_t) = jax.value_and_grad(
      lambda s, t: distill.tips_loss(s, t, f32(mask), f32(center), **temps), argnums=(0, 1))(
          f32(s_patch), f32(t_patch))
  ref, ref_grad = _xent_and_grad(s_patch, t_patch, center, ts, tt)
  np.testing.assert_allclose(loss, (ref * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(g_s, ref_grad * mask[..., None] / mask.sum(), rtol=1e-4,
                             atol=1e-7)
  assert not np.any(g_t)

  logits = rng.normal(size=(b, p, k))
  np.testing.assert_allclose(distill.update_center(f32(center), f32(logits), 0.9),
                             0.9 * center + 0.1 * logits.reshape(-1, k).mean(0), rtol=1e-5)


def test_teacher_momentum_schedules():
  class Cfg:
    momentum, momentum_schedule = 0.99, "constant"
  assert float(distill.teacher_momentum(Cfg, 50, 40, 100)) == pytest.approx(0.99)
  Cfg.momentum_schedule = "cosine"   # DINO: 0.99 at the switch, 1.0 at the end
  for step, want in ((40, 0.99), (70, 0.995), (100, 1.0)):
    assert float(distill.teacher_momentum(Cfg, step, 40, 100)) == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------ through the switch

def _config(repo_config="configs/siglip2_demo.py"):
  config = cli.load_config_file(repo_config)
  config.input.batch_size = 8
  config.input.image_size = 32
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.out_dim = (None, 32)
  for name in ("silc", "tips"):
    config.objectives[name].update(head_hidden=16, head_bottleneck=8, head_dim=12,
                                   start_fraction=0.25)   # after step 1: bench.run's switch
  config.objectives.silc.update(n_local=2, local_size=16)
  config.evals = {}
  config.total_steps = 4
  config.optim.schedule.warmup_steps = 1
  return config


FSDP_DEVICES = 8


def _fsdp_config(num_devices=FSDP_DEVICES):
  """The four objectives with every array FSDP-sharded over `num_devices` devices."""
  config = _config()
  config.input.batch_size = 16
  config.mesh, config.sharding_rules, config.fsdp_min_size_mb = (("fsdp", num_devices),), \
      ((".*", "fsdp"),), 0.0
  return config


@pytest.fixture(scope="module")
def fsdp():
  """(config, trainer.build's parts) on 8 devices under FSDP rules (1 device where fewer are
  simulated), built once: the two tests below share its compiled steps (the 8-device test's
  bench.run builds again and finds them in the persistent compilation cache)."""
  n = FSDP_DEVICES if len(jax.devices()) >= FSDP_DEVICES else 1
  config = _fsdp_config(n)
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(REPO)
    mp.setattr(trainer.mesh_lib, "make_mesh",
               lambda spec: MAKE_MESH(spec, devices=jax.devices()[:n]))
    parts = trainer.build(config)
  return config, parts


def test_teacher_is_the_student_at_the_switch_then_follows_the_ema(monkeypatch, repo, fsdp):
  """As training builds it, with the teacher and heads FSDP-sharded like the student."""
  monkeypatch.chdir(repo)
  config, parts = fsdp
  objs = parts["objectives"]
  switch_at = 1
  assert [o.start_step for o in objs if o.uses_teacher] == [switch_at, switch_at]
  from siglip_jax.data import pipeline
  batches = pipeline.make_batches(config, parts["batch_sharding"], views_from=switch_at)
  try:
    # The trainer's init, its example batch placed as bench places its batches: with the switch
    # where bench puts it, the same program, which the 8-device test below finds compiled.
    state = parts["init"](jax.random.key(0), jax.device_put(
        trainer._zeros_like(parts["init_example"]), parts["batch_sharding"]))
    assert int(state.teacher["switch_step"]) == switch_at
    for done in range(switch_at):
      _, batch, _ = next(batches)
      assert "view_global" not in batch          # nothing extra before the switch
      state, _ = parts["train_step_at"](done)(state, batch)
    before = jax.device_get(state.params)
    state = parts["switch"](state)
    params, teacher = jax.device_get(state.params), jax.device_get(state.teacher)
    # The teacher is the student; heads and mask token are fresh, from (seed, name) alone.
    jax.tree.map(np.testing.assert_array_equal, teacher["params"]["img"], params["img"])
    for name in ("silc_head", "tips_head"):
      jax.tree.map(np.testing.assert_array_equal, teacher["params"][name], params[name])
    fresh = {}
    for o in objs:
      if o.uses_teacher:
        fresh.update(jax.device_get(jax.jit(o.fresh)(params)))
    for name in ("silc_head", "tips_head", "mask_token"):
      jax.tree.map(np.testing.assert_array_equal, params[name], fresh[name])
      assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params[name], before[name])))
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state.opt_state))
    moments = [x for p, x in flat if any(n in mesh_lib.path_str(p) for n in (
        "silc_head", "tips_head", "mask_token"))]
    assert moments and all(not np.any(x) for x in moments)
    assert not any(np.any(c) for c in teacher["centers"].values())

    # One update: teacher = m * teacher + (1 - m) * student, exactly; centers move.
    _, batch, _ = next(batches)
    assert {"view_global", "view_local", "tips_mask"} <= set(batch)
    targets = jax.device_get(jax.jit(lambda t, b: distill.teacher_targets(objs, t, b))(
        state.teacher, batch))
    # The teacher receives no gradient through the losses.
    (silc,) = [o for o in objs if o.name == "silc"]
    floats = {k: state.teacher[k] for k in ("params", "centers")}
    grad = jax.jit(jax.grad(lambda t: silc.loss(state.params, batch, distill.teacher_targets(
        objs, dict(state.teacher, **t), batch))[0]))(floats)
    assert not any(np.any(g) for g in jax.tree.leaves(jax.device_get(grad)))
    state, metrics = parts["train_step_at"](switch_at)(state, batch)
    m = np.float32(metrics["train/teacher_momentum"])
    assert m == np.float32(config.objectives.teacher.momentum)
    new_params, new_teacher = jax.device_get(state.params), jax.device_get(state.teacher)
    for name, old in teacher["params"].items():
      jax.tree.map(lambda t, s, n: np.testing.assert_allclose(
          n, m * t + (np.float32(1) - m) * s, rtol=1e-6, atol=1e-9),
          old, new_params[name], new_teacher["params"][name])
    for name in ("silc", "tips"):
      mu = np.float32(config.objectives[name].center_momentum)
      want = (np.float32(1) - mu) * targets[f"teacher/{name}"].reshape(-1, 12).mean(0)
      np.testing.assert_allclose(new_teacher["centers"][name], want, rtol=1e-5, atol=1e-7)
    assert np.isfinite(metrics["train/loss_silc"]) and np.isfinite(metrics["train/loss_tips"])
  finally:
    batches.close()


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 simulated CPU devices")
def test_all_four_objectives_compile_on_8_devices_with_fsdp(monkeypatch, repo, fsdp):
  """The step with sigmoid ring + LocCa + SILC + TIPS under FSDP rules: the teacher and the
  heads are sharded like the student; bench times the steps before and after the switch and
  the FLOPs count the teacher's forward and the views."""
  from siglip_jax import bench, flops
  monkeypatch.chdir(repo)
  config, parts = fsdp
  assert dict(parts["mesh"].shape) == {"fsdp": 8}
  teacher = parts["state_sharding"].teacher["params"]
  for tree in (teacher["img"]["Transformer"], teacher["silc_head"], parts[
      "state_sharding"].params["tips_head"]):
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(tree))
  result = bench.run(_fsdp_config(), steps=1, warmup=1)   # builds its own parts
  assert result["pairs_per_s"] > 0 and result["pairs_per_s_before_switch"] > 0
  assert np.isfinite(result["loss"])
  objs = {o.name: o for o in parts["objectives"]}
  per_pair = lambda names: flops.train_flops_per_pair(  # noqa: E731
      parts["model"], image_size=32, text_len=config.input.text_len, global_batch=16,
      objectives=[objs[n] for n in names])
  # 2 local crops of 16 px, the 32 px global view twice (student masked, teacher): more than
  # 3 image forwards' worth; the teacher's is counted once with both on.
  image = flops.image_tower_flops(image_size=32, patch_size=(8, 8), width=32, depth=1,
                                  mlp_dim=64)
  extra = per_pair(["contrastive", "locca", "silc", "tips"]) - per_pair(["contrastive",
                                                                         "locca"])
  assert extra > 3 * (image + image / 3)
  assert extra < per_pair(["contrastive", "locca", "silc"]) - per_pair([
      "contrastive", "locca"]) + per_pair(["contrastive", "locca", "tips"]) - per_pair([
          "contrastive", "locca"])


# ------------------------------------------------------------------------ the views

def test_views_are_deterministic_per_seed_and_slot(repo, monkeypatch):
  from siglip_jax.data import preprocess, scenes
  monkeypatch.chdir(repo)
  config = _config()
  config.objectives.teacher.color_jitter = 0.4
  pre = preprocess.from_config(config)
  raw = scenes.ScenesDataset(seed=0, image_size=32, num_heldout=0,
                             num_unseen=0).train_records([7])[0]
  plain = pre(raw, 5)
  a, b, other = pre(raw, 5, with_views=True), pre(raw, 5, with_views=True), \
      pre(raw, 6, with_views=True)
  for key in plain:   # the views draw from their own stream: nothing else changes
    np.testing.assert_array_equal(a[key], plain[key], err_msg=key)
  assert a["view_global"].shape == (32, 32, 3) and a["view_local"].shape == (2, 16, 16, 3)
  assert a["tips_mask"].shape == (16,) and a["tips_mask"].sum() == 8   # half of the 4x4 grid
  for key in ("view_global", "view_local", "tips_mask"):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["view_local"], other["view_local"])
  assert not np.array_equal(a["tips_mask"], other["tips_mask"])
  config.seed = 1
  again = preprocess.from_config(config)(raw, 5, with_views=True)
  assert not np.array_equal(a["view_local"], again["view_local"])
