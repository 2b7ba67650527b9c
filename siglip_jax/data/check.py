r"""Reads every record of a data set once and reports what training would skip, and why.

    python -m siglip_jax.data.check --shards='/data/laion/{00000..00999}.tar'   # or a glob
    python -m siglip_jax.data.check --dir=/data/my_folder     # captions.jsonl or a prepared set

Prints ONE JSON object on stdout, `{"records": N, "usable": M, "skipped": {"<reason>": n},
"regions": R, "skipped_regions": S}` (the first bad records are named on stderr; regions are
the LocCa decoder's boxes with captions, counted over usable records: R kept, S dropped as
data/regions.py drops them in training, out of bounds, empty, inverted or with a blank caption), so a data set can be checked before a pod is
reserved. A record is judged exactly as the loader judges it (the same source, with the same
`--max_image_bytes` as `input.max_image_bytes`, then `Preprocessor.check`: caption, then a full
decode), so `usable` is what training will use. Keys a tar shard's index drops (`duplicate_key`,
`member_out_of_bounds`, `truncated_shard`) are records of their own there, so they are in
`records` and `skipped` too (each shard that drops any is also named once on stderr).
"regions" and "skipped_regions" are there only for a set whose records carry regions.
"""
import collections
import json
import os
import sys
from concurrent import futures

from absl import flags

from siglip_jax import cli
from siglip_jax.data import preprocess as pp
from siglip_jax.data import regions as regions_lib
from siglip_jax.data import sources

_SHOW = 20   # bad records named on stderr


def open_source(shards="", directory="", max_image_bytes=sources.MAX_IMAGE_BYTES):
  if bool(shards) == bool(directory):
    raise ValueError("give exactly one of --shards=PATTERN or --dir=DIR")
  if shards:
    return sources.WebDatasetSource(shards, max_image_bytes=max_image_bytes)
  if sources.is_prepared(directory):
    return sources.ArrayRecordSource(directory)
  return sources.FolderSource(directory, max_image_bytes=max_image_bytes)


def verdicts(source, start, stop, image_size=224):
  """[(index, key, reason or None, (regions kept, regions dropped) or None where the record
  carries no regions)] for records [start, stop)."""
  pre = pp.Preprocessor(image_size=image_size)
  out = []
  for i in range(start, stop):
    rec = source[i]
    try:
      pre.check(rec)
      carried, regions = None, regions_lib.raw_regions(rec)
      if regions is not None:
        good, bad = regions_lib.parse_regions(regions)
        carried = (len(good), bad)
      out.append((i, rec.get("key", str(i)), None, carried))
    except pp.BadRecord as e:
      out.append((i, rec.get("key", str(i)), e.reason, None))
  return out


_SOURCE = None   # a pool worker's copy of the source (set once per worker)


def _init_worker(source):
  global _SOURCE   # pylint: disable=global-statement
  _SOURCE = source


def _worker_verdicts(start, stop, image_size):
  return verdicts(_SOURCE, start, stop, image_size)


def scan(source, *, image_size=224, workers=0, chunk=256):
  """Yields `verdicts` for every record, in order; parallel over processes."""
  n = len(source)
  workers = workers or os.cpu_count() or 1
  ranges = ((s, min(s + chunk, n)) for s in range(0, n, chunk))
  if workers == 1 or n <= chunk:
    for s, e in ranges:
      yield from verdicts(source, s, e, image_size)
    return
  # The source (an index, no file handles) goes to each worker once, not with every chunk;
  # a bounded window of chunks is in flight, so memory does not grow with the data set.
  with futures.ProcessPoolExecutor(workers, initializer=_init_worker,
                                   initargs=(source,)) as pool:
    pending = collections.deque()
    for s, e in ranges:
      pending.append(pool.submit(_worker_verdicts, s, e, image_size))
      if len(pending) >= 4 * workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


def summarize(results, stream=sys.stderr):
  records, skipped, shown, regions = 0, {}, 0, None
  for _, key, reason, carried in results:
    records += 1
    if carried is not None:
      regions = [a + b for a, b in zip(regions or (0, 0), carried)]
    if reason is not None:
      skipped[reason] = skipped.get(reason, 0) + 1
      if shown < _SHOW:
        shown += 1
        print(f"bad record {key}: {reason}", file=stream)
  report = {"records": records, "usable": records - sum(skipped.values()),
            "skipped": dict(sorted(skipped.items()))}
  if regions is not None:   # a set whose records carry regions (the LocCa decoder's)
    report["regions"], report["skipped_regions"] = regions
  return report


def _define_flags():
  # Defined only when run as a program: `prepare` imports this module and has flags of its own.
  flags.DEFINE_string("shards", "", "WebDataset tar shards: a glob or brace pattern "
                      "('/data/{00000..01242}.tar'), or several joined by ','; gs:// too.")
  flags.DEFINE_string("dir", "", "A folder with captions.jsonl, or a set written by prepare.")
  flags.DEFINE_integer("image_size", 224, "Decode as training at this size would (JPEG draft "
                       "scaling); the verdicts do not depend on it.")
  flags.DEFINE_integer("workers", 0, "Processes (0: one per CPU core).")
  flags.DEFINE_integer("max_image_bytes", sources.MAX_IMAGE_BYTES, "Larger images are skipped "
                       "unread (image_too_large), as with input.max_image_bytes.")


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.user_errors(ValueError, OSError):
    source = open_source(f.shards, f.dir, f.max_image_bytes)
  report = summarize(scan(source, image_size=f.image_size, workers=f.workers))
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
