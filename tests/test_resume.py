"""End to end: the real trainer, preempted (SIGTERM) or killed (SIGKILL), resumes exactly.

Each run is `python -m siglip_jax.train` on a tiny model of the SigLIP 2 demo (the sigmoid loss
and the LocCa decoder on the scenes set, SILC and TIPS from step 19 of 24: the decoder's and the
heads' parameters and optimizer state, the EMA teacher, the regions and the views in the data
resume with the rest), as a user would start it; the reference is the same command run once
without interruption.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from siglip_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 24
TINY = ["--config.model.image.depth=1", "--config.model.text.depth=1",
        "--config.model.image.width=64", "--config.model.text.width=64",
        "--config.model.image.mlp_dim=128", "--config.model.text.mlp_dim=128",
        "--config.model.out_dim=(None, 64)",
        "--config.model.image.num_heads=2", "--config.model.text.num_heads=2",
        "--config.input.batch_size=16", "--config.input.image_size=32",
        "--config.optim.schedule.warmup_steps=2",
        "--config.evals.scenes.every_steps=0", "--config.evals.scenes.num_heldout=16",
        "--config.evals.scenes.num_unseen=16", "--config.evals.scenes.num_probe_train=32",
        f"--config.total_steps={TOTAL}", "--config.log_every_steps=1"]
# The session's compilation cache (conftest) for every program, and its log lines: a restart
# must find every program the reference run compiled (one that lowers differently from process
# to process, e.g. by iterating a set of strings, is compiled again at every restart).
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_DEBUG_LOG_MODULES="jax._src.compiler")
CACHE_MISS = "PERSISTENT COMPILATION CACHE MISS"


SWITCH = 19   # round(0.8 * TOTAL): SILC and TIPS start


def _start(workdir, every_steps, log):
  cmd = [sys.executable, "-m", "siglip_jax.train", "--config=configs/siglip2_demo.py",
         f"--workdir={workdir}", f"--config.checkpoint.every_steps={every_steps}",
         "--config.checkpoint.keep=30", *TINY]
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _run(workdir, every_steps, log_path, timeout=120):
  with open(log_path, "a") as log:
    proc = _start(workdir, every_steps, log)
    rc = proc.wait(timeout=timeout)
  text = open(log_path).read()
  assert rc == 0, text[-3000:]
  return text


def _logged(workdir):
  """Every (step, train/loss) appended to metrics.jsonl, repeats included."""
  out = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      try:
        row = json.loads(line)
      except ValueError:
        continue   # a line cut by kill -9
      if "train/loss" in row:
        out.append((row["step"], row["train/loss"]))
  return out


def _wait_until(proc, ready, timeout=300, poll=0.01):   # generous: a loaded machine
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if ready():
      return True
    time.sleep(poll)
  return False


def _wait_for_step(proc, workdir, step):
  return _wait_until(proc, lambda: any(s >= step for s, _ in _logged(workdir)))


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _assert_matches_reference(workdir, reference):
  ref_losses, ref_params = reference
  logged = _logged(workdir)
  assert {s for s, _ in logged} == set(range(1, TOTAL + 1))
  for s, loss in logged:   # repeated steps (logged, then killed before the save) included
    assert loss == ref_losses[s], f"step {s}: {loss} != {ref_losses[s]} (uninterrupted)"
  params = checkpoint.read_params(workdir)
  assert params.keys() == ref_params.keys()
  assert any(k.startswith("decoder/") for k in params)
  assert any(k.startswith("silc_head/") for k in params) and "mask_token" in params
  for name, value in params.items():
    assert np.array_equal(value, ref_params[name]), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The uninterrupted run, with a checkpoint at every step (all kept)."""
  workdir = tmp_path_factory.mktemp("reference")
  _run(workdir, 1, workdir / "log.txt")
  assert _committed(workdir) == list(range(1, TOTAL + 1))
  return workdir


@pytest.fixture(scope="module")
def reference(reference_run):
  return dict(_logged(reference_run)), checkpoint.read_params(reference_run)


