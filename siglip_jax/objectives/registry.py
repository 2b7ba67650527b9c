"""Which objectives a config trains, their checks, and which are on at a step."""
from siglip_jax import errors

NAMES = ("contrastive", "locca", "silc", "tips")


class ObjectiveConfigError(errors.UserError, ValueError):
  """An `objectives.*` value that cannot work; the message names the key."""


class Objective:
  """Base: `name`, `weight`, `start_step`; subclasses add `init` and `loss` (see the package
  docstring)."""
  name = ""
  uses_teacher = False  # SILC and TIPS: read the EMA teacher's outputs (objectives/distill.py)
  batch_keys = ()     # batch entries it reads besides image and text
  param_names = ()    # top-level parameter names it owns (beside img, txt, t, b)
  # The contrastive loss couples the whole batch's embeddings: gradient caching computes it
  # once over all micro-batches (microbatch.py); the others are sums over examples.
  coupled = False

  def __init__(self, weight, start_step):
    self.weight, self.start_step = float(weight), int(start_step)

  def init(self, rng, batch, tower_out):
    del rng, batch, tower_out
    return {}

  def normalizer(self, batch):
    """What the loss divides by, read off the whole global batch (data only, no parameters):
    `loss(params, micro_batch, ctx, norm)` is then that micro-batch's share of the global loss,
    and the shares (and metrics) of the K micro-batches add up to the K = 1 values."""
    del batch
    return None

  def forward_flops(self, *, image_tokens, image_width):
    """Forward matmul FLOPs per example beyond the towers and the contrastive loss."""
    del image_tokens, image_width
    return 0

  def batch_spec(self, config):
    """{key: (shape after the batch axis, dtype)} of the batch entries it reads."""
    del config
    return {}

  def synthetic_batch(self, key, batch_size, text_vocab):
    """Random batch entries of `batch_spec`'s shapes with valid values (bench's data)."""
    del key, batch_size, text_vocab
    return {}


def weighted_sum(objectives, params, batch, ctx, norms=None):
  """(sum_k weight_k * loss_k, {"train/loss_<name>": loss_k, and each one's metrics}) over
  `objectives`; `norms` {name: normalizer}: a micro-batch's shares (Objective.normalizer)."""
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel (config code imports this)
  total, metrics = jnp.zeros((), jnp.float32), {}
  for o in objectives:
    loss, extra = o.loss(params, batch, ctx, *(() if norms is None else (norms[o.name],)))
    total = total + o.weight * loss
    metrics[f"train/loss_{o.name}"] = loss
    metrics.update(extra)
  return total, metrics


def _start_step(cfg, total_steps):
  return int(round(float(cfg.get("start_fraction", 0.0)) * int(total_steps)))


def configured(config):
  """[(name, weight, start_step)] of the objectives this config trains: contrastive always,
  the others when their weight is above 0."""
  out = []
  for name in NAMES:
    cfg = config.objectives[name]
    weight = float(cfg.weight)
    if name == "contrastive" or weight > 0:
      out.append((name, weight, _start_step(cfg, config.total_steps)))
  return out


def check_config(config):
  """Raises ObjectiveConfigError naming the first bad `objectives.*` key (names that do not
  exist are the config key check's: config_defaults knows every objective's keys)."""
  for name in NAMES:
    cfg = config.objectives[name]
    weight = cfg.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
      raise ObjectiveConfigError(f"config key `objectives.{name}.weight` must be a number >= 0; "
                                 f"got {weight!r}")
    fraction = cfg.start_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
        not 0 <= fraction <= 1:
      raise ObjectiveConfigError(f"config key `objectives.{name}.start_fraction` must be in "
                                 f"[0, 1]; got {fraction!r}")
  if float(config.objectives.locca.weight) > 0:
    from siglip_jax.objectives import locca
    locca.check_config(config)
  from siglip_jax.objectives import distill_config
  distill_config.check_config(config)


def build(config, *, towers, text_vocab, mesh):
  """The objective objects of `configured(config)`, contrastive first."""
  from siglip_jax.objectives import contrastive, distill, locca
  classes = {"contrastive": contrastive.Contrastive, "locca": locca.LocCa,
             "silc": distill.SILC, "tips": distill.TIPS}
  return [classes[name](config, towers=towers, text_vocab=text_vocab, mesh=mesh, weight=weight,
                        start_step=start)
          for name, weight, start in configured(config)]


def set_switch_step(objectives, step):
  """The recorded switch step (a checkpoint's) for the objectives that use the EMA teacher."""
  for o in objectives:
    if o.uses_teacher:
      o.start_step = int(step)


def active_names(objectives, step):
  """Names of the objectives on for the update after `step` completed ones."""
  return frozenset(o.name for o in objectives if step >= o.start_step)
