"""Global batches from an index-based source, each process rendering only its own rows.

Step s's global batch is examples [s*B, (s+1)*B) of the source's deterministic stream, whatever
the process count: each process loads exactly the rows its devices hold (read off the batch
sharding) and `jax.make_array_from_callback` assembles the global array. The position (the next
step) is all a checkpoint needs to resume at the exact example. A background thread renders
ahead so the accelerator does not wait on the host.
"""
import queue
import threading
import time

import numpy as np

import jax


def local_rows(sharding, global_batch):
  """Sorted global row indices held by this process's devices."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.array(sorted(rows), np.int64)


class IndexedBatches:
  """Iterator of (step, device batch dict, seconds waited for the host)."""

  def __init__(self, examples_fn, tokenizer, *, text_len, global_batch, sharding,
               start_step=0, prefetch=2):
    self._examples, self._tok, self._text_len = examples_fn, tokenizer, text_len
    self.global_batch, self.sharding = global_batch, sharding
    self._rows = local_rows(sharding, global_batch)
    self._where = {int(r): i for i, r in enumerate(self._rows)}
    self.position = start_step          # the step whose batch comes next
    self._queue = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True)
    self._thread.start()

  def host_batch(self, step):
    """This process's rows of step `step`'s batch, as numpy."""
    ex = self._examples(step * self.global_batch + self._rows)
    return {"image": np.asarray(ex["image"], np.float32),
            "text": self._tok.encode(list(ex["text"]), self._text_len)}

  def _produce(self, step):
    try:
      while not self._stop.is_set():
        item = (step, self.host_batch(step))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.2)
            break
          except queue.Full:
            continue
        step += 1
    except BaseException as e:  # surface loader failures in the training loop, never stall
      self._queue.put(e)

  def _to_device(self, host):
    def make(x):
      shape = (self.global_batch,) + x.shape[1:]
      def piece(index):
        rows = range(*index[0].indices(self.global_batch))
        return x[[self._where[r] for r in rows]]
      return jax.make_array_from_callback(shape, self.sharding, piece)
    return {k: make(v) for k, v in host.items()}

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    step, host = item
    wait = time.perf_counter() - t0
    self.position = step + 1
    return step, self._to_device(host), wait

  def skipped_total(self):
    return 0   # rendered examples are never bad (real data: pipeline.Batches counts them)

  def state(self):
    """What a checkpoint keeps (the same keys as pipeline.Batches)."""
    return {"data_position": self.position, "data_skipped": 0}

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
