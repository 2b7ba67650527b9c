"""`preflight --max_batch`: the largest global batch that fits the chip, with K = 1 and with K
micro-batches (`input.microbatches`, gradient caching).

For a fixed K the per-device memory is affine in the batch: the activations grow with the
micro-batch (global batch / K), the O(B) buffers (the batch slice, the embeddings and their
gradients) with the global batch, and the state not at all. So a search
1. compiles the step at a start size;
2. compiles at the size where the line through that and the state alone (what no batch changes)
   reaches `usable_fraction x HBM`;
3. compiles where the line through the two compiled sizes nearest the limit reaches it, to
   confirm it: an answer is always a compiled size that fits;
and stops when the line says less than `TOLERANCE` more would fit, or a miss is that close
above. Otherwise (a prediction that missed, or a confirmed one with room) it goes on the same
way inside the bracket found, through a parabola once three sizes are known (memory that curves
up: a [B/d, B] logits buffer grows as B squared), for `MAX_COMPILES` at most.

- K = 1: over the global batch, a multiple of the batch axes' device count, from the config's
  batch (the report's own compile when the config's K is 1: step 1 costs nothing).
- K > 1: over the micro-batch (global batch = K x micro-batch, so a multiple of K x devices),
  from K = 1's answer, which bounds the micro-batch (a micro-batch holds what a K = 1 step of
  that size holds, plus the whole batch's O(B) buffers).

Compiles per K: at most 3 when memory is affine (2 for K = 1 when the config's K is 1; one
fewer when the first prediction lands within `TOLERANCE`), never more than 5. Measured:
configs/siglip_b16_224.py on 8 simulated H100s, "B/16 on 8 H100: 4,792 pairs fit with K=1;
71,424 with K=16" from the report's compile + 2 + 2 (3 min on 2 CPU cores); the tiny test demo
on a 0.03 GiB chip, 199 with K=1 and 632 with K=4 from 1 + 1 + 2. XLA's buffer assignment is
affine only roughly (the tiny demo's total jumps by 10% between some neighbouring sizes).
"""
import copy
import math

MAX_COMPILES = 5
# A search stops once the largest size that fits and the next it could try are this close
# (relative; at least one step): closer is below the noise of XLA's buffer assignment.
TOLERANCE = 1 / 32
# No search goes past this global batch (the largest published contrastive batches are ~1M).
MAX_GLOBAL_BATCH = 1 << 20


