"""`python -m siglip_jax.preflight`: per-device memory of the configured step on simulated devices.

What is compared: the preflight's per-device total (params + optimizer state + other state from
the state's shardings, the batch slice from the batch sharding, plus XLA's temp and the outputs
that reuse no donated buffer; the demo is float32, so the activation scale is 1) against XLA's own
buffer assignment of the same compiled step, `argument + output - alias + temp` of
`compiled.memory_analysis()`, which the preflight reports beside it. The parameter bytes are
also checked against a count made here from the model's abstract parameters.
"""
import ast
import json
import math
import subprocess
import sys

import jax
import ml_collections  # the config module needs it
import pytest

from conftest import TINY_DEMO, cli_env, run_module

DEVICE_ENV_NOTE = "the subprocess starts with 1 device: the preflight must give itself N"


def _report(proc):
  line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
  return json.loads(line)


def _abstract_params(args):
  """The model's abstract parameters for a config file + overrides, built here (no compiling)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for arg in args:
    key, _, value = arg[len("--config."):].partition("=")
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = ast.literal_eval(value) if value[:1] in "(0123456789-[" else value
  from siglip_jax import trainer
  return trainer.build(config)["abstract_state"].params


def _param_bytes(params):
  return sum(4 * math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def test_demo_on_8_devices_matches_compiled_memory(repo, monkeypatch):
  monkeypatch.chdir(repo)
  proc = run_module("siglip_jax.preflight",
                    ["--config=configs/demo.py", "--devices=8", "--chip=H100"], devices=1)
  r = _report(proc)
  assert (r["devices"], r["mesh"], r["per_device_batch"]) == (8, {"data": 8}, 16), DEVICE_ENV_NOTE
  assert r["fits"] and r["activation_scale"] == 1.0 and "H100" in proc.stdout
  mine, compiled = r["per_device_bytes"], r["compiled_bytes"]["total"]
  assert mine["total"] == sum(v for k, v in mine.items() if k != "total")
  assert abs(mine["total"] - compiled) <= 0.2 * compiled, (mine, r["compiled_bytes"])
  # Replicated float32 params: every device holds all of them; AdamW keeps two moments.
  assert mine["params"] == _param_bytes(_abstract_params([]))
  assert mine["opt_state"] >= 2 * mine["params"]


_REMAT_PROBE = """
import jax, jax.numpy as jnp
def block(w, x):
  return x + jnp.tanh(jnp.tanh(x @ w[0]) @ w[1]) @ w[2]
def temp(remat):
  b = jax.checkpoint(block, prevent_cse=True) if remat else block
  def loss(ws, x):
    for w in ws:
      x = b(w, x)
    return jnp.sum(x ** 2)
  s = jax.ShapeDtypeStruct
  ws = [[s((64, 256), "float32"), s((256, 256), "float32"), s((256, 64), "float32")]] * 6
  return jax.jit(jax.grad(loss)).lower(ws, s((2048, 64), "float32")).compile(
      ).memory_analysis().temp_size_in_bytes
print(temp(False), temp(True))
"""


def test_remat_saves_memory_in_preflights_compiles(repo):
  """Under preflight's XLA flags, jax.checkpoint'd blocks keep only their inputs (as on an
  accelerator); with XLA:CPU's defaults the recompute is merged away and nothing is saved."""
  from siglip_jax import preflight
  env = cli_env(1)
  assert preflight.simulate_devices(8, env) and not preflight.simulate_devices(8, env)
  assert "--xla_disable_hlo_passes=cse_barrier_expander" in env["XLA_FLAGS"]
  both = {}
  for name, e in (("preflight", env), ("default", cli_env(1))):
    proc = subprocess.run([sys.executable, "-c", _REMAT_PROBE], cwd=repo, env=e,
                          capture_output=True, text=True, timeout=120, check=True)
    both[name] = [int(x) for x in proc.stdout.split()]
  plain, remat = both["preflight"]
  assert remat < 0.5 * plain, both
  assert both["default"][1] == both["default"][0], both   # why the flag is needed


def test_fsdp_shards_params_and_optimizer_state(repo, monkeypatch):
  monkeypatch.chdir(repo)
  tiny = [a for a in TINY_DEMO[1:] if a.startswith("--config.")]
  args = ["--config=configs/demo.py", *tiny, "--devices=8", "--chip=v5e",
          "--config.mesh=(('data', 2), ('fsdp', 4))", "--config.sharding_rules=(('.*', 'fsdp'),)",
          "--config.fsdp_min_size_mb=0"]
  r = _report(run_module("siglip_jax.preflight", args, devices=1))
  assert r["mesh"] == {"data": 2, "fsdp": 4} and r["chip"] == "v5e"
  # Dimensions divisible by 4 are split 4 ways; t, b and odd shapes stay whole.
  ratio = r["per_device_bytes"]["params"] / _param_bytes(_abstract_params(tiny))
  assert 0.25 <= ratio < 0.4, ratio
  assert r["per_device_bytes"]["opt_state"] < 2.5 * r["per_device_bytes"]["params"]
  c = r["compiled_bytes"]
  assert abs(r["per_device_bytes"]["total"] - c["total"]) <= 0.2 * c["total"]


