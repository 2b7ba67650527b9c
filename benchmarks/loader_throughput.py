r"""Data loader throughput at 224 px: pairs/s per CPU core, and cores to feed an accelerator.

    python benchmarks/loader_throughput.py [--images=2000] [--shards=4] [--batch=256]
        [--workers=0,2] [--method=bicubic|bilinear] [--tokenizer=PATH] [--target=3400] [--dir=/tmp/siglip_loader_bench]

Makes WebDataset shards of random JPEGs (256-400 px a side, photo-like: smooth colour fields
plus grain, quality 90) with captions under --dir (once; reused), then measures:

1. one core: the loader's per-example work (read the tar member by offset, decode the JPEG,
   resize to 224 bicubic, tokenize the caption) in one thread, as pairs per CPU-second
   (`thread_time`, so other jobs on the machine do not distort it), with the time split by stage;
2. the whole Grain loader (`pipeline.host_batches`) with N worker processes, as wall-clock
   pairs/s (this one does depend on what else the machine runs).

Prints one JSON object; "cores_for_target" = ceil(target / pairs per core-second).
"""
import argparse
import io
import json
import math
import os
import platform
import tarfile
import time

import numpy as np
from PIL import Image

from siglip_jax.data import pipeline, preprocess, sources

WORDS = ("a photo of the dog cat red blue small large tree house car beach sunset city street "
         "man woman child playing on in with near old new green white black bird flower "
         "mountain lake river painting drawing of two three people standing sitting").split()


def make_shards(directory, images, num_shards, seed=0):
  os.makedirs(directory, exist_ok=True)
  done = os.path.join(directory, f"done-{images}-{num_shards}")
  if os.path.exists(done):
    return os.path.join(directory, "*.tar")
  rng = np.random.default_rng(seed)
  per = -(-images // num_shards)
  for s in range(num_shards):
    with tarfile.open(os.path.join(directory, f"bench-{s:05d}.tar"), "w") as tar:
      for i in range(s * per, min((s + 1) * per, images)):
        w, h = (int(v) for v in rng.integers(256, 401, 2))
        # Photo-like content: a smooth field (upsampled 6x6 colours) plus grain; pure noise
        # would make JPEGs several times larger and slower to decode than real photos.
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(field, np.float32) + rng.normal(0, 6, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(5, 25)))).encode()
        for ext, data in (("jpg", buf.getvalue()), ("txt", caption)):
          info = tarfile.TarInfo(f"{i:08d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  open(done, "w").close()
  return os.path.join(directory, "*.tar")


def one_core(src, pre, n):
  """Per-stage CPU seconds for n examples in this thread."""
  stages = dict(read=0.0, decode=0.0, resize=0.0, tokenize=0.0)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(src))[:n]
  pre.tokenizer.encode(["warm up"], 64)
  for i in order:
    t0 = time.thread_time()
    raw = src[int(i)]
    t1 = time.thread_time()
    img = preprocess.decode_image(raw["image"], pre.draft)
    t2 = time.thread_time()
    pre.pixels(img, rng)
    t3 = time.thread_time()
    pre.tokenizer.encode([preprocess.pick_caption(raw["texts"], rng)], pre.text_len)
    t4 = time.thread_time()
    for k, a, b in (("read", t0, t1), ("decode", t1, t2), ("resize", t2, t3), ("tokenize", t3, t4)):
      stages[k] += b - a
  return stages


def loader_wall(src, pre, batch, workers, steps):
  loader = pipeline.StepLoader(src, pre, seed=0, global_batch=batch, rows=range(batch),
                               threads=1 if workers else os.cpu_count())
  it = pipeline.host_batches(loader, 0, workers=workers, prefetch=2)
  next(it)   # start-up (worker processes, imports) is not throughput
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t0
  if hasattr(it, "close"):
    it.close()
  return steps * batch / dt


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dir", default="/tmp/siglip_loader_bench")
  p.add_argument("--images", type=int, default=2000)
  p.add_argument("--shards", type=int, default=4)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--text_len", type=int, default=64)
  p.add_argument("--method", default="bicubic", choices=sorted(preprocess.METHODS))
  p.add_argument("--tokenizer", default="", help="a SentencePiece .model (default: the demo's)")
  p.add_argument("--single", type=int, default=1000, help="examples for the one-core figure")
  p.add_argument("--workers", default="0,2", help="Grain worker counts to time (0: threads)")
  p.add_argument("--steps", type=int, default=6, help="batches timed per worker count")
  p.add_argument("--target", type=float, default=3400.0, help="pairs/s to feed (one H100)")
  args = p.parse_args()

  src = sources.WebDatasetSource(make_shards(args.dir, args.images, args.shards))
  pre = preprocess.Preprocessor(image_size=args.image_size, text_len=args.text_len,
                                method=args.method, tokenizer=args.tokenizer or None)
  stages = one_core(src, pre, min(args.single, len(src)))
  cpu = sum(stages.values())
  n = min(args.single, len(src))
  per_core = n / cpu
  out = {
      "image_size": args.image_size, "method": args.method, "records": len(src),
      "mean_jpeg_kb": round(float(np.mean(src._index[:, 2])) / 1024, 1),  # pylint: disable=protected-access
      "pairs_per_core_s": round(per_core, 1),
      "ms_per_pair": {k: round(1e3 * v / n, 3) for k, v in stages.items()},
      "cores_for_target": math.ceil(args.target / per_core), "target_pairs_s": args.target,
      "loader_pairs_s": {w: round(loader_wall(src, pre, args.batch, int(w), args.steps), 1)
                         for w in args.workers.split(",") if w != ""},
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "load_avg": [round(x, 1) for x in os.getloadavg()],
      "date": time.strftime("%Y-%m-%d"),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
