"""NaFlex training end to end: 4 CPU devices, the ring loss and FSDP rules, lengths drawn per step,
one compile per length, a SIGTERM resume bit for bit; SigLIP 2's switch from a fixed-resolution
run; the length plan; bad NaFlex input as one `error:` line."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO, TINY_DEMO, cli_env
from cli_cases import assert_one_line_error, run_cases
from siglip_jax import checkpoint, model_init
from siglip_jax.data import naflex
from siglip_jax.models import two_towers

TOTAL = 8
TINY = ["--config=configs/naflex_demo.py",   # shapes_naflex: wide, tall, square
        "--config.input.batch_size=16", "--config.input.seq_lens=(4,16)",
        "--config.input.batch_size_by_len=((4,32),)", "--config.input.max_num_patches=16",
        "--config.model.image.depth=1", "--config.model.image.width=32",
        "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
        "--config.model.text.depth=1", "--config.model.text.width=32",
        "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
        "--config.model.out_dim=(None,32)", "--config.evals={}",
        "--config.optim.schedule.warmup_steps=2", "--config.log_every_steps=1",
        "--config.loss.kind=sigmoid_ring", "--config.mesh=(('data',4),)",
        "--config.sharding_rules=(('.*','fsdp:data'),)", "--config.fsdp_min_size_mb=0",
        f"--config.total_steps={TOTAL}"]
COMPILED_STEP = "Finished XLA compilation of jit(step)"


def _cmd(workdir, every):
  return [sys.executable, "-m", "siglip_jax.train", f"--workdir={workdir}", *TINY,
          f"--config.checkpoint.every_steps={every}"]


def _env():
  return cli_env(4, JAX_LOG_COMPILES=1)


def _logged(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r["train/loss"], r["train/seq_len"]) for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("naflex_reference")
  proc = subprocess.run(_cmd(workdir, 100), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout + proc.stderr


def test_lengths_are_drawn_per_step_and_each_compiles_once(reference):
  workdir, log = reference
  logged = _logged(workdir)
  assert [s for s, _, _ in logged] == list(range(1, TOTAL + 1))
  plan = naflex.LengthPlan((4, 16), 16, {4: 32}, seed=0)
  assert [n for _, _, n in logged] == [plan.length(s - 1) for s, _, _ in logged]
  assert {n for _, _, n in logged} == {4, 16}
  # The train step compiles once per length, however the lengths alternate.
  assert log.count(COMPILED_STEP) == 2, log[-3000:]
  params = checkpoint.read_params(workdir)
  assert params["img/embedding/kernel"].shape == (8 * 8 * 3, 32)
  assert params["img/pos_embedding"].shape == (4, 4, 32)


def test_sigterm_then_resume_is_exact(tmp_path, reference):
  ref_dir, _ = reference
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_cmd(workdir, 100), cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and any('"train/loss"' in l for l in open(metrics)):
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, open(log_path).read()[-3000:]
  text = open(log_path).read()
  saved = int(re.search(r"preempted: saved step (\d+)", text).group(1))
  assert saved < TOTAL
  again = subprocess.run(_cmd(workdir, 100), cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming at step {saved}" in again.stdout
  ref = {s: loss for s, loss, _ in _logged(ref_dir)}
  for s, loss, _ in _logged(workdir):
    assert loss == ref[s], f"step {s}: {loss} != {ref[s]}"
  a, b = checkpoint.read_params(workdir), checkpoint.read_params(ref_dir)
  assert a.keys() == b.keys()
  for name in a:
    assert np.array_equal(a[name], b[name]), name


def test_the_switch_keeps_what_a_fixed_resolution_model_computes():
  """The patch convolution as a dense layer and the position table as a grid: a fixed-size
  model converted to NaFlex gives the same embeddings on square images at its own grid."""
  tower = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  fixed = two_towers.from_config(dict(image=tower, text=None, out_dim=(None, None)))
  flex = two_towers.from_config(dict(image=dict(tower, posemb_grid=4), text=None,
                                     out_dim=(None, None), image_model=two_towers.NAFLEX))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  params = jax.jit(fixed.init)(jax.random.key(0),
                               np.zeros((1, 32, 32, 3), np.float32))["params"]
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  converted = {}
  for name, value in flat.items():
    init_shape = {"img/embedding/kernel": (192, 32), "img/pos_embedding": (4, 4, 32)}.get(name)
    converted[name] = model_init.to_naflex(name, value, init_shape) if init_shape else value
  want = jax.jit(fixed.apply)({"params": params}, (images / 127.5 - 1).astype(np.float32))[0]
  batch = naflex.encode_batch(list(images), 8, 16)
  batch["patches"] = naflex.to_float(batch["patches"], batch["patch_mask"])
  got = jax.jit(flex.apply)({"params": traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in converted.items()})}, batch)[0]
  np.testing.assert_array_equal(batch["spatial_shapes"], [[4, 4]] * 3)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_the_length_plan():
  plan = naflex.LengthPlan((128, 256, 1024), 64, {1024: 32}, seed=3)
  steps = range(9000)   # crosses the cache's blocks
  lengths = [plan.length(s) for s in steps]
  counts = np.bincount([(128, 256, 1024).index(n) for n in lengths])
  assert counts.min() > 2700   # uniform: 3000 each
  sizes = [32 if n == 1024 else 64 for n in lengths]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  for s in (0, 1, 4095, 4096, 4097, 8999):
    assert plan.first_slot(s) == starts[s]
  assert naflex.LengthPlan((128, 256, 1024), 64, {1024: 32}, seed=3).length(77) == lengths[77]
  assert [naflex.LengthPlan((128, 256), 64, seed=4).length(s) for s in range(40)] != \
      [plan.length(s) for s in range(40)]


def test_bad_naflex_input_is_one_line(tmp_path, reference):
  flex_run = tmp_path / "flex"
  shutil.copytree(reference[0], flex_run)   # a NaFlex run's workdir
  flex = [a for a in TINY if not a.startswith("--config.input.batch_size_by_len")]
  cases = [
      ("siglip_jax.train", [f"--workdir={tmp_path / 'a'}", *TINY,
                            "--config.input.batch_size_by_len=((4,6),)"], None),
      ("siglip_jax.train", [f"--workdir={tmp_path / 'b'}", *flex,
                            "--config.input.batch_size_by_len=((9,8),)"], None),
      ("siglip_jax.train", [f"--workdir={tmp_path / 'c'}", *TINY_DEMO,
                            "--config.input.seq_lens=(16,)"], None),
      ("siglip_jax.train", [f"--workdir={tmp_path / 'd'}", *flex,
                            "--config.objectives.silc.weight=1.0"], None),
      # A NaFlex checkpoint as model_init of a fixed-resolution config; its workdir resumed so.
      ("siglip_jax.train", [f"--workdir={tmp_path / 'e'}", *TINY_DEMO, "--config.total_steps=1",
                            f"--config.model_init={flex_run}"], None),
      ("siglip_jax.train", [f"--workdir={flex_run}", *TINY_DEMO,
                            f"--config.total_steps={TOTAL + 1}"], None),
      ("siglip_jax.convert", [f"--src={flex_run}", "--to=big_vision",
                              f"--out={tmp_path / 'x.npz'}"], None),
  ]
  results = run_cases(cases, devices=4)
  assert_one_line_error(results[0], "input.batch_size_by_len", "not divisible by the 4")
  assert_one_line_error(results[1], "input.batch_size_by_len", "not in input.seq_lens")
  assert_one_line_error(results[2], "input.seq_lens", "NaFlex runs only")
  assert_one_line_error(results[3], "objectives.silc.weight")
  assert_one_line_error(results[4], "model_init", "NaFlex", "model.image_model")
  assert_one_line_error(results[5], "NaFlex image tower", "model.image_model")
  assert_one_line_error(results[6], "NaFlex")
  assert not (tmp_path / "x.npz").exists()
  assert checkpoint.read_params(flex_run).keys() == checkpoint.read_params(reference[0]).keys()


def test_continue_init_starts_at_the_source_lr_and_stretches_its_rest():
  from siglip_jax import optim
  source = {"lr": 1e-3, "schedule": dict(decay="cosine", warmup_steps=10, end_lr_frac=0.1)}
  src = optim.make_schedule(source, 100)
  # What model_init.continue_schedule resolves `continue_init` to: the source's lr and schedule.
  flex = optim.make_schedule({"lr": 1e-3, "schedule": dict(
      source["schedule"], continue_init=True, source_total_steps=100, offset_steps=90)}, 375)
  assert float(flex(0)) == pytest.approx(float(src(90)), rel=1e-6)
  assert float(flex(375 * 4 / 10)) == pytest.approx(float(src(94)), rel=1e-5)
  assert float(flex(374)) == pytest.approx(float(src(90 + 374 * 10 / 375)), rel=1e-5)
  assert float(flex(374)) > 1e-4 * 0.999   # never below the source's end (end_lr_frac 0.1)


def test_an_image_too_long_for_the_budget_is_skipped_and_counted():
  from siglip_jax.data import preprocess
  pre = preprocess.Preprocessor(image_size=32, text_len=8, naflex_patch=8)
  ok = pre({"image": np.zeros((20, 300, 3), np.uint8), "texts": "a red circle"}, 0,
           seq_len=16)
  assert ok["patches"].shape == (16, 192) and ok["patch_mask"].sum() == 15
  assert ok["spatial_shapes"].tolist() == [1, 15]
  with pytest.raises(preprocess.BadRecord) as e:
    pre({"image": np.zeros((10, 300, 3), np.uint8), "texts": "a red circle"}, 0, seq_len=16)
  assert e.value.reason == "extreme_aspect_ratio" and "max_num_patches is 16" in str(e.value)


def test_locca_on_a_naflex_tower_ignores_padding(monkeypatch):
  """The decoder reads a NaFlex tower's patch tokens with the patch mask: extra padding patches
  (of any content) change no objective's loss."""
  from siglip_jax import cli, step, trainer
  from siglip_jax import mesh as mesh_lib
  from siglip_jax.data import pipeline
  monkeypatch.chdir(REPO)
  make_mesh = mesh_lib.make_mesh
  monkeypatch.setattr(trainer.mesh_lib, "make_mesh",
                      lambda spec: make_mesh(spec, devices=jax.devices()[:1]))
  config = cli.load_config_file("configs/siglip2_demo.py")
  config.model.image_model = two_towers.NAFLEX
  config.model.image = dict(patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2,
                            posemb_grid=4, pool_type="map")
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.out_dim = (None, 32)
  config.objectives.silc.weight = config.objectives.tips.weight = 0.0
  config.input.update(batch_size=8, image_size=32, seq_lens=(12,), max_num_patches=12)
  config.update(evals={}, total_steps=4, mesh=(("data", 1),))
  parts = trainer.build(config)
  batches = pipeline.make_batches(config, parts["batch_sharding"])
  try:
    batch = jax.device_get(next(batches)[1])
  finally:
    batches.close()
  assert batch["patch_mask"].sum(axis=1).min() < 12   # some images have padding already
  padded = dict(batch)
  extra = np.random.default_rng(0).normal(size=(8, 20, 192)).astype(np.float32)
  padded["patches"] = np.concatenate([batch["patches"], extra], axis=1)
  padded["patch_mask"] = np.pad(batch["patch_mask"], ((0, 0), (0, 20)))
  objs, model = parts["objectives"], parts["model"]

  @jax.jit
  def losses(params, b):
    ctx = step.tower_outputs(model, step.tower_params(params, objs), b)
    return {o.name: o.loss(params, b, ctx)[0] for o in objs}
  params = parts["init"](jax.random.key(0), batch).params
  # The decoder's head starts at zero (its loss blind to the image): give it weights.
  head = params["decoder"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(1), head["kernel"].shape) * 0.5
  got = [jax.device_get(losses(params, b)) for b in (batch, padded)]
  assert set(got[0]) == {"contrastive", "locca"}
  for name, value in got[0].items():
    assert abs(value - got[1][name]) <= 1e-6 * max(1, abs(value)), name
