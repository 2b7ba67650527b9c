"""One training run per workdir: the lease file `DIR/.siglip_jax.lease` (docs/multiprocess.md).

Two runs on one workdir collide (checkpoint writes, interleaved metrics): a second run refuses at
start with one line naming the first. A lease rather than a lock, because hosts cannot see each
other's pids (a SLURM requeue lands on another node) and a run killed with `kill -9` gives
nothing back. Process 0 of a run holds the lease (JSON: run id, host, pid, process count, start
and refresh times) and rewrites it every `REFRESH_SECONDS` from a daemon thread. On its own
machine a lease holds exactly as long as its process runs (`process_liveness`); elsewhere, as
long as it is refreshed: one not refreshed for `STALE_SECONDS` is stale. Another machine's fresh
lease is watched: refreshed, its run is alive and this one refuses; left alone, it goes stale
and is taken over (a requeue right after a hard kill waits instead of failing). The other
processes of a run take no lease: process 0 broadcasts the outcome, so they never refuse each
other and none waits for a peer that stopped.

Local and network file systems: a lease appears complete and only if there was none (`os.link`
of a written temporary file; O_EXCL where hard links are missing); a stale one is taken over by
renaming it aside (one racer wins) and checking that what moved is what was judged stale (a
racer's fresh lease moved by mistake is put back). Object stores (gs://) have no exclusive
create: the lease is written, read back after `REMOTE_SETTLE_SECONDS` and kept if it still
names this run, so two runs starting that close together can, rarely, both go on.
"""
import atexit
import errno
import json
import logging
import os
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from siglip_jax import errors, paths
from siglip_jax.process_liveness import host_identity, process_gone, process_start, same_machine

LEASE_NAME = ".siglip_jax.lease"
REFRESH_SECONDS = 5.0
STALE_SECONDS = 60.0
REMOTE_SETTLE_SECONDS = 2.0
_ATTEMPTS = 8          # rounds of read/judge/create before giving up under contention
_MESSAGE_BYTES = 2048  # the error broadcast to the other processes of a run
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV,
                  errno.EMLINK)

_log = logging.getLogger(__name__)


class WorkdirLeaseError(errors.UserError, RuntimeError):
  """The workdir cannot be used for training (a file, not writable); the message names it."""


class WorkdirInUseError(WorkdirLeaseError):
  """Another run holds the workdir's lease; the message names the workdir and that run."""


# ------------------------------------------------------------------ judging a lease

def _age(lease, now):
  try:
    return now - float(lease["refreshed"])
  except (KeyError, TypeError, ValueError):
    return float("inf")


def stale_reason(lease, *, now, stale_after=STALE_SECONDS, here=None):
  """None while `lease` (a dict) holds; else why it no longer does."""
  if same_machine(lease, here):
    gone = process_gone(lease["pid"], lease.get("pid_start"))
    if gone:
      return f"{gone} on this host"
    if lease.get("pid_start") is not None:
      return None   # that very process runs here (stopped with Ctrl-Z, say): it holds
  age = _age(lease, now)
  if age > stale_after:
    return f"not refreshed for {age:.0f}s" if age != float("inf") else "it names no refresh time"
  return None


def describe(lease, now):
  """'host H, pid P, started T, lease refreshed Ns ago'."""
  started, age = lease.get("started"), _age(lease, now)
  when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
          if isinstance(started, (int, float)) else "?")
  refreshed = f"lease refreshed {age:.0f}s ago" if age != float("inf") else "never refreshed"
  return f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, started {when}, {refreshed}"


def _parse(raw):
  """The lease as a dict; {} for none or an unparsable one."""
  try:
    lease = json.loads(raw) if raw else {}
  except ValueError:
    return {}
  return lease if isinstance(lease, dict) else {}


def _remove_quietly(path):
  try:
    os.remove(path)
  except OSError:
    pass


# ------------------------------------------------------------------ the lease

