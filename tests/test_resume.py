"""End to end: the real trainer, preempted (SIGTERM) or killed (SIGKILL), resumes exactly.

Each run is `python -m siglip_jax.train` on a tiny model of the SigLIP 2 demo (conftest's
TINY_SIGLIP2: the sigmoid loss and the LocCa decoder on the scenes set, SILC and TIPS from step 11
of 12: the decoder's and the heads' parameters and optimizer state, the EMA teacher, the regions
and the views in the data resume with the rest), as a user would start it; the reference is the
same command run once without interruption (conftest's `siglip2_run`, which test_locca_run reads
too). The SIGTERM test's runs are that command; the others leave out its scenes evaluation after
the last step (`no_eval_args` below): it comes after the last save and changes no weight. The
SIGTERM test's restart keeps it: it must compile nothing the reference compiled, the evaluation's
programs included.
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
from conftest import SIGLIP2_DEVICES, SIGLIP2_STEPS as TOTAL, TINY_SIGLIP2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The session's compilation cache (conftest) for every program, and its log lines: a restart
# must find every program the reference run compiled (one that lowers differently from process
# to process, e.g. by iterating a set of strings, is compiled again at every restart).
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={SIGLIP2_DEVICES}",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_DEBUG_LOG_MODULES="jax._src.compiler")
CACHE_MISS = "PERSISTENT COMPILATION CACHE MISS"


SWITCH = round(0.8 * TOTAL)   # 10: SILC and TIPS start after this many updates


@pytest.fixture(scope="module")
def no_eval_args(tmp_path_factory):
  """The command line of the kill and switch tests' runs, less `python -m siglip_jax.train`:
  TINY_SIGLIP2 on the demo config less its `evals` (a config file written here: a flag cannot
  remove a block); the steps, saves and restores are the same programs."""
  path = tmp_path_factory.mktemp("config") / "siglip2_demo_without_evals.py"
  path.write_text(f"""\
import importlib.util
_spec = importlib.util.spec_from_file_location(
    "siglip2_demo", {os.path.join(ROOT, "configs", "siglip2_demo.py")!r})
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config(arg=None):
  config = _demo.get_config(arg)
  config.evals = {{}}
  return config
""")
  assert TINY_SIGLIP2[0] == "--config=configs/siglip2_demo.py"
  return [f"--config={path}"] + [a for a in TINY_SIGLIP2[1:]
                                 if not a.startswith("--config.evals.")]


def _start(args, workdir, every_steps, log):
  cmd = [sys.executable, "-m", "siglip_jax.train", *args, f"--workdir={workdir}",
         f"--config.checkpoint.every_steps={every_steps}", "--config.checkpoint.keep=30"]
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _run(args, workdir, every_steps, log_path, timeout=120):
  with open(log_path, "a") as log:
    proc = _start(args, workdir, every_steps, log)
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
def reference_run(siglip2_run):
  """The uninterrupted run, with a checkpoint at every step (all kept)."""
  assert _committed(siglip2_run) == list(range(1, TOTAL + 1))
  return siglip2_run


@pytest.fixture(scope="module")
def reference(reference_run):
  return dict(_logged(reference_run)), checkpoint.read_params(reference_run)


def test_sigterm_then_resume_is_exact(tmp_path, reference):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  with open(log_path, "w") as log:
    proc = _start(TINY_SIGLIP2, workdir, 10, log)   # the reference's command
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
  text = _run(TINY_SIGLIP2, workdir, 10, log_path).rsplit("=== restart", 1)[-1]
  assert f"resuming at step {saved}" in text
  misses = [line for line in text.splitlines() if CACHE_MISS in line]
  assert not misses, "the restart compiled again what the reference run compiled:\n" + \
      "\n".join(misses)
  _assert_matches_reference(workdir, reference)


def _tmp_dirs(workdir):
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def test_kill_9_at_random_moments_then_finish(tmp_path, reference, no_eval_args):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  rng = random.Random(0)
  resumed, half_written = [], []
  for kill in ("mid-write", "random"):
    before = _committed(workdir)
    with open(log_path, "a") as log:
      log.write(f"\n=== attempt: kill {kill}, committed {before}\n")
      log.flush()
      proc = _start(no_eval_args, workdir, 4, log)
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
  text = _run(no_eval_args, workdir, 4, log_path).rsplit("=== final attempt", 1)[-1]
  assert f"resuming at step {before[-1]}" in text, text[-3000:]
  assert not _tmp_dirs(workdir)   # cleaned at start-up
  _assert_matches_reference(workdir, reference)


STOPS = (SWITCH - 1, SWITCH, SWITCH + 1)


@pytest.fixture(scope="module")
def switch_restarts(tmp_path_factory, reference_run, no_eval_args):
  """The test below's three restarts, each from a copy of the reference's checkpoint at its
  stop, started together (independent runs: on 2 cores three take little more time than two
  one after another). Each saves its last step only (always saved), the one compared.
  Returns {stop: (workdir, returncode, log)}."""
  started = {}
  for stop in STOPS:
    tmp = tmp_path_factory.mktemp(f"stopped_at_{stop}")
    workdir = tmp / "run"
    shutil.copytree(os.path.join(reference_run, "checkpoints", str(stop)),
                    workdir / "checkpoints" / str(stop))
    log = open(tmp / "log.txt", "w")
    started[stop] = (workdir, log, _start(no_eval_args, workdir, TOTAL, log))
  done = {}
  for stop, (workdir, log, proc) in started.items():
    try:
      rc = proc.wait(timeout=300)   # generous: three at once on a loaded machine
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = f"killed after 300 s: {proc.wait()}"
    log.close()
    done[stop] = (workdir, rc, open(log.name).read())
  return done


@pytest.mark.parametrize("stop", STOPS)
def test_stopped_before_at_and_after_the_switch_resumes_exactly(switch_restarts, reference, stop):
  """A run stopped with its checkpoint at step `stop` (SILC/TIPS start after SWITCH completed
  updates) and resumed ends where the uninterrupted run ends, bit for bit: the switch happens
  once, at the same step, with the same fresh heads, and the teacher and views resume."""
  workdir, rc, text = switch_restarts[stop]
  assert rc == 0, text[-3000:]
  assert f"resuming at step {stop}" in text
  ref_losses, ref_params = reference
  logged = dict(_logged(workdir))
  assert set(logged) == set(range(stop + 1, TOTAL + 1))
  for s, loss in logged.items():
    assert loss == ref_losses[s], f"step {s}: {loss} != {ref_losses[s]} (uninterrupted)"
  params = checkpoint.read_params(workdir)
  for name, value in params.items():
    assert np.array_equal(value, ref_params[name]), name