def search(measure, unit, limit, start, cap, fixed=0, known=None, max_compiles=MAX_COMPILES,
           tolerance=TOLERANCE):
  """Largest n, a multiple of `unit` in [unit, cap], with measure(n) <= limit, taking the
  measure as affine in n (see the module docstring). `measure(n)` is the expensive call (a
  compile); `known` holds sizes already measured {n: value}, which cost nothing; `fixed` is
  what does not grow with n (the state), the line's other end while one size is measured.

  Returns (n or None when not even `unit` fits, points {n: value} of every measured size,
  compiles made). n is always a measured size that fits; a larger one is left untried when it
  would gain less than `tolerance` x n."""
  points, compiles = dict(known or {}), 0
  cap = max(unit, cap // unit * unit)

  def get(n):
    nonlocal compiles
    if n not in points:
      points[n] = measure(n)
      compiles += 1
    return points[n]

  if not points:
    get(min(cap, max(unit, start // unit * unit)))
  while True:
    fits = [n for n, v in points.items() if v <= limit]
    over = [n for n, v in points.items() if v > limit]
    lo, hi = max(fits, default=None), min(over, default=None)
    if hi == unit:
      return None, points, compiles           # one row per device does not fit
    close = max(unit, int((lo or 0) * tolerance))
    if lo is not None and (lo == cap or (hi is not None and hi - lo <= close)):
      return lo, points, compiles             # bracketed closely enough, or at the cap
    x = _predict(points, limit, fixed, bracketed=lo is not None and hi is not None)
    guess = cap if x is None else int(min(x, cap)) // unit * unit
    guess = min(max(guess, unit), cap)
    if lo is not None:
      guess = max(guess, lo)
    if hi is not None:
      guess = min(guess, hi - unit)
    if lo is not None and guess - lo < close and len(points) == 1:
      guess = min(2 * lo, cap)                # (0, fixed) is no measurement: try twice as many
    elif (lo is not None and guess - lo < close) or compiles >= max_compiles:
      return lo, points, compiles             # confirmed (the line says little more fits)
    get(guess)


def _predict(points, limit, fixed, bracketed):
  """Where the memory reaches `limit` (a real number; None: it does not grow) from the measured
  `points`: bracketed, through the two sizes nearest the limit on either side, and with three
  sizes or more a parabola through the three nearest, which catches a memory that curves up
  (a [B/d, B] logits buffer grows as B squared) where a line would creep up on the limit from
  below; else the line through the two sizes nearest the limit (while one is measured, through
  it and (0, fixed): the state is all that does not grow)."""
  near = sorted(points, key=lambda n: (abs(points[n] - limit), -n))
  if bracketed:
    lo = max(n for n in points if points[n] <= limit)
    hi = min(n for n in points if points[n] > limit)
    third = [n for n in near if n not in (lo, hi)][:1]
    if third:
      root = _parabola_root([(n, points[n]) for n in (lo, hi, *third)], limit, lo, hi)
      if root is not None:
        return root
    (a, va), (b, vb) = (lo, points[lo]), (hi, points[hi])
  elif len(near) >= 2:
    (a, va), (b, vb) = [(n, points[n]) for n in near[:2]]
  else:
    (a, va), (b, vb) = (0, fixed), (near[0], points[near[0]])
  slope = (vb - va) / (b - a)
  return None if slope <= 0 else a + (limit - va) / slope


def _parabola_root(xy, limit, lo, hi):
  """The x in (lo, hi) where the parabola through the three points xy reaches `limit`."""
  (x0, y0), (x1, y1), (x2, y2) = xy
  d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
  c2 = (d12 - d01) / (x2 - x0)
  c1 = d01 - c2 * (x0 + x1)            # y = c2 x^2 + c1 x + c0 through the three
  c0 = y0 - c2 * x0 * x0 - c1 * x0
  if abs(c2) * (hi - lo) ** 2 < 1e-9 * abs(limit):
    return None                        # a line: the secant says it as well
  disc = c1 * c1 - 4 * c2 * (c0 - limit)
  if disc < 0:
    return None
  roots = [(-c1 + sign * math.sqrt(disc)) / (2 * c2) for sign in (1, -1)]
  inside = [r for r in roots if lo <= r <= hi]
  return min(inside) if inside else None


def max_batches(config, report, estimate, microbatches_for_max=16, log=None):
  """{"1": K = 1's answer, str(K): K's answer} for the config (see the module docstring).

  `report` is `preflight.estimate`'s report for the config as it is; `estimate(config)` makes
  one for another config (one compile). Each answer: global_batch (None: nothing fits),
  micro_batch, per_device_micro_batch, total_gib and total_bytes of the confirmed compile,
  compiles (this search's; the report's own compile is reused, not counted), capped (stopped at
  MAX_GLOBAL_BATCH or, for K > 1, at K = 1's answer: more may fit) and points ([[global batch,
  per-device total bytes], ...] of every size measured)."""
  devices = report["batch_devices"]
  limit = report["usable_bytes"]
  own_k, own_batch = report["microbatches"], report["global_batch"]
  b = report["per_device_bytes"]
  state = b["params"] + b["opt_state"] + b["other_state"]   # what no batch size changes
  k_many = own_k if own_k > 1 else int(microbatches_for_max)
  if k_many < 2:
    raise ValueError(f"--microbatches_for_max must be at least 2, got {microbatches_for_max}")
  def measure(k, micro):
    """Per-device total bytes with K = k and micro-batch `micro` (global k x micro)."""
    cfg = copy.deepcopy(config)
    cfg.input.batch_size, cfg.input.microbatches = k * micro, k
    r = estimate(cfg)
    if log:
      log(f"max_batch: K={k} global batch {k * micro:,}: {r['total_gib']:.3f} GiB per device "
          f"({'fits' if r['fits'] else 'does not fit'}; compiled in {r['compile_s']} s)")
    return r["per_device_bytes"]["total"]

  def answer(k, n, points, compiles, cap):
    total = points[n] if n is not None else None
    return {"global_batch": k * n if n else None, "micro_batch": n,
            "per_device_micro_batch": n // devices if n else None,
            "total_gib": round(total / 1024 ** 3, 3) if n else None, "total_bytes": total,
            "compiles": compiles, "capped": n is not None and n == cap,
            "points": [[k * m, v] for m, v in sorted(points.items())]}

  out = {}
  # K = 1: over the global batch.
  known = {own_batch: report["per_device_bytes"]["total"]} if own_k == 1 else {}
  cap1 = MAX_GLOBAL_BATCH // devices * devices
  n1, points, compiles = search(lambda b: measure(1, b), devices, limit, own_batch, cap1,
                                fixed=state, known=known)
  out["1"] = answer(1, n1, points, compiles, cap1)
  # K > 1: over the micro-batch, bounded by K = 1's answer.
  if n1 is None:
    out[str(k_many)] = answer(k_many, None, {}, 0, 0)
    return out
  cap = min(n1, MAX_GLOBAL_BATCH // (k_many * devices) * devices)
  known = {own_batch // own_k: report["per_device_bytes"]["total"]} if own_k == k_many else {}
  known = {m: v for m, v in known.items() if m <= cap}
  nk, points, compiles = search(lambda m: measure(k_many, m), devices, limit, cap, cap,
                                fixed=state, known=known)
  out[str(k_many)] = answer(k_many, nk, points, compiles, cap)
  return out


def summary(report, max_batch):
  """'B/16 on 8 H100: 2,048 pairs fit with K=1; 32,768 with K=16'."""
  parts = []
  for k, a in max_batch.items():
    n = a["global_batch"]
    what = f"{n:,}" if n else "none"
    if a["capped"]:
      what = f"at least {what}"
    parts.append(f"{what} pairs fit with K={k}" if not parts else f"{what} with K={k}")
  return f"{report['model']} on {report['devices']} {report['chip']}: {'; '.join(parts)}"
