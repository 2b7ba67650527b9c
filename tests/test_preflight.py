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

import jax
import ml_collections  # noqa: F401  (the config module needs it)
import pytest

from conftest import TINY_DEMO, run_module

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
