"""Is the process that wrote a record (host, pid) still running? Asked by `workdir_lease`.

A pid means something only on the machine, boot and pid namespace it came from: another host
(a SLURM requeue lands on another node), a reboot or another container can hold the same number
for an unrelated process. Within one, a pid can also be reused once its process has ended, so
a record keeps the process's start time (field 22 of `/proc/<pid>/stat`, clock ticks since
boot) and a pid that now started at another time is another process. Without /proc (macOS),
`os.kill(pid, 0)` alone says whether the pid exists.
"""
import os
import socket


def _read_text(path):
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def host_identity():
  """{"host", "boot_id", "pid_ns"} of this process: where its pid means something."""
  try:
    pid_ns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_ns = ""
  return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
          "pid_ns": pid_ns}


def same_machine(record, here=None):
  """True if `record`'s pid (with its host_identity() fields) can be checked from here."""
  here = here or host_identity()
  return bool(here["host"]) and isinstance(record.get("pid"), int) and all(
      record.get(k) == here[k] for k in ("host", "boot_id", "pid_ns"))


def proc_stat(pid):
  """(state letter, start time in clock ticks since boot) of a pid, or None without one."""
  text = _read_text(f"/proc/{pid}/stat")
  if not text:
    return None
  fields = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def process_start(pid):
  """The start time of `pid` in clock ticks since boot, or None without /proc."""
  stat = proc_stat(pid)
  return stat[1] if stat else None


def process_gone(pid, start):
  """Why `pid` (started at `start` ticks, or None: unknown) no longer runs here, or None."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return f"its process {pid} is gone"
  except PermissionError:
    pass  # it exists, another user's
  stat = proc_stat(pid)
  if stat is None:
    if os.path.isdir("/proc/self"):   # /proc is there but not the pid's entry: it just ended
      return f"its process {pid} is gone"
    return None
  state, started = stat
  if state in ("Z", "X"):
    return f"its process {pid} is gone (a zombie)"
  if start is not None and started != start:
    return f"its pid {pid} is now another process"
  return None
