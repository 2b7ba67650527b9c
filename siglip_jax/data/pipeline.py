"""The Grain loader: global batches from any source, deterministic, per-process, resumable.

Real data and the embedded demo sets (`shapes.TrainSource`) alike: every training batch comes
through here, so the demo exercises the loader, preprocessing and sharding that pods run.

The one rule: step s's global batch is a pure function of (seed, s), whatever the process
count, so a run resumes at the exact example and scales without changing what it trains on.

- The stream of "slots" 0, 1, 2, ... is cut into epochs of N (= the source's length) slots;
  slot k = e*N + i holds record `perm_e(i)`, a pseudo-random permutation of [0, N) drawn
  afresh each epoch (a Feistel network: O(1) memory at any N, no table to build or agree on).
- Step s's global batch is slots [s*B, (s+1)*B); a process loads only the rows its devices hold.
  A source with Grain's batched read (`_getitems`) gets one call for a step's rows; the others
  are read a record at a time in the decoding threads.
- A bad record (see `preprocess.REASONS`) in slot k is replaced by `perm_e(j)` for a j drawn from
  (seed, e, i, attempt): deterministic, so every process count picks the same replacement, and
  far from i, so the duplicate rarely lands in the same batch (a repeated pair would be its own
  negative under the sigmoid loss). Every skip counts in `data/skipped`. Within an epoch each
  usable record appears once, plus one duplicate per bad record met.
- Grain: a `MapDataset` over step numbers (so worker slicing can never reorder rows inside a
  batch), a thread pool per process decoding a batch's rows in parallel (PIL releases the GIL),
  `to_iter_dataset` prefetch, and `mp_prefetch` worker processes when `input.workers > 0`.
- The position is the next step (an int, what checkpoints already store); the running skip
  total travels beside it as `data_skipped`.
"""
import collections
import logging
import time
from concurrent import futures

import jax
import numpy as np

from siglip_jax import errors
from siglip_jax.data import naflex
from siglip_jax.data import preprocess as pp
from siglip_jax.data import sources
from siglip_jax.data import views as views_lib

_log = logging.getLogger(__name__)
MAX_ATTEMPTS = 1000      # then the data set is (nearly) all bad: raise, never spin
_LOG_FIRST_BAD = 20      # per process: name the first bad records, then only count them