def test_rejects_a_config_that_cannot_fit(repo):
  """So400m/14 at global batch 4096 on 8 H100s without remat: activations do not fit."""
  args = ["--config=configs/siglip_b16_224.py:So400m/14", "--devices=8", "--chip=H100",
          "--config.input.batch_size=4096",
          # scan: one compiled layer, so the check takes seconds; remat off: the mistake.
          "--config.model.image.scan=True", "--config.model.text.scan=True",
          "--config.model.image.remat_policy=none", "--config.model.text.remat_policy=none"]
  proc = run_module("siglip_jax.preflight", args, devices=1, check=False)
  assert proc.returncode != 0
  r = _report(proc)
  assert not r["fits"] and r["per_device_batch"] == 512
  assert "exceeds H100's 80 GiB" in proc.stderr and "activations" in proc.stderr
  assert "remat" in proc.stderr and "fsdp" in proc.stderr and "batch_size" in proc.stderr
  assert "largest: activations" in proc.stderr and "input.microbatches" in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--config.input.batch_size=12"], "input.batch_size"),    # not divisible by 8 devices
    (["--config.loss.kind=triplet"], "loss.kind"),
    (["--chip=v7"], "--chip"),
])
def test_rejects_bad_configs_before_compiling(repo, extra, message):
  proc = run_module("siglip_jax.preflight",
                    ["--config=configs/demo.py", "--devices=8", *extra], devices=1, check=False)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "{" not in proc.stdout   # no report: it stopped before building anything


# ------------------------------------------------------------------------- --max_batch's search

def _memory(fixed, slope, curve=0.0):
  """(f, measure, calls): f(n) the memory at size n; measure is f counting its calls."""
  f = lambda n: fixed + slope * n + curve * n * n  # noqa: E731
  calls = []

  def measure(n):
    calls.append(n)
    return f(n)
  return f, measure, calls


@pytest.mark.parametrize("unit, start, answer", [(8, 128, 2048), (8, 16384, 2048),
                                                 (1, 1, 303), (64, 64 * 700, 64 * 37)])
def test_search_finds_an_affine_limit_in_three_compiles(unit, start, answer):
  from siglip_jax import preflight_search
  fixed, slope = 3e9, 2.5e7
  f, measure, calls = _memory(fixed * 1.1, slope)   # XLA's workspace: a bit above the state
  limit = f(answer + 0.5 * unit)
  n, points, compiles = preflight_search.search(measure, unit, limit, start, 1 << 20, fixed=fixed)
  assert n % unit == 0 and f(n) <= limit and compiles == len(calls) <= 3, (n, calls)
  assert n >= answer * (1 - preflight_search.TOLERANCE) - unit, (n, calls)
  assert set(points) == set(calls)


def test_search_curved_memory_nothing_fits_cap_and_known_points():
  from siglip_jax import preflight_search as ps
  # A [B/d, B] logits buffer: memory curving up; still a fitting answer near the limit.
  f, measure, calls = _memory(1e9, 1e6, curve=50.0)
  limit = f(5000)
  n, _, compiles = ps.search(measure, 8, limit, 256, 1 << 20, fixed=1e9)
  assert f(n) <= limit and n >= 5000 * (1 - ps.TOLERANCE) - 8 and compiles <= 5, calls
  # Not even one row per device.
  _, measure, calls = _memory(1e9, 1e6)
  assert ps.search(measure, 8, 0.5e9, 64, 1 << 20, fixed=1e9)[0] is None
  assert len(calls) <= ps.MAX_COMPILES
  # Everything fits up to the cap: stop there; measured sizes handed in cost nothing.
  f, measure, calls = _memory(1e6, 1.0)
  n, points, compiles = ps.search(measure, 8, 1e12, 4096, 4096, fixed=1e6, known={4096: f(4096)})
  assert (n, compiles) == (4096, 0) and points == {4096: 1e6 + 4096}