class WorkdirLease:
  """`DIR/.siglip_jax.lease` of one run: `acquire()` (or `with`), refreshed until `release()`.

  `stale_after`, `refresh_every`, `settle`, `clock` (wall-clock seconds, compared across hosts)
  and `sleep` are there for tests; runs use the module's defaults.
  """

  def __init__(self, workdir, *, process_count=1, stale_after=STALE_SECONDS,
               refresh_every=REFRESH_SECONDS, settle=REMOTE_SETTLE_SECONDS, clock=time.time,
               sleep=time.sleep):
    self.workdir = os.fspath(workdir)
    self.remote = paths.is_remote(self.workdir)
    self.path = paths.join(self.workdir, LEASE_NAME)
    self.run_id = uuid.uuid4().hex
    self.process_count = process_count
    self.stale_after, self.refresh_every, self.settle = stale_after, refresh_every, settle
    self.clock, self._sleep = clock, sleep
    self.lost = threading.Event()   # set if another run took the lease over while this one ran
    self._started, self._held, self._thread = None, False, None
    self._stop = threading.Event()
    self._lock = threading.Lock()   # a refresh and the release never interleave
    self._tmp = f"{self.path}.{self.run_id}.tmp"

  # ---------------------------------------------------------------- storage

  def _record(self):
    now = self.clock()
    self._started = self._started or now
    return json.dumps({"run_id": self.run_id, **host_identity(), "pid": os.getpid(),
                       "pid_start": process_start(os.getpid()),
                       "process_count": self.process_count, "started": self._started,
                       "refreshed": now, "refresh_every": self.refresh_every}).encode()

  def _read(self):
    """The lease's bytes, or None if there is none."""
    try:
      if self.remote:
        return epath.Path(self.path).read_bytes()
      with open(self.path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def _write_tmp(self, data):
    with open(self._tmp, "wb") as f:
      f.write(data)

  def _create(self):
    """Writes this run's lease if there is none; True if the lease is then ours."""
    data = self._record()
    if self.remote:   # best effort: write, give racers time to write, keep it if ours survived
      epath.Path(self.path).write_bytes(data)
      self._sleep(self.settle)
      return _parse(self._read()).get("run_id") == self.run_id
    self._write_tmp(data)
    try:
      os.link(self._tmp, self.path)   # atomic, and the lease is complete when it appears
      return True
    except FileExistsError:   # on NFS, a retried link can say so after it worked
      return os.stat(self._tmp).st_nlink == 2
    except OSError as e:
      if e.errno not in _NO_HARD_LINKS:
        raise
      try:   # a file system without hard links (gcsfuse, some FUSE mounts)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      return True
    finally:
      _remove_quietly(self._tmp)

  def _take_over(self, judged):
    """Moves the stale lease (bytes `judged`) aside; True if that is what was moved."""
    if self.remote:
      return True   # _create overwrites it
    aside = f"{self.path}.{self.run_id}.stale"
    try:
      os.rename(self.path, aside)   # one racer moves a given file; the others find none
    except FileNotFoundError:
      return False
    with open(aside, "rb") as f:
      moved = f.read()
    if moved != judged:   # a racer's fresh lease had replaced it: put that back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        _log.warning("workdir %s: a racing run's lease could not be put back (kept as %s)",
                     self.workdir, aside)
        return False
    os.remove(aside)
    return moved == judged

  # ---------------------------------------------------------------- acquire

  def acquire(self):
    """Takes the lease, or raises WorkdirInUseError (one line naming the other run) or
    WorkdirLeaseError (the workdir is a file, read-only, full)."""
    if not self.remote and not os.path.isdir(self.workdir):
      what = "is a file, not a folder" if os.path.exists(self.workdir) else "does not exist"
      raise WorkdirLeaseError(f"workdir {self.workdir} {what}")
    try:
      self._acquire()
    except OSError as e:
      raise self._io_error(e) from e
    self._held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh_loop, name="siglip_jax.workdir_lease",
                                    daemon=True)   # never keeps the process alive
    self._thread.start()
    atexit.register(self.release)   # for errors raised before the run's own release
    return self

  def _io_error(self, e):
    what = {errno.EACCES: "is not writable", errno.EPERM: "is not writable",
            errno.EROFS: "is on a read-only file system", errno.ENOSPC: "is on a full disk",
            errno.EDQUOT: "is over its disk quota"}.get(e.errno)
    if what:
      return WorkdirLeaseError(f"workdir {self.workdir} {what}: training writes its checkpoints "
                               "and metrics there (give a writable --workdir)")
    return WorkdirLeaseError(f"workdir {self.workdir}: cannot write its lease file {self.path} "
                             f"({type(e).__name__}: {e})")

  def _acquire(self):
    for _ in range(_ATTEMPTS):
      raw = self._read_settled()
      if raw is None:
        if self._create():
          return
        continue   # a racer created one first: judge it in the next round
      lease, now = _parse(raw), self.clock()
      why = (stale_reason(lease, now=now, stale_after=self.stale_after) if lease
             else self._unreadable_stale(now))
      if why is None and lease and not same_machine(lease):
        if self._watch(lease):   # another machine's run, alive: it refreshed
          raise WorkdirInUseError(self._in_use_message(_parse(self._read()) or lease))
        continue   # gone, replaced or stale by now: judge it again
      if why is None:
        raise WorkdirInUseError(self._in_use_message(lease))
      if self._take_over(raw) and self._create():
        _log.warning("workdir %s: took over the lease of an earlier run (%s): %s", self.workdir,
                     describe(lease, now) if lease else "unreadable", why)
        return
    raise WorkdirInUseError(f"workdir {self.workdir}: could not take its lease {self.path}; "
                            "other runs keep taking it (are several runs starting on it?)")

  def _read_settled(self):
    """The lease's bytes; an unparsable one is read again briefly (an O_EXCL creator writing)."""
    raw = self._read()
    for _ in range(5):
      if raw is None or _parse(raw):
        break
      time.sleep(0.05)
      raw = self._read()
    return raw

  def _unreadable_stale(self, now):
    try:
      mtime = (epath.Path(self.path).stat().mtime if self.remote
               else os.stat(self.path).st_mtime)
    except OSError:
      return None
    return f"unreadable, untouched for {now - mtime:.0f}s" if now - mtime > self.stale_after \
        else None

  def _watch(self, lease):
    """True once `lease` is refreshed (its run is alive: within two of its refresh intervals);
    False once it is gone, replaced or stale."""
    every = float(lease.get("refresh_every") or REFRESH_SECONDS)
    suspect_at, told = self.clock() + 2 * every + 1, False
    while True:
      self._sleep(min(1.0, every / 2))
      current, now = _parse(self._read()), self.clock()
      if current.get("run_id") != lease.get("run_id"):
        return False
      if current.get("refreshed") != lease.get("refreshed"):
        return True
      if stale_reason(current, now=now, stale_after=self.stale_after):
        return False
      if now > suspect_at and not told:
        _log.warning("workdir %s: the lease of another run (%s) is not being refreshed; waiting "
                     "until it is %.0fs old to take it over", self.workdir,
                     describe(current, now), self.stale_after)
        told = True

  def _in_use_message(self, lease):
    who = (f"another training run ({describe(lease, self.clock())})" if lease else
           f"another training run (its lease {self.path} is unreadable; delete it if no run uses "
           "this workdir)")
    later = ("" if lease and same_machine(lease) else
             f" (a lease not refreshed for {self.stale_after:.0f}s is taken over)")
    return (f"workdir {self.workdir} is in use by {who}: let it finish or stop it, or give "
            f"another --workdir{later}")

  # ---------------------------------------------------------------- refresh and release

  def _refresh_loop(self):
    warned = False
    while not self._stop.wait(self.refresh_every):
      try:
        with self._lock:
          if self._stop.is_set():
            return
          if _parse(self._read()).get("run_id") != self.run_id:
            self.lost.set()
            _log.warning("workdir %s: another run took over this run's lease (was this run "
                         "stalled for over %.0fs?); two runs may now write to it", self.workdir,
                         self.stale_after)
            return
          if self.remote:
            epath.Path(self.path).write_bytes(self._record())
          else:
            self._write_tmp(self._record())
            os.replace(self._tmp, self.path)   # atomic: readers never see half a lease
      except Exception as e:  # a transient I/O error: try again at the next refresh
        if not warned:
          _log.warning("workdir %s: could not refresh its lease: %s", self.workdir, e)
          warned = True

  def release(self):
    """Deletes the lease if this run still holds it; stops refreshing. Never waits long."""
    if not self._held:
      return
    self._held = False
    self._stop.set()
    locked = self._lock.acquire(timeout=2 * self.refresh_every)   # a refresh hung on I/O
    try:
      if _parse(self._read()).get("run_id") == self.run_id:
        if self.remote:
          epath.Path(self.path).unlink()
        else:
          os.remove(self.path)
    except Exception as e:  # the run is over either way; the lease goes stale
      _log.warning("workdir %s: could not remove its lease %s: %s", self.workdir, self.path, e)
    finally:
      if not self.remote:
        _remove_quietly(self._tmp)
      if locked:
        self._lock.release()
    atexit.unregister(self.release)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ------------------------------------------------------------------ a run's processes

