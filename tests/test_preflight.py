"""`python -m siglip_jax.preflight`: per-device memory of the configured step on simulated devices.

What is compared: the preflight's per-device total (params + optimizer state + other state from
the state's shardings, the batch slice from the batch sharding, plus XLA's temp and the outputs
that reuse no donated buffer) against XLA's own buffer assignment of the compiled step
(`argument + output - alias + temp` of `compiled.memory_analysis()`), computed here by compiling
the same step in this process.
"""
import json
import math

import jax
import ml_collections  # noqa: F401  (the config module needs it)
import pytest

from conftest import TINY_DEMO, run_module

DEVICE_ENV_NOTE = "the subprocess starts with 1 device: the preflight must give itself N"


def _report(proc):
  line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
  return json.loads(line)


def _demo_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_cfg", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_demo_on_8_devices_matches_compiled_memory(repo, monkeypatch):
  monkeypatch.chdir(repo)
  proc = run_module("siglip_jax.preflight",
                    ["--config=configs/demo.py", "--devices=8", "--chip=H100"], devices=1)
  r = _report(proc)
  assert (r["devices"], r["mesh"], r["per_device_batch"]) == (8, {"data": 8}, 16), DEVICE_ENV_NOTE
  assert r["fits"] and "fits" in proc.stdout and "H100" in proc.stdout
  mine = r["per_device_bytes"]
  assert mine["total"] == sum(v for k, v in mine.items() if k != "total")

  # The same step, compiled here on this process's 8 devices (tests/conftest.py).
  assert jax.device_count() == 8
  from siglip_jax import preflight, trainer
  config = _demo_config()
  parts = trainer.build(config)
  state = preflight._with_shardings(parts["abstract_state"], parts["state_sharding"])
  batch = preflight.abstract_batch(config, parts["batch_sharding"])
  ma = parts["train_step"].lower(state, batch).compile().memory_analysis()
  compiled = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
              + ma.temp_size_in_bytes)
  assert abs(mine["total"] - compiled) <= 0.2 * compiled, (mine, compiled)
  # Replicated float32 params: every device holds all of them.
  n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
      parts["abstract_state"].params))
  assert mine["params"] == 4 * n_params
  assert mine["opt_state"] >= 2 * mine["params"]          # AdamW: mu and nu


def test_fsdp_shards_params_and_optimizer_state(repo):
  args = ["--config=configs/demo.py", *TINY_DEMO[1:], "--devices=8", "--chip=v5e",
          "--config.mesh=(('data', 2), ('fsdp', 4))", "--config.sharding_rules=(('.*', 'fsdp'),)"]
  fsdp = _report(run_module("siglip_jax.preflight", args, devices=1))
  plain = _report(run_module("siglip_jax.preflight", args[:-2] + ["--config.mesh=(('data', -1),)"],
                             devices=1))
  assert fsdp["mesh"] == {"data": 2, "fsdp": 4} and fsdp["chip"] == "v5e"
  # Largest dims divisible by 4 are sharded 4 ways; the rest (t, b, odd shapes) stay whole.
  ratio = fsdp["per_device_bytes"]["params"] / plain["per_device_bytes"]["params"]
  assert 0.25 <= ratio < 0.4, ratio
  c = fsdp["compiled_bytes"]
  assert abs(fsdp["per_device_bytes"]["total"] - c["total"]) <= 0.2 * c["total"]


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