@pytest.mark.parametrize("own_k, own_batch", [(1, 256), (16, 4096)])
def test_max_batches_searches_k1_then_the_micro_batch(own_k, own_batch):
  """The search over a memory model: state + activations of the micro-batch + O(B) buffers;
  the report's own compile (the config as it is) is one of the sizes its K's search uses."""
  from siglip_jax import preflight_search as ps
  state, act, extra, usable = 4e9, 3e7, 2e6, 72 * 2**30
  compiled = []

  def estimate(cfg):
    b, k = cfg.input.batch_size, cfg.input.microbatches
    assert b % (k * 8) == 0
    compiled.append((k, b))
    total = int(state + act * b / k + extra * b)
    return {"per_device_bytes": {"total": total}, "total_gib": total / 2**30,
            "fits": total <= usable, "compile_s": 0.0}

  config = ml_collections.ConfigDict({"input": {"batch_size": own_batch,
                                                "microbatches": own_k}})
  own_total = estimate(config)["per_device_bytes"]["total"]
  report = {"batch_devices": 8, "usable_bytes": usable, "microbatches": own_k,
            "global_batch": own_batch, "model": "B/16", "devices": 8, "chip": "H100",
            "per_device_bytes": {"params": 1e9, "opt_state": 2e9, "other_state": 0,
                                 "total": own_total}}
  compiled.clear()
  out = ps.max_batches(config, report, estimate, microbatches_for_max=16)
  assert set(out) == {"1", "16"} and config.input.batch_size == own_batch   # untouched
  best1 = (usable - state) // (act + extra) // 8 * 8
  one, many = out["1"], out["16"]
  assert best1 * (1 - ps.TOLERANCE) - 8 <= one["global_batch"] <= best1
  # K = 16: micro-batch at most K = 1's batch; the global batch 16 x micro-batch.
  best16 = (usable - state) // (act / 16 + extra) // 128 * 128
  assert best16 * (1 - ps.TOLERANCE) - 128 <= many["global_batch"] <= best16
  assert many["global_batch"] == 16 * many["micro_batch"] and many["micro_batch"] <= best1
  assert many["per_device_micro_batch"] == many["micro_batch"] // 8
  assert [own_batch, own_total] in out[str(own_k)]["points"]   # reused, not compiled again
  assert one["compiles"] <= 3 - (own_k == 1) and many["compiles"] <= 3 - (own_k == 16)
  assert len(compiled) == one["compiles"] + many["compiles"]
  assert all(t["total_bytes"] <= usable for t in out.values())
  line = ps.summary(report, out)
  assert line == (f"B/16 on 8 H100: {one['global_batch']:,} pairs fit with K=1; "
                  f"{many['global_batch']:,} with K=16"), line


def test_max_batch_on_the_demo_with_a_small_chip(repo, monkeypatch):
  """--max_batch compiles the tiny demo on one device against a 30 MiB chip: with K=4
  micro-batches (gradient caching: one micro-batch's activations) a larger global batch fits
  than with K=1, and every answer is a compiled size whose total fits."""
  monkeypatch.chdir(repo)
  tiny = [a for a in TINY_DEMO[1:] if a.startswith("--config.") and "batch_size" not in a]
  args = ["--config=configs/demo.py", *tiny, "--config.input.batch_size=128", "--devices=1",
          "--chip=H100", "--hbm_gib=0.03", "--max_batch", "--microbatches_for_max=4"]
  proc = run_module("siglip_jax.preflight", args, devices=1)
  r = _report(proc)
  assert r["hbm_gib"] == 0.03 and r["usable_bytes"] == int(0.03 * 0.9 * 2**30) and r["fits"]
  assert (r["microbatches"], r["micro_batch"], r["per_device_micro_batch"]) == (1, 128, 128)
  one, four = r["max_batch"]["1"], r["max_batch"]["4"]
  for k, a in ((1, one), (4, four)):
    assert a["global_batch"] % k == 0 and a["global_batch"] == k * a["micro_batch"]
    assert a["total_bytes"] <= r["usable_bytes"] and not a["capped"], a
    assert 1 <= a["compiles"] <= 5
    # Every size measured above the answer misses (so far as the search looked).
    assert all((b <= a["global_batch"]) == (v <= r["usable_bytes"]) for b, v in a["points"]), a
  assert [128, r["per_device_bytes"]["total"]] in one["points"]   # the report's compile, reused
  assert four["global_batch"] > 2 * one["global_batch"], (one, four)
  assert four["micro_batch"] <= one["global_batch"]
  last = proc.stdout.splitlines()[-2]
  assert last == (f"the model on 1 H100: {one['global_batch']:,} pairs fit with K=1; "
                  f"{four['global_batch']:,} with K=4"), last
  # The table and the advice with micro-batches.
  from siglip_jax import preflight
  rk = dict(r, microbatches=4, micro_batch=32, per_device_micro_batch=32, fits=False,
            activations_gib=1.0, max_batch=None)
  assert "K=4 micro-batches of 32 (32 per device)" in preflight.table(rk)
  reason = preflight.verdict(dict(rk, max_batch=r["max_batch"]))
  assert "raise input.microbatches (now 4)" in reason
  assert f"lower input.batch_size ({one['global_batch']:,} fits)" in reason