_IN_USE, _LEASE_ERROR, _UNEXPECTED = 1, 2, 3


def _share(status, message):
  """Process 0's (status, message), as every process of the run sees it."""
  data = message.encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0")
  out = multihost_utils.broadcast_one_to_all(
      {"status": np.array(status, np.int32),
       "message": np.frombuffer(data, np.uint8).astype(np.int32)})
  text = bytes(np.asarray(out["message"]).astype(np.uint8)).rstrip(b"\0")
  return int(out["status"]), text.decode(errors="replace")


def acquire_for_run(workdir, **kwargs):
  """Process 0 takes the workdir's lease; every process of the run learns the outcome.

  Call once the workdir exists, before anything heavy compiles, on every process. Returns the
  lease (held by process 0 only): `release()` it when the run ends. Raises WorkdirLeaseError
  (WorkdirInUseError when another run holds the lease) on every process alike.
  """
  lease = WorkdirLease(workdir, process_count=jax.process_count(), **kwargs)
  status, message, error = 0, "", None
  if jax.process_index() == 0:
    try:
      lease.acquire()
    except WorkdirInUseError as e:
      status, message, error = _IN_USE, str(e), e
    except WorkdirLeaseError as e:
      status, message, error = _LEASE_ERROR, str(e), e
    except Exception as e:  # still tell the others, or they would wait for process 0
      status, message, error = _UNEXPECTED, f"{type(e).__name__}: {e}", e
  if jax.process_count() > 1:
    status, message = _share(status, message)
  if error is not None:
    raise error
  if status == _IN_USE:
    raise WorkdirInUseError(message)
  if status:
    raise WorkdirLeaseError(message if status == _LEASE_ERROR else
                            f"process 0 could not take the lease of workdir {workdir}: {message}")
  return lease
