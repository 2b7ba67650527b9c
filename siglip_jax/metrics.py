"""Metric writers (metrics.jsonl, TensorBoard) and the console progress line.

Only process 0 writes; every other process gets writers that do nothing, so callers never
branch on the process index.

The workdir may be a local folder or a URL (`gs://bucket/run`). Locally, metrics.jsonl is
appended to and flushed per row. Object stores cannot append: for a URL the rows are kept in
memory and the whole object rewritten on flush, at most every `paths.REMOTE_FLUSH_SECONDS` and
on close (`paths.AppendFile`); rows already in the object (a resumed run) are kept.
"""
import json
import math
import sys
import time

import numpy as np

from etils import epath

from siglip_jax import paths


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class JsonlWriter:
  """Appends one JSON object a line to `workdir/metrics.jsonl`, flushed as written (for a URL
  workdir: rewritten, see the module docstring)."""

  def __init__(self, workdir, enabled=True):
    self.path = paths.join(workdir, "metrics.jsonl")
    self._file = paths.AppendFile(self.path) if enabled else None

  def write(self, step, metrics):
    if self._file is None:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = _to_python(v)
      # JSON has no NaN/inf; keep the row valid and the fact visible.
      if isinstance(v, float) and not math.isfinite(v):
        v = str(v)
      row[k] = v
    self._file.write((json.dumps(row) + "\n").encode("utf-8"))
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


class MultiWriter:
  """Fans one write out to several writers (jsonl, TensorBoard)."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write(self, step, metrics):
    for w in self.writers:
      w.write(step, metrics)

  def close(self):
    for w in self.writers:
      w.close()


def last_logged_step(workdir):
  """The largest step in `workdir/metrics.jsonl`, or 0 when there is none (or no file)."""
  path = paths.join(workdir, "metrics.jsonl")
  if not epath.Path(path).exists():
    return 0
  last = 0
  for line in epath.Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
    try:
      last = max(last, int(json.loads(line).get("step", 0)))
    except (ValueError, TypeError, AttributeError):
      continue   # a row cut by a crash
  return last


def make_writers(workdir, is_main):
  """metrics.jsonl and TensorBoard events (process 0; the others get writers of nothing)."""
  writers = [JsonlWriter(workdir, enabled=is_main)]
  if is_main:
    from siglip_jax import tensorboard
    writers.append(tensorboard.make_writer(workdir))
  return MultiWriter(writers)


class Progress:
  """Console line: step/total, loss, pairs/s, ETA. Rate measured between calls."""

  def __init__(self, total_steps, batch_size, first_step=0, enabled=True, stream=sys.stdout):
    self.total, self.batch = total_steps, batch_size
    self.enabled, self.stream = enabled, stream
    self._t0, self._s0 = time.perf_counter(), first_step
    self.pairs_per_s = float("nan")

  def update(self, step, loss=None, pairs=None):
    """`pairs`: trained since the last call (default: steps x batch_size; NaFlex batches vary
    with the length)."""
    now = time.perf_counter()
    if step > self._s0:
      pairs = (step - self._s0) * self.batch if pairs is None else pairs
      self.pairs_per_s = pairs / (now - self._t0)
    self._t0, self._s0 = now, step
    if not self.enabled:
      return self.pairs_per_s
    eta = (self.total - step) * self.batch / self.pairs_per_s if self.pairs_per_s > 0 else 0
    loss_txt = f" loss {loss:.4f}" if loss is not None else ""
    print(f"[{step:>{len(str(self.total))}}/{self.total}]{loss_txt} "
          f"{self.pairs_per_s:,.0f} pairs/s  ETA {_hms(eta)}", file=self.stream, flush=True)
    return self.pairs_per_s


def _hms(seconds):
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_table(metrics):
  """A short aligned table of final metrics for the end of a run."""
  width = max((len(k) for k in metrics), default=0)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
  for k in sorted(metrics):
    v = metrics[k]
    lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  return "\n".join(lines)