def test_sigterm_then_resume_is_exact(tmp_path, reference):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  with open(log_path, "w") as log:
    proc = _start(workdir, 10, log)
    assert _wait_for_step(proc, workdir, 3), open(log_path).read()[-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    took = time.time() - sent
  text = open(log_path).read()
  assert rc == 0 and took < 60, text[-3000:]
  saved = int(re.search(r"preempted: saved step (\d+)", text).group(1))
  assert 3 <= saved < TOTAL and saved in _committed(workdir)
  with open(log_path, "a") as log:
    log.write("\n=== restart\n")
  text = _run(workdir, 10, log_path).rsplit("=== restart", 1)[-1]
  assert f"resuming at step {saved}" in text
  misses = [line for line in text.splitlines() if CACHE_MISS in line]
  assert not misses, "the restart compiled again what the reference run compiled:\n" + \
      "\n".join(misses)
  _assert_matches_reference(workdir, reference)


def _tmp_dirs(workdir):
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def test_kill_9_at_random_moments_then_finish(tmp_path, reference):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  rng = random.Random(0)
  resumed, half_written = [], []
  for kill in ("mid-write", "random"):
    before = _committed(workdir)
    with open(log_path, "a") as log:
      log.write(f"\n=== attempt: kill {kill}, committed {before}\n")
      log.flush()
      proc = _start(workdir, 4, log)
      if kill == "mid-write":   # the moment orbax starts writing a step
        _wait_until(proc, lambda: _tmp_dirs(workdir), poll=0.002)
      else:   # a few steps on, once a checkpoint is committed, anywhere (a write included)
        done = max([s for s, _ in _logged(workdir)] + [0])
        if _wait_until(proc, lambda: _committed(workdir) and any(
            s >= min(done + 3, TOTAL - 2) for s, _ in _logged(workdir))):
          time.sleep(rng.uniform(0.0, 0.5))
      proc.kill()
      proc.wait(timeout=30)
    half_written += _tmp_dirs(workdir)
    text = open(log_path).read().rsplit("=== attempt", 1)[-1]
    m = re.search(r"resuming at step (\d+)", text)
    resumed.append(int(m.group(1)) if m else 0)
    # A restart resumes from the newest committed checkpoint: never from an older one,
    # never from step 1 once there is one, never from a half-written one.
    assert resumed[-1] == (before[-1] if before else 0), text[-3000:]
  assert half_written, "no kill landed during a checkpoint write"
  before = _committed(workdir)
  assert before, f"no checkpoint was committed before the kills (resumed at {resumed})"
  with open(log_path, "a") as log:
    log.write(f"\n=== final attempt: committed {before}, half-written {half_written}\n")
  text = _run(workdir, 4, log_path).rsplit("=== final attempt", 1)[-1]
  assert f"resuming at step {before[-1]}" in text, text[-3000:]
  assert not _tmp_dirs(workdir)   # cleaned at start-up
  _assert_matches_reference(workdir, reference)


@pytest.mark.parametrize("stop", [SWITCH - 1, SWITCH, SWITCH + 1])
def test_stopped_before_at_and_after_the_switch_resumes_exactly(tmp_path, reference_run,
                                                                 reference, stop):
  """A run stopped with its checkpoint at step `stop` (SILC/TIPS start after SWITCH completed
  updates) and resumed ends where the uninterrupted run ends, bit for bit: the switch happens
  once, at the same step, with the same fresh heads, and the teacher and views resume."""
  workdir = tmp_path / "run"
  shutil.copytree(os.path.join(reference_run, "checkpoints", str(stop)),
                  workdir / "checkpoints" / str(stop))
  text = _run(workdir, 1, tmp_path / "log.txt")
  assert f"resuming at step {stop}" in text
  ref_losses, ref_params = reference
  logged = dict(_logged(workdir))
  assert set(logged) == set(range(stop + 1, TOTAL + 1))
  for s, loss in logged.items():
    assert loss == ref_losses[s], f"step {s}: {loss} != {ref_losses[s]} (uninterrupted)"
  params = checkpoint.read_params(workdir)
  for name, value in params.items():
    assert np.array_equal(value, ref_params[name]), name
