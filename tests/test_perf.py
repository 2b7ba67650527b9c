"""What a demo run measures: every metric name design.md lists, TensorBoard events beside
metrics.jsonl, the console progress line, the profiler trace; and perf's small helpers."""
import glob
import json
import math
import os

import pytest

from siglip_jax import perf, tensorboard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_NAMES = ["train/loss", "train/t", "train/b", "train/lr", "train/grad_norm",
               "train/param_norm", "train/update_norm", "train/pos_logit", "train/neg_logit",
               "train/pairs_per_s", "perf/tflops_per_device", "perf/hw_tflops_per_device", "perf/mfu",
               "perf/device_mem_gib", "perf/data_wait_s", "data/skipped"]
EVAL_NAMES = ["shapes/zeroshot_top1", "shapes/zeroshot_top1_unseen", "shapes/retrieval_i2t_r1",
              "shapes/retrieval_t2i_r1", "shapes/retrieval_i2t_r5", "shapes/retrieval_t2i_r5"]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_demo_run_logs_every_measurement(tiny_run):
  rows = _rows(tiny_run["workdir"])
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  for row in train_rows:
    missing = [n for n in TRAIN_NAMES if n not in row]
    assert not missing, missing
    assert row["perf/tflops_per_device"] > 0 and row["train/pairs_per_s"] > 0
    # The demo turns remat off; its 2 micro-batches add one forward of the towers: more than
    # the model FLOPs, less than 4/3 of them (a forward is a third of a train step).
    assert row["perf/tflops_per_device"] < row["perf/hw_tflops_per_device"] < \
        4 / 3 * row["perf/tflops_per_device"]
    assert row["perf/device_mem_gib"] > 0
    assert row["perf/mfu"] == "nan"          # no peak FLOP/s for CPUs: said, not invented
  evals = {k for r in rows for k in r}
  assert not [n for n in EVAL_NAMES if n not in evals]
  out = tiny_run["stdout"]
  assert "[6/6] loss" in out and "pairs/s" in out and "ETA" in out
  assert "--config.peak_tflops" in out        # why perf/mfu is NaN


def test_demo_run_writes_tensorboard_events(tiny_run):
  scalars = tensorboard.read_scalars(tiny_run["workdir"])
  assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
  assert "perf/tflops_per_device" in scalars and "shapes/zeroshot_top1" in scalars
  assert "perf/mfu" not in scalars            # NaN has no place in a TensorBoard chart


def test_profile_trace_written(tiny_run):
  run_dirs = glob.glob(os.path.join(tiny_run["workdir"], "profile", "plugins", "profile", "*"))
  assert len(run_dirs) == 1
  files = os.listdir(run_dirs[0])
  assert any(f.endswith(".xplane.pb") for f in files), files      # TensorBoard's profile plugin
  assert any(f.endswith("trace.json.gz") for f in files), files   # Perfetto


def test_parse_steps():
  assert perf.parse_steps("") is None and perf.parse_steps(None) is None
  assert perf.parse_steps("3,5") == (3, 5) and perf.parse_steps(" 4 ") == (4, 4)
  for bad in ("5,3", "0,2", "a,b", "1,2,3"):
    with pytest.raises(ValueError, match="profile_steps"):
      perf.parse_steps(bad)


def _demo_config(name="demo.py"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs",
                                                                            name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_bad_profile_steps_is_a_config_error():
  from siglip_jax import experiment
  config = _demo_config()
  config.profile_steps = "9,1"
  with pytest.raises(experiment.ConfigError, match="profile_steps"):
    experiment.check_config(config)


def test_device_memory_and_mfu_override():
  gib, source = perf.device_memory_gib()
  assert gib > 0 and source in ("device", "host_rss")

  from siglip_jax import experiment
  config = _demo_config()
  config.peak_tflops = 2.0
  model, _ = experiment.make_model(config, 64)
  meter = perf.PerfMeter(config, model, enabled=False)
  m = meter.metrics(pairs_per_s=1000.0)
  assert m["perf/mfu"] == pytest.approx(m["perf/tflops_per_device"] / 2.0)
  assert math.isfinite(m["perf/device_mem_gib"])


def test_hw_tflops_counts_remat_and_the_microbatch_forward():
  """perf/hw_tflops_per_device over perf/tflops_per_device is hardware over model FLOPs per
  pair, with K read from the config, per NaFlex length and per set of active objectives."""
  from siglip_jax import experiment, flops
  for name, seq_len in (("demo.py", None), ("naflex_demo.py", 32), ("naflex_demo.py", None)):
    config = _demo_config(name)
    config.input.microbatches = 4
    config.model.image["remat_policy"] = "nothing_saveable"
    model, _ = experiment.make_model(config, 64)
    meter = perf.PerfMeter(config, model, enabled=False)
    m = meter.metrics(pairs_per_s=1000.0, active=("contrastive",), seq_len=seq_len)
    if seq_len is None and name == "naflex_demo.py":
      seq_len = 64                                      # the longest length
    size = config.input.image_size if seq_len is None else (seq_len * 8, 8)
    kw = dict(image_size=size, text_len=config.input.text_len, global_batch=128)
    expected = flops.hw_train_flops_per_pair(model, microbatches=4, **kw)
    assert expected > flops.train_flops_per_pair(model, **kw) + flops.towers_forward_flops(
        model, image_size=size, text_len=config.input.text_len)   # remat counted too
    assert m["perf/hw_tflops_per_device"] / m["perf/tflops_per_device"] == pytest.approx(
        expected / flops.train_flops_per_pair(model, **kw), rel=1e-9), name
    assert m["perf/tflops_per_device"] == pytest.approx(
        flops.train_flops_per_pair(model, **kw) * 1000.0 / meter.num_devices / 1e12)
