"""One training run per workdir (`siglip_jax.workdir_lease`): a second run refuses at once with
one line naming the first; a lease left by a killed run is taken over (at once on the same
machine, once stale elsewhere); racing runs never both win.

The unit tests drive the lease with a fake clock; the end-to-end test runs the training CLI
twice on one workdir as a user would, then kill -9's the winner and reruns it.
"""
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, TINY_DEMO, cli_env, run_module
from siglip_jax import errors, process_liveness, workdir_lease
from siglip_jax.workdir_lease import WorkdirInUseError, WorkdirLease, WorkdirLeaseError
from test_remote_workdir import gcs  # noqa: F401  (the fake gs:// bucket fixture)

NOW = 1_700_000_000.0


class FakeTime:
  """A wall clock that moves only when the lease sleeps; `on_sleep(fake)` runs at each sleep."""

  def __init__(self, now=NOW, on_sleep=None):
    self.now, self.on_sleep = now, on_sleep

  def __call__(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds
    if self.on_sleep:
      self.on_sleep(self)


def _lease(workdir, now=NOW, clock=None, **kw):
  clock = clock or FakeTime(now)
  return WorkdirLease(workdir, clock=clock, sleep=clock.sleep, **kw)


def _read(workdir):
  with open(os.path.join(workdir, workdir_lease.LEASE_NAME)) as f:
    return json.load(f)


def _write(workdir, **fields):
  """A lease left by some other run: this host's identity unless `fields` say otherwise."""
  record = {"run_id": "other", **process_liveness.host_identity(), "pid": os.getpid(),
            "pid_start": process_liveness.process_start(os.getpid()), "process_count": 1,
            "started": NOW - 100, "refreshed": NOW, "refresh_every": 5.0, **fields}
  with open(os.path.join(workdir, workdir_lease.LEASE_NAME), "w") as f:
    json.dump(record, f)


def _dead_pid():
  """The pid and start time of a process that has ended (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  start = process_liveness.process_start(proc.pid)
  proc.kill()
  proc.wait()
  return proc.pid, start


# --------------------------------------------------------------------------- acquire / refuse

def test_acquire_writes_the_lease_and_release_removes_it(tmp_path):
  lease = _lease(tmp_path, process_count=4).acquire()
  try:
    got = _read(tmp_path)
    assert got["run_id"] == lease.run_id and got["pid"] == os.getpid()
    assert got["host"] == socket.gethostname() and got["process_count"] == 4
    assert got["started"] == got["refreshed"] == NOW
    assert got["pid_start"] == process_liveness.process_start(os.getpid())
  finally:
    lease.release()
  assert os.listdir(tmp_path) == []   # no lease, no temporary files left
  lease.release()   # twice is harmless


def test_a_second_run_is_refused_with_one_line_naming_the_first(tmp_path):
  first = _lease(tmp_path).acquire()
  try:
    with pytest.raises(WorkdirInUseError) as e:
      _lease(tmp_path, now=NOW + 7).acquire()
    message = str(e.value)
    assert "\n" not in message
    assert f"workdir {tmp_path} is in use by another training run" in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}," in message
    assert "refreshed 7s ago" in message
    assert isinstance(e.value, errors.UserError)   # the CLIs print it as `error: ...`, rc 2
    assert _read(tmp_path)["run_id"] == first.run_id   # untouched
  finally:
    first.release()


def test_a_live_process_on_this_host_holds_its_lease(tmp_path):
  # However long ago it refreshed (a run stopped with Ctrl-Z): that very process still runs.
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  try:
    _write(tmp_path, pid=proc.pid, pid_start=process_liveness.process_start(proc.pid),
           refreshed=NOW - 3600)
    with pytest.raises(WorkdirInUseError, match=f"pid {proc.pid},.*refreshed 3600s ago"):
      _lease(tmp_path).acquire()
  finally:
    proc.kill()
    proc.wait()


def test_another_machines_run_is_refused_once_it_refreshes(tmp_path):
  # Its pid says nothing here: the run is alive if its lease is refreshed while we look.
  _write(tmp_path, host="elsewhere", refreshed=NOW - 3)
  def owner_refreshes(clock):
    if clock.now >= NOW + 2:
      _write(tmp_path, host="elsewhere", refreshed=clock.now)
  clock = FakeTime(on_sleep=owner_refreshes)
  with pytest.raises(WorkdirInUseError, match="host elsewhere, pid"):
    _lease(tmp_path, clock=clock).acquire()
  assert clock.now - NOW <= 5   # within one of its refresh intervals
  assert _read(tmp_path)["run_id"] == "other"


# --------------------------------------------------------------------------- stale leases

def test_a_lease_not_refreshed_is_taken_over_once_stale(tmp_path, caplog):
  _write(tmp_path, host="elsewhere", refreshed=NOW - 31)
  clock = FakeTime()
  lease = _lease(tmp_path, clock=clock, stale_after=30).acquire()   # at once
  lease.release()
  assert clock.now == NOW
  # A machine that stopped refreshing 5 s ago (killed): waited on, then taken over.
  _write(tmp_path, host="elsewhere", refreshed=NOW - 5)
  with caplog.at_level(logging.WARNING, logger="siglip_jax.workdir_lease"):
    lease = _lease(tmp_path, clock=clock, stale_after=30).acquire()
  try:
    assert 25 <= clock.now - NOW <= 27
    assert _read(tmp_path)["run_id"] == lease.run_id
    assert "is not being refreshed" in caplog.text and "took over the lease" in caplog.text
  finally:
    lease.release()


def test_a_dead_pid_on_this_host_is_stale_at_once(tmp_path):
  pid, start = _dead_pid()
  _write(tmp_path, pid=pid, pid_start=start)   # refreshed just now
  clock = FakeTime()
  lease = _lease(tmp_path, clock=clock).acquire()
  try:
    assert _read(tmp_path)["run_id"] == lease.run_id and clock.now == NOW
  finally:
    lease.release()
  # The same dead pid on another machine, boot or pid namespace proves nothing.
  here = process_liveness.host_identity()
  for other in ({"host": "elsewhere"}, {"pid_ns": "pid:[1]"}, {"boot_id": "another-boot"}):
    record = {**here, "pid": pid, "pid_start": start, "refreshed": NOW, **other}
    assert workdir_lease.stale_reason(record, now=NOW) is None
  assert workdir_lease.stale_reason({**here, "pid": pid, "pid_start": start, "refreshed": NOW},
                                    now=NOW) == f"its process {pid} is gone on this host"


def test_a_zombie_pid_is_stale(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  try:
    deadline = time.monotonic() + 30
    while (process_liveness.proc_stat(proc.pid) or ("Z",))[0] != "Z":   # exited, not reaped
      assert time.monotonic() < deadline
      time.sleep(0.02)
    assert process_liveness.process_gone(proc.pid, None) == (
        f"its process {proc.pid} is gone (a zombie)")
  finally:
    proc.wait()


def test_a_reused_pid_is_not_the_run_that_held_the_lease(tmp_path):
  mine = process_liveness.process_start(os.getpid())
  assert mine is not None
  # Our pid is alive, but it started at another time than the lease's process: reused.
  here = process_liveness.host_identity()
  assert workdir_lease.stale_reason({**here, "pid": os.getpid(), "pid_start": mine + 1,
                                     "refreshed": NOW}, now=NOW) == (
      f"its pid {os.getpid()} is now another process on this host")
  assert workdir_lease.stale_reason({**here, "pid": os.getpid(), "pid_start": mine,
                                     "refreshed": NOW}, now=NOW) is None
  _write(tmp_path, pid_start=mine + 1)
  _lease(tmp_path).acquire().release()


def test_an_unreadable_lease_is_stale_only_once_old(tmp_path):
  path = tmp_path / workdir_lease.LEASE_NAME
  path.write_bytes(b"{not json")
  t = os.stat(path).st_mtime
  with pytest.raises(WorkdirInUseError, match="unreadable"):
    _lease(tmp_path, now=t + 10).acquire()
  _lease(tmp_path, now=t + workdir_lease.STALE_SECONDS + 1).acquire().release()


# --------------------------------------------------------------------------- races

def _race(workdir, n=6):
  """n runs acquire at once; -> (winners, losers' errors)."""
  barrier = threading.Barrier(n)
  won, lost = [], []

  def one():
    lease = _lease(workdir)
    barrier.wait()
    try:
      won.append(lease.acquire())
    except WorkdirInUseError as e:
      lost.append(e)

  threads = [threading.Thread(target=one) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  for lease in won:
    lease.release()
  return won, lost


@pytest.mark.parametrize("stale", [False, True], ids=["empty", "stale_lease"])
def test_racing_runs_exactly_one_wins(tmp_path, monkeypatch, stale):
  # Everyone reads the lease (absent, or stale) before anyone writes: a check-then-write
  # acquisition, or a takeover that deletes what it judged stale by name, lets several win.
  read = WorkdirLease._read
  monkeypatch.setattr(WorkdirLease, "_read", lambda self: (read(self), time.sleep(0.05))[0])
  if stale:
    _write(tmp_path, host="elsewhere", refreshed=NOW - 3600)
  won, lost = _race(tmp_path)
  assert len(won) == 1 and len(lost) == 5, (won, lost)
  assert sorted(os.listdir(tmp_path)) == []   # the winner released; nothing left aside


# --------------------------------------------------------------------------- refresh / lost

def test_the_owner_refreshes_and_notices_a_takeover(tmp_path):
  lease = WorkdirLease(tmp_path, refresh_every=0.02).acquire()
  try:
    first = _read(tmp_path)["refreshed"]
    deadline = time.monotonic() + 30
    while _read(tmp_path)["refreshed"] == first:
      assert time.monotonic() < deadline, "never refreshed"
      time.sleep(0.02)
    assert lease._thread.daemon   # never keeps the process alive
    _write(tmp_path, run_id="usurper", host="elsewhere", refreshed=time.time())
    assert lease.lost.wait(timeout=30)
  finally:
    lease.release()
  assert _read(tmp_path)["run_id"] == "usurper"   # a lease no longer ours is left alone


# --------------------------------------------------------------------------- bad workdirs

def test_a_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("x")
  with pytest.raises(WorkdirLeaseError, match=f"workdir {path} is a file"):
    _lease(path).acquire()


def test_a_read_only_workdir_is_one_clear_error(tmp_path, monkeypatch):
  # As root a chmod does not stop writes: a read-only mount answers EROFS, as simulated here.
  def read_only(self, data):
    raise OSError(errno.EROFS, "Read-only file system", self._tmp)
  monkeypatch.setattr(WorkdirLease, "_write_tmp", read_only)
  with pytest.raises(WorkdirLeaseError, match=f"workdir {tmp_path} is on a read-only file"):
    _lease(tmp_path).acquire()


# --------------------------------------------------------------------------- gs://

def test_best_effort_lease_on_a_bucket(gcs):  # noqa: F811
  url = "gs://bucket/run"
  lease = _lease(url, settle=0).acquire()
  assert json.loads(gcs.cat(url + "/" + workdir_lease.LEASE_NAME))["run_id"] == lease.run_id
  with pytest.raises(WorkdirInUseError, match=url):
    _lease(url, settle=0).acquire()
  lease.release()
  assert not gcs.exists(url + "/" + workdir_lease.LEASE_NAME)


def test_a_racer_that_writes_last_on_a_bucket_wins(gcs):  # noqa: F811
  url = "gs://bucket/run"
  path = url + "/" + workdir_lease.LEASE_NAME
  # The racer writes while this run waits for its write to settle; the racer is alive here.
  racer = {"run_id": "racer", **process_liveness.host_identity(), "pid": os.getpid(),
           "refreshed": NOW, "started": NOW}
  clock = FakeTime(on_sleep=lambda _: gcs.pipe(path, json.dumps(racer).encode()))
  with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()},"):
    _lease(url, clock=clock, settle=1).acquire()


# --------------------------------------------------------------------------- end to end

STEPS = 60   # the rerun trains what is left after the first checkpoint (step 10)


def _train_args(workdir):
  return [*TINY_DEMO, f"--workdir={workdir}", f"--config.total_steps={STEPS}",
          "--config.checkpoint.every_steps=10", "--config.log_every_steps=10"]


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _error_lines(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


def test_two_runs_on_one_workdir_then_kill_9_and_resume(tmp_path):
  """Two copies of one command start together: one trains, the other refuses at start (rc 2,
  one line naming the workdir and the winner). A two-process run refused by a lease refuses
  on every process and none hangs. kill -9 of the winner; the rerun takes over and resumes."""
  workdir, busy = str(tmp_path / "run"), str(tmp_path / "busy")
  lease_path = os.path.join(workdir, workdir_lease.LEASE_NAME)
  os.makedirs(busy)
  held = WorkdirLease(busy).acquire()   # another run, alive and refreshing: this test
  procs, outs, errs, two = [], [], [], None
  try:
    # All started at once, so their start-ups overlap (this is the slow part on 2 cores).
    for i in range(2):
      outs.append(open(tmp_path / f"copy_{i}.out", "w+"))
      errs.append(open(tmp_path / f"copy_{i}.err", "w+"))
      procs.append(subprocess.Popen([sys.executable, "-m", "siglip_jax.train",
                                     *_train_args(workdir)], cwd=REPO, env=cli_env(1),
                                    stdout=outs[i], stderr=errs[i]))
    two = subprocess.Popen(
        [os.path.join(REPO, "launch", "local.sh"), "-n", "2", "-d", "1", "--logdir",
         str(tmp_path / "logs"), "--", *_train_args(busy)], cwd=REPO,
        env=cli_env(1, PYTHON=sys.executable), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs):
      assert time.monotonic() < deadline, "neither copy stopped"
      time.sleep(0.05)
    loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
    winner = procs[1 - loser]
    err = (tmp_path / f"copy_{loser}.err").read_text()
    assert procs[loser].returncode == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"workdir {workdir} is in use by another training run" in lines[0]
    assert f"host {socket.gethostname()}, pid {winner.pid}," in lines[0]
    assert "devices x" not in (tmp_path / f"copy_{loser}.out").read_text()   # before any compile
    assert winner.poll() is None   # ... while the other trains
    # Every process of the refused two-process run says so and exits; none waits for a peer.
    two.wait(timeout=300)
    assert two.returncode == 2
    for i in (0, 1):
      log = (tmp_path / "logs" / f"process_{i}.log").read_text()
      assert len(_error_lines(log)) == 1 and "Traceback" not in log, log[-3000:]
      assert f"error: workdir {busy} is in use by another training run" in log
      assert f"pid {os.getpid()}," in log
    while not _committed(workdir):
      assert winner.poll() is None and time.monotonic() < deadline, (
          (tmp_path / f"copy_{1 - loser}.err").read_text()[-3000:])
      time.sleep(0.02)
  finally:
    held.release()
    for p in procs:
      p.kill()   # kill -9: the winner mid-run
      p.wait()
    if two is not None and two.poll() is None:   # a failed test: local.sh stops its processes
      two.terminate()
      two.wait(timeout=60)
    for f in outs + errs:
      f.close()
  saved = _committed(workdir)[-1]
  assert saved < STEPS and os.path.exists(lease_path)   # killed mid-run, its lease left behind
  # The rerun of the same command takes over the dead run's lease at once, resumes, finishes.
  rerun = run_module("siglip_jax.train", _train_args(workdir), timeout=300)
  assert f"resuming at step {saved}" in rerun.stdout
  assert f"[{STEPS}/{STEPS}]" in rerun.stdout
  assert "took over the lease" in rerun.stderr
  assert not os.path.exists(lease_path)   # released at the end
