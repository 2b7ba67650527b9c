"""Per-log-step performance measurements (TFLOP/s, MFU, memory) and the profiler window.

    perf/tflops_per_device  analytic train FLOPs per pair (siglip_jax.flops) x pairs/s / devices
    perf/hw_tflops_per_device  the same with hardware FLOPs (flops.hw_train_flops_per_pair):
                            remat's recompute and, with input.microbatches > 1, gradient
                            caching's extra tower forward included; MFU stays on model FLOPs
    perf/mfu                that over the device's peak (flops.PEAK_TFLOPS or config.peak_tflops);
                            NaN where no peak is known (CPUs), said once on the console
    perf/device_mem_gib     the largest `bytes_in_use` over this process's devices; on backends
                            without memory_stats (CPU), the process's resident memory: CPU devices
                            live in host memory, so that is what they use (and an upper bound)
"""
import os
import shutil
import sys
import tempfile

import jax

from siglip_jax import flops, paths

_GIB = 2.0 ** 30


def device_memory_gib():
  """(GiB in use, source): source is "device" (memory_stats) or "host_rss"."""
  in_use = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
      stats = None
    if stats and "bytes_in_use" in stats:
      in_use.append(stats["bytes_in_use"])
  if in_use:
    return max(in_use) / _GIB, "device"
  return _rss_bytes() / _GIB, "host_rss"


def _rss_bytes():
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    import resource  # peak, not current, RSS: the closest figure where /proc is missing
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PerfMeter:
  """Turns the measured pairs/s into the perf/* metrics of one log step."""

  def __init__(self, config, model, *, objectives=(), stream=sys.stdout, enabled=True):
    from siglip_jax import naflex_config   # pylint: disable=import-outside-toplevel
    # A NaFlex sequence of n patches costs what an image one patch high and n patches wide
    # does (the same tokens through the same layers, padding included: it is computed).
    patch = naflex_config.patch_size(config) if naflex_config.is_naflex(config) else None
    batches = naflex_config.batch_sizes(config) if patch else {}

    def image_size(seq_len):
      return config.input.image_size if patch is None else (seq_len * patch, patch)
    microbatches = int(config.input.get("microbatches", 1))

    def per_pair(objs, n=None):
      """(model, hardware) train FLOPs per pair at NaFlex length `n` (default the longest)."""
      kw = dict(image_size=image_size(n or max(batches or [0])),
                text_len=config.input.text_len,
                global_batch=batches.get(n, config.input.batch_size), objectives=objs)
      return (flops.train_flops_per_pair(model, **kw),
              flops.hw_train_flops_per_pair(model, microbatches=microbatches, **kw))
    self._flops = per_pair
    self.objectives = tuple(objectives)
    self.flops_per_pair, self.hw_flops_per_pair = self._flops(self.objectives)
    self.num_devices = jax.device_count()
    kind = jax.devices()[0].device_kind
    self.peak = flops.peak_tflops(kind, config.get("peak_tflops", 0.0) or 0.0)
    if enabled and self.peak is None:
      print(f"perf/mfu: no peak FLOP/s known for device kind {kind!r}; written as NaN "
            "(set --config.peak_tflops=TFLOPS_PER_DEVICE to get it)", file=stream, flush=True)
    self._mem_note = enabled

  def metrics(self, pairs_per_s, active=None, seq_len=None):
    """`active`: the names of the objectives trained at this step (default: all), so the
    FLOPs count SILC/TIPS's teacher and views only from their switch on. `seq_len`: a NaFlex
    step's length (default: the longest)."""
    per_pair, hw_per_pair = self.flops_per_pair, self.hw_flops_per_pair
    if active is not None or seq_len is not None:
      objs = self.objectives if active is None else [
          o for o in self.objectives if o.name in active]
      per_pair, hw_per_pair = self._flops(objs, seq_len)
    tflops = per_pair * pairs_per_s / self.num_devices / 1e12
    mem, source = device_memory_gib()
    if self._mem_note and source == "host_rss":
      print("perf/device_mem_gib: this backend reports no device memory; written as the "
            "process's resident host memory", flush=True)
    self._mem_note = False
    return {"perf/tflops_per_device": tflops,
            "perf/hw_tflops_per_device": hw_per_pair * pairs_per_s / self.num_devices / 1e12,
            "perf/mfu": tflops / self.peak if self.peak else float("nan"),
            "perf/device_mem_gib": mem}


def parse_steps(spec):
  """"N,M" -> (N, M) (inclusive; "N" alone is one step), "" -> None."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  try:
    parts = [int(p) for p in spec.split(",")]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts *= 2
  if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
    raise ValueError(f"config key `profile_steps`: expected \"N,M\" with 1 <= N <= M; got {spec!r}")
  return tuple(parts)


class StepProfiler:
  """Traces steps N..M (inclusive) with jax.profiler into `workdir/profile/`.

  TensorBoard's profile plugin reads `profile/plugins/profile/<run>/*.xplane.pb`; the
  `perfetto_trace.json.gz` beside it opens in Perfetto (ui.perfetto.dev) without TensorBoard.
  jax.profiler writes local files: for a URL workdir (gs://...) the trace goes to a local
  temporary folder and is copied to `workdir/profile/` when it stops.
  """

  def __init__(self, spec, workdir):
    self.window = parse_steps(spec)
    self.logdir = paths.join(workdir, "profile")
    if jax.process_count() > 1:   # processes on one host would write the same <host>.xplane.pb
      self.logdir = paths.join(self.logdir, f"process_{jax.process_index()}")
    self.trace_dir = self.logdir
    self.active = self.done = False

  def before_step(self, step):
    # Any step inside the window starts it: a run resumed mid-window still gets its trace.
    if self.window and self.window[0] <= step <= self.window[1] and not (self.active or self.done):
      if paths.is_remote(self.logdir):
        self.trace_dir = tempfile.mkdtemp(prefix="siglip_jax_profile_")
      jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True)
      self.active = True

  def after_step(self, step, outputs):
    if self.active and step >= self.window[1]:
      jax.block_until_ready(outputs)   # the trace must hold the steps' device work
      self.stop()

  def stop(self):
    if self.active:
      self.active, self.done = False, True
      jax.profiler.stop_trace()
      if self.trace_dir != self.logdir:
        paths.upload_tree(self.trace_dir, self.logdir)
        shutil.rmtree(self.trace_dir, ignore_errors=True)