def _mix(x):
  """splitmix64's finalizer on uint64 arrays: a cheap, well-mixing hash."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(*parts):
  """A uint64 hash of a few ints (seed, epoch, index, ...)."""
  h = np.uint64(0x9E3779B97F4A7C15)
  for p in parts:
    h = _mix(h ^ np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF))
  return h


class NoUsableRecords(errors.UserError, RuntimeError):
  """The data set is (nearly) all bad: no replacement was found for a slot."""


class Permutation:
  """`perm(epoch, i)`: a bijection of [0, n) per (seed, epoch); vectorized over i.

  A balanced Feistel network on the smallest even number of bits covering n, with cycle-walking
  (re-apply until the value falls below n; the domain is < 4n, so a few rounds on average).
  """

  ROUNDS = 6

  def __init__(self, n, seed):
    if n < 1:
      raise ValueError("cannot permute an empty data set")
    self.n, self.seed = int(n), int(seed)
    bits = max(2, int(self.n - 1).bit_length())
    self.half = (bits + 1) // 2
    self.mask = np.uint64((1 << self.half) - 1)
    self._keys = {}   # epoch -> round keys: hashing them costs more than permuting a batch

  def _round_keys(self, epoch):
    keys = self._keys.get(epoch)
    if keys is None:
      if len(self._keys) >= 8:   # only the current epoch (and a neighbour) is ever in use
        self._keys.clear()
      keys = self._keys[epoch] = [_hash(self.seed, epoch, r) for r in range(self.ROUNDS)]
    return keys

  def _feistel(self, x, keys):
    h = np.uint64(self.half)
    left, right = x >> h, x & self.mask
    for k in keys:
      left, right = right, left ^ (_mix(right ^ k) & self.mask)
    return (left << h) | right

  def __call__(self, epoch, i):
    i = np.asarray(i, np.int64)
    if self.n == 1:
      return np.zeros_like(i)
    keys = self._round_keys(int(epoch))
    x = self._feistel(i.astype(np.uint64), keys)
    out = x >= np.uint64(self.n)
    while np.any(out):
      x[out] = self._feistel(x[out], keys)
      out = x >= np.uint64(self.n)
    return x.astype(np.int64)


class StepLoader:
  """Picklable `step -> this process's rows of that step's batch` (numpy, uint8 images).

  Returns {"image": uint8 [R, S, S, 3], "text": int32 [R, L], "record": int64 [R],
  "skipped": int64 [R] (bad records met before each row's record), "step": int}.
  """

  def __init__(self, source, preprocessor, *, seed, global_batch, rows, threads=4,
               views_from=None, plan=None, rows_by_batch=None):
    self.source, self.pre = source, preprocessor
    # Steps from this one on also draw SILC/TIPS's views (None: never).
    self.views_from = None if views_from is None or not preprocessor.views else int(views_from)
    self.seed, self.global_batch = int(seed), int(global_batch)
    self.rows = np.asarray(rows, np.int64)
    # NaFlex: step s's length, batch and first slot (`naflex.LengthPlan`), and this process's
    # rows of a batch of each size.
    self.plan, self.rows_by_batch = plan, dict(rows_by_batch or {})
    self.n = len(source)
    self.perm = Permutation(self.n, seed)
    self.threads = max(1, int(threads))
    self._pool, self._bad_logged = None, 0

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_pool"] = None      # threads do not cross process boundaries; made again lazily
    return state

  def first_records(self, slots):
    """The record each slot holds before any replacement (`candidates(slot, 0)`, vectorized)."""
    slots = np.asarray(slots, np.int64)
    epochs, index = np.divmod(slots, self.n)
    out = np.empty_like(slots)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      out[here] = self.perm(int(epoch), index[here])
    return out

  def candidates(self, slot, attempt):
    """The record tried for `slot` at `attempt` (0: its own; then far-off replacements)."""
    epoch, i = divmod(int(slot), self.n)
    if attempt and self.n > 1:
      i = (i + 1 + int(_hash(self.seed, epoch, i, attempt) % np.uint64(self.n - 1))) % self.n
    return int(self.perm(epoch, np.array([i]))[0])

  def example(self, slot, tokenize=True, first=None, with_views=False, seq_len=None):
    """(example dict, record index, list of skip reasons) for one slot. `first`: the slot's own
    (record, raw record) when the caller has read it already; `seq_len`: a NaFlex budget."""
    extra = {} if seq_len is None else {"seq_len": seq_len}
    reasons = []
    for attempt in range(min(MAX_ATTEMPTS, 10 * self.n + 10)):
      if attempt == 0 and first is not None:
        record, raw = first
      else:
        record = self.candidates(slot, attempt)
        raw = self.source[record]
      try:
        return (self.pre(raw, slot, tokenize=tokenize, with_views=with_views, **extra), record,
                reasons)
      except pp.BadRecord as e:
        reasons.append(e.reason)
        if self._bad_logged < _LOG_FIRST_BAD:
          self._bad_logged += 1
          _log.warning("skipping record %s (%s)%s", raw.get("key", record), e,
                       "; further bad records are only counted"
                       if self._bad_logged == _LOG_FIRST_BAD else "")
    counts = {r: reasons.count(r) for r in sorted(set(reasons))}
    raise NoUsableRecords(f"the training data has no usable record: {len(reasons)} records in a "
                          f"row were unusable at slot {slot} ({counts}); run python -m "
                          "siglip_jax.data.check on it")

  def _examples(self, slots, firsts, with_views=False, seq_len=None):
    return [self.example(s, tokenize=False, first=f, with_views=with_views, seq_len=seq_len)
            for s, f in zip(slots, firsts)]

  def step_slots(self, step):
    """(this process's slots of step `step`, the step's NaFlex length or None)."""
    if self.plan is None:
      return (int(step) * self.global_batch + self.rows).tolist(), None
    rows = self.rows_by_batch[self.plan.batch(step)]
    return (self.plan.first_slot(step) + rows).tolist(), self.plan.length(step)

  def __call__(self, step):
    with_views = self.views_from is not None and int(step) >= self.views_from
    slots, seq_len = self.step_slots(step)
    read_batch = getattr(self.source, "_getitems", None)
    pooled = self.threads > 1 and len(slots) > 1
    if read_batch is not None and slots:
      records = self.first_records(slots).tolist()
      firsts = list(zip(records, read_batch(records)))
      # Pixels already decoded (a rendered set) leave the threads nothing that frees the GIL:
      # they would only take turns with it (measured: +45% CPU a step for the demo set).
      pooled = pooled and not all(isinstance(raw.get("image"), np.ndarray) for _, raw in firsts)
    else:
      firsts = [None] * len(slots)
    if pooled:
      if self._pool is None:
        self._pool = futures.ThreadPoolExecutor(self.threads, thread_name_prefix="siglip-data")
      # A few rows per task: per-row tasks cost more in scheduling than a small image's
      # preprocessing; 4 tasks a thread still even out rows of uneven decoding cost.
      parts = np.array_split(np.arange(len(slots)), min(len(slots), 4 * self.threads))

      def run(part):
        return self._examples([slots[j] for j in part], [firsts[j] for j in part],
                              with_views, seq_len)
      results = [r for done in self._pool.map(run, parts) for r in done]
    else:
      results = self._examples(slots, firsts, with_views, seq_len)
    size = self.pre.image_size
    if not results:   # a process with no rows (never with today's meshes): empty arrays
      assert self.plan is None, "every process holds rows of a NaFlex batch"
      return {"image": np.zeros((0, size, size, 3), np.uint8),
              "text": np.zeros((0, self.pre.text_len), np.int32),
              "record": np.zeros(0, np.int64), "skipped": np.zeros(0, np.int64),
              "step": int(step)}
    # One tokenizer call for the batch (the same rows as one call per caption, a tenth the time).
    text = self.pre.tokenizer.encode([ex["text"] for ex, _, _ in results], self.pre.text_len)
    image_keys = NAFLEX_KEYS if self.plan is not None else ("image",)
    out = {**{k: np.stack([ex[k] for ex, _, _ in results]) for k in image_keys},
           "text": np.asarray(text, np.int32),
           "record": np.array([r for _, r, _ in results], np.int64),
           "skipped": np.array([len(why) for _, _, why in results], np.int64),
           "step": int(step)}
    for key in DECODER_KEYS + VIEW_KEYS + ("regions", "region_mask", "skipped_regions"):
      if key in results[0][0]:
        out[key] = np.stack([np.asarray(ex[key]) for ex, _, _ in results])
    return out


DECODER_KEYS = ("dec_inputs", "dec_targets", "dec_task")   # the LocCa passes (preprocess)
NAFLEX_KEYS = naflex.KEYS   # a NaFlex batch's image: patches, patch_mask, spatial_shapes
# What travels to the devices besides the image; the rest (record ids, counts, the padded regions)
# stays on the host.
DEVICE_KEYS = ("text", "patch_mask", "spatial_shapes") + DECODER_KEYS + ("tips_mask",)
VIEW_KEYS = views_lib.KEYS    # SILC/TIPS's crops and patch mask, from the switch step on


def host_batches(loader, start_step=0, *, workers=0, prefetch=2):
  """Iterator of `loader(step)` for steps start_step, start_step + 1, ... in order: Grain's,
  or, where Grain is not installed (it is in the [data] and [test] extras, not the core), a
  plain thread prefetcher with the same output (worker processes need Grain)."""
  try:
    import grain   # pylint: disable=import-outside-toplevel
  except ImportError:
    if workers > 0:
      raise ImportError("input.workers > 0 needs the grain package (pip install grain)") from None
    return _thread_batches(loader, int(start_step), max(1, prefetch))
  # Elements are whole steps: Grain's worker slicing and thread prefetch then cannot change
  # which rows form a batch, only who computes it; `mp_prefetch` yields in dataset order.
  # One thread computes steps ahead into the buffer: decoding is parallel inside a step (the
  # loader's `threads`), and a second step at once only made Python work (rendering,
  # preprocessing) take turns with the GIL (measured: the demo set +30% CPU a step; real data
  # at 224 px the same pairs/s within noise).
  ds = grain.MapDataset.range(int(start_step), 2**62).map(loader)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                            prefetch_buffer_size=max(1, prefetch)))
  if workers > 0:
    from absl import flags   # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags when starting workers; outside an absl app (tests, notebooks)
      # nobody parsed them, and their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(workers),
                                                     per_worker_buffer_size=max(1, prefetch)))
  return iter(it)


def _thread_batches(loader, step, prefetch):
  pool = futures.ThreadPoolExecutor(1, thread_name_prefix="siglip-prefetch")   # as Grain's
  pending = collections.deque()
  try:
    while True:
      while len(pending) < prefetch:
        pending.append(pool.submit(loader, step + len(pending)))
      yield pending.popleft().result()
      step += 1
  finally:
    for f in pending:
      f.cancel()
    pool.shutdown(wait=False)


def local_rows(sharding, global_batch):
  """Sorted global row indices held by this process's devices."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.array(sorted(rows), np.int64)


class Batches:
  """The trainer's data iterator: yields (step, {"image": float32 [-1, 1], "text": int32, and
  the decoder's passes when LocCa is on} global arrays, seconds waited)."""

  def __init__(self, source, preprocessor, *, global_batch, sharding, seed, start_step=0,
               skipped=0, skipped_regions=0, workers=0, threads=4, prefetch=2,
               views_from=None, plan=None):
    self.global_batch, self.sharding, self.plan = int(global_batch), sharding, plan
    self._rows = local_rows(sharding, self.global_batch)
    sizes = {self.global_batch} | ({int(b) for b in plan.sizes} if plan is not None else set())
    rows_by_batch = {b: local_rows(sharding, b) for b in sorted(sizes)}
    # Per global batch size: where each global row sits among this process's rows.
    self._where = {b: {int(r): i for i, r in enumerate(rows)} for b, rows in rows_by_batch.items()}
    self.loader = StepLoader(source, preprocessor, seed=seed, global_batch=global_batch,
                             rows=self._rows, threads=threads, views_from=views_from,
                             plan=plan, rows_by_batch=rows_by_batch)
    self.position = int(start_step)
    # Running totals: records (all runs so far) and, with a decoder, regions dropped.
    self._counts = {"skipped": [int(skipped), 0]}
    if preprocessor.decoder:
      self._counts["skipped_regions"] = [int(skipped_regions), 0]
    self._it = host_batches(self.loader, start_step, workers=workers, prefetch=prefetch)
    # uint8 travels to the devices; the [-1, 1] floats are made there (4x less host traffic).
    self._normalize = jax.jit(lambda x: x.astype(np.float32) * (2.0 / 255.0) - 1.0,
                              out_shardings=sharding)
    self._normalize_patches = jax.jit(naflex.to_float, out_shardings=sharding)
    self.last_batch_size = self.global_batch   # the global batch of the step last returned

  def _global(self, x, batch):
    shape = (batch,) + x.shape[1:]
    where = self._where[batch]

    def piece(index):
      rows = range(*index[0].indices(batch))
      return x[[where[r] for r in rows]]
    return jax.make_array_from_callback(shape, self.sharding, piece)

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    host = next(self._it)
    wait = time.perf_counter() - t0
    if host["step"] != self.position:   # a guard on Grain's ordering, never expected to fire
      raise RuntimeError(f"data loader out of order: got step {host['step']}, "
                         f"expected {self.position}")
    for key, count in self._counts.items():
      count[1] += int(host[key].sum())
    size = self.plan.batch(host["step"]) if self.plan is not None else self.global_batch
    batch = {k: self._normalize(self._global(host[k], size))
             for k in ("image", "view_global", "view_local") if k in host}
    batch.update({k: self._global(host[k], size) for k in DEVICE_KEYS if k in host})
    if "patches" in host:   # NaFlex: [-1, 1] on the devices, padding patches 0
      batch["patches"] = self._normalize_patches(self._global(host["patches"], size),
                                                 batch["patch_mask"])
    self.last_batch_size = size
    self.position += 1
    return host["step"], batch, wait

  def totals(self):
    """{"skipped": records, "skipped_regions": regions (with a decoder)} dropped for all
    batches consumed so far, over all processes (a collective when there are several: call it
    on every process at the same step)."""
    names = list(self._counts)
    local = np.array([self._counts[k][1] for k in names], np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils   # pylint: disable=import-outside-toplevel
      local = np.sum(multihost_utils.process_allgather(local), axis=0)
    return {k: self._counts[k][0] + int(v) for k, v in zip(names, local)}

  def skipped_total(self):
    return self.totals()["skipped"]

  def metrics(self):
    """The running totals as metrics.jsonl names (`data/skipped`, `data/skipped_regions`)."""
    return {f"data/{k}": v for k, v in self.totals().items()}

  def state(self):
    """What a checkpoint keeps: the next step and the running totals."""
    return {"data_position": self.position,
            **{f"data_{k}": v for k, v in self.totals().items()}}

  def close(self):
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()
    pool = self.loader._pool   # pylint: disable=protected-access
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)


def make_batches(config, sharding, data_state=None, views_from=None):
  """A `Batches` over the config's training source (`sources.from_config`), starting at
  `data_state` ({"data_position": next step, "data_skipped": running skip total}; {}: step 0);
  steps >= `views_from` also hold SILC/TIPS's views."""
  data_state = data_state or {}
  inp = config.input
  return Batches(sources.from_config(config), pp.from_config(config),
                 global_batch=inp.batch_size, sharding=sharding, seed=config.seed,
                 start_step=int(data_state.get("data_position", 0)),
                 skipped=int(data_state.get("data_skipped", 0)),
                 skipped_regions=int(data_state.get("data_skipped_regions", 0)),
                 workers=inp.get("workers", 0), threads=inp.get("threads", 4),
                 prefetch=inp.get("prefetch", 2), views_from=views_from,
                 plan=length_plan(config))


def length_plan(config):
  """A NaFlex run's `naflex.LengthPlan`, else None."""
  from siglip_jax import naflex_config   # pylint: disable=import-outside-toplevel
  if not naflex_config.is_naflex(config):
    return None
  return naflex.LengthPlan(naflex_config.seq_lens(config), config.input.batch_size,
                           naflex_config.batch_by_len(config), seed=config.seed)
