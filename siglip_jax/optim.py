"""Optax optimizers from config: schedules, regex param groups, freezing, weight decay on kernels.

Config (`config.optim`):
  name: "adamw" | "adafactor"; lr, wd, b1, b2, clip_norm;
  schedule: decay "cosine" | "rsqrt" | "linear" | "constant", warmup_steps, cooldown_steps,
    end_lr_frac, timescale (rsqrt);
  lr_mults: ((regex, multiplier), ...), first full match on the '/'-joined param name wins;
  frozen: (regex, ...): those params get no update and no optimizer state (LiT: ("img/.*",)).
"""
import re

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")
DECAYS = ("cosine", "rsqrt", "linear", "constant")


def param_names(tree):
  """Same-structure tree of '/'-joined names ("img/embedding/kernel")."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def _get(cfg, key, default):
  return cfg.get(key, default) if hasattr(cfg, "get") else default


def make_schedule(optim_cfg, total_steps):
  """lr(step) for step = number of completed updates (the first update uses step 0).

  With `source_total_steps` and `offset_steps` (what `model_init.continue_schedule` writes for
  `continue_init`), the schedule is another run's, from its step `offset_steps` on, stretched
  over this run's `total_steps`: step s is the source's step offset + s * (T0 - offset) / total.
  """
  sched = dict(_get(optim_cfg, "schedule", {}) or {})
  sched.pop("continue_init", None)   # resolved (or not) into the two keys below
  if "source_total_steps" in sched:
    source_total = int(sched.pop("source_total_steps"))
    offset = int(sched.pop("offset_steps", 0))
    source = make_schedule({"lr": optim_cfg["lr"], "schedule": sched}, source_total)
    stretch = (source_total - offset) / max(int(total_steps), 1)
    return lambda step: source(offset + jnp.asarray(step, jnp.float32) * stretch)
  base = float(_get(optim_cfg, "lr", 0.0))
  decay = sched.get("decay", "cosine")
  if decay not in DECAYS:
    raise ValueError(f"config key `optim.schedule.decay`: {decay!r} is unknown; "
                     f"use one of {', '.join(DECAYS)}")
  warmup = int(sched.get("warmup_steps", 0))
  cooldown = int(sched.get("cooldown_steps", 0))
  end_frac = float(sched.get("end_lr_frac", 0.0))
  timescale = float(sched.get("timescale", max(warmup, 1)))
  if warmup + cooldown > total_steps:
    raise ValueError(f"config key `optim.schedule`: warmup_steps ({warmup}) + cooldown_steps "
                     f"({cooldown}) exceed total_steps ({total_steps})")

  def lr(step):
    # `step` counts completed updates, so the first update uses lr(0) > 0 and the last one
    # lr(total_steps - 1) > 0: no update is wasted at a zero learning rate.
    step = jnp.asarray(step, jnp.float32)
    s = step + 1.0
    frac = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if decay == "cosine":
      mult = end_frac + (1 - end_frac) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif decay == "linear":
      mult = end_frac + (1 - end_frac) * (1 - frac)
    elif decay == "rsqrt":
      mult = jax.lax.rsqrt(jnp.maximum(step - warmup + timescale, timescale) / timescale)
    else:
      mult = jnp.ones_like(s)
    if warmup:
      mult = mult * jnp.minimum(s / warmup, 1.0)
    if cooldown:
      mult = mult * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
    return base * mult

  return lr


def _first_match(name, patterns):
  for i, pattern in enumerate(patterns):
    if re.fullmatch(pattern, name):
      return i
  return None


def _check_patterns(patterns, key):
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"config key `{key}`: {p!r} is not a valid regex ({e})") from None


def param_labels(params, optim_cfg):
  """Label each param "frozen" or "lr_x<mult>,wd" / "lr_x<mult>,nowd" (decay on kernels only).

  One optax group per label keeps every group's transform uniform (masks inside
  `multi_transform` groups would see a pruned tree)."""
  frozen = list(_get(optim_cfg, "frozen", ()) or ())
  mults = [(p, float(m)) for p, m in (_get(optim_cfg, "lr_mults", ()) or ())]
  _check_patterns(frozen, "optim.frozen")
  _check_patterns([p for p, _ in mults], "optim.lr_mults")

  def label(name):
    if _first_match(name, frozen) is not None:
      return "frozen"
    i = _first_match(name, [p for p, _ in mults])
    decay = "wd" if name.endswith("kernel") else "nowd"
    return f"lr_x{mults[i][1] if i is not None else 1.0},{decay}"

  labels = jax.tree_util.tree_map(label, param_names(params))
  for pattern in frozen:  # a freezing regex that matches nothing is almost surely a typo
    if not any(re.fullmatch(pattern, n) for n in jax.tree_util.tree_leaves(param_names(params))):
      raise ValueError(f"config key `optim.frozen`: {pattern!r} matches no parameter")
  return labels


def update_multipliers(params, lr_mults):
  """A tree of floats like `params` (or None when `lr_mults` is empty): each param's
  multiplier by the first full match of its name in `lr_mults` ((regex, multiplier), ...),
  else 1. The step multiplies the optimizer's updates by it: a learning-rate multiplier that,
  unlike an optax group, holds no state, so changing it on a resume keeps the checkpoint's
  optimizer state (the distillation heads' `head_lr_mult`)."""
  if not lr_mults:
    return None
  _check_patterns([p for p, _ in lr_mults], "objectives.*.head_lr_mult")

  def mult(name):
    i = _first_match(name, [p for p, _ in lr_mults])
    return float(lr_mults[i][1]) if i is not None else 1.0
  return jax.tree_util.tree_map(mult, param_names(params))


def _scale_by_optimizer(optim_cfg):
  name = _get(optim_cfg, "name", "adamw")
  if name == "adamw":
    return optax.scale_by_adam(b1=float(_get(optim_cfg, "b1", 0.9)),
                               b2=float(_get(optim_cfg, "b2", 0.999)),
                               eps=float(_get(optim_cfg, "eps", 1e-8)))
  if name == "adafactor":
    # Factored second moments keep optimizer memory near zero for large matrices.
    return optax.chain(optax.scale_by_factored_rms(decay_rate=float(_get(optim_cfg, "b2", 0.8))),
                       optax.clip_by_block_rms(1.0))
  raise ValueError(f"config key `optim.name`: {name!r} is unknown; "
                   f"use one of {', '.join(OPTIMIZERS)}")


def make_optimizer(params, optim_cfg, total_steps):
  """Returns (optax transformation, lr schedule). `params` may be ShapeDtypeStructs."""
  lr_fn = make_schedule(optim_cfg, total_steps)
  labels = param_labels(params, optim_cfg)
  frozen_mask = jax.tree_util.tree_map(lambda l: l == "frozen", labels)
  wd = float(_get(optim_cfg, "wd", 0.0))

  def group(label):
    mult, decay = label[len("lr_x"):].split(",")
    # Decoupled weight decay, scaled by the lr as in AdamW (and big_vision's wd * lr).
    return optax.chain(
        _scale_by_optimizer(optim_cfg),
        optax.add_decayed_weights(wd) if wd and decay == "wd" else optax.identity(),
        optax.scale_by_schedule(lambda step: -float(mult) * lr_fn(step)))

  groups = {l: group(l) for l in sorted(set(jax.tree_util.tree_leaves(labels))) if l != "frozen"}
  groups["frozen"] = optax.set_to_zero()
  clip = _get(optim_cfg, "clip_norm", None)
  tx = optax.chain(
      # Zero frozen grads first so they neither count in the clipping norm nor move.
      optax.masked(optax.set_to_zero(), frozen_mask),
      optax.clip_by_global_norm(float(clip)) if clip else optax.identity(),
      optax.multi_transform(groups, labels))
  return tx, lr_fn
