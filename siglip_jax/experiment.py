"""From a config to the run's parts: tokenizer, model, data source, evaluators.

Shared by train, evaluate, bench and preflight so they all build the same thing. Checks that
need no compiling run first (`check_config`), so bad input fails in a second with one line
naming the config key.
"""
import logging

import numpy as np

from siglip_jax import config_defaults, errors, losses, models, naflex_config, objectives, optim
from siglip_jax import microbatch, perf
from siglip_jax.models import text as text_model, two_towers, vit


_log = logging.getLogger(__name__)


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message names the key."""


# Keys without a sensible default: every config sets them (config_defaults has the rest).
REQUIRED_KEYS = ("seed", "total_steps", "input.batch_size", "mesh")
DATA_KINDS = ("shapes", "scenes", "shapes_naflex", "webdataset", "tfds", "folder", "synthetic")


def _lookup(config, dotted):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise ConfigError(f"config key `{dotted}` is missing")
    node = node[part]
  return node


def _positive_int(config, key):
  value = _lookup(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ConfigError(f"config key `{key}` must be a positive integer; got {value!r}")


def unknown_key_message(key, near):
  return f"config key `{key}` is unknown" + (f"; did you mean `{near}`?" if near else "")


def check_config(config, num_devices=None):
  """Completes `config` with the defaults of every key it lacks (in place), then raises
  ConfigError naming the first bad key. Cheap: builds nothing, compiles nothing."""
  config_defaults.complete(config)
  unknown = config_defaults.unknown_keys(config)
  if unknown:
    raise ConfigError(unknown_key_message(*unknown[0]))
  for key in REQUIRED_KEYS:
    _lookup(config, key)
  for key in ("total_steps", "log_every_steps", "input.batch_size", "input.image_size",
              "input.text_len", "checkpoint.every_steps", "checkpoint.keep"):
    _positive_int(config, key)
  if config.loss.kind not in losses.LOSS_KINDS:
    raise ConfigError(f"config key `loss.kind`: {config.loss.kind!r} is unknown; "
                      f"use one of {', '.join(losses.LOSS_KINDS)}")
  data = config.input.data
  if data not in DATA_KINDS:
    raise ConfigError(f"config key `input.data`: {data!r} is unknown; use one of {DATA_KINDS}")
  image_cfg = resolve_variant(config.model.image, "model.image")
  resolve_variant(config.model.text, "model.text")
  for tower, allowed in (("image", vit.POOL_TYPES), ("text", text_model.POOL_TYPES)):
    pool = config.model[tower].get("pool_type", allowed[0])
    if pool not in allowed:
      raise ConfigError(f"config key `model.{tower}.pool_type`: {pool!r} is unknown; "
                        f"use one of {', '.join(allowed)}")
  _check_tower_dims(config)
  posemb = config.model.image.get("posemb", "learn")
  if posemb not in vit.POSEMB_TYPES:
    raise ConfigError(f"config key `model.image.posemb`: {posemb!r} is unknown; "
                      f"use one of {', '.join(vit.POSEMB_TYPES)}")
  try:
    models.check_image_size(config.input.image_size, image_cfg.get("patch_size", (16, 16)))
  except ValueError as e:
    raise ConfigError(f"config key `input.image_size`: {e}") from None
  if num_devices is not None and config.input.batch_size % num_devices:
    raise ConfigError(f"config key `input.batch_size`: {config.input.batch_size} is not "
                      f"divisible by the {num_devices} devices")
  try:
    perf.parse_steps(config.profile_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.optim.name not in optim.OPTIMIZERS:
    raise ConfigError(f"config key `optim.name`: {config.optim.name!r} is unknown; "
                      f"use one of {', '.join(optim.OPTIMIZERS)}")
  naflex_config.check_config(config)   # first: it says why SILC/TIPS don't go with NaFlex
  microbatch.check_config(config)
  objectives.check_config(config)
  _clip_schedule_to_run(config)
  try:
    optim.make_schedule(config.optim, config.total_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _clip_schedule_to_run(config):
  """A run shorter than its warm-up (a smoke run, `--config.total_steps=2`) is no mistake: the
  warm-up (then the cool-down) is clipped to fit, and that is said once."""
  sched, total = config.optim.schedule, int(config.total_steps)
  warmup, cooldown = int(sched.get("warmup_steps", 0)), int(sched.get("cooldown_steps", 0))
  if warmup + cooldown <= total:
    return
  new_warmup = min(warmup, total)
  new_cooldown = min(cooldown, total - new_warmup)
  sched.warmup_steps = new_warmup
  if "cooldown_steps" in sched:
    sched.cooldown_steps = new_cooldown
  _log.warning("total_steps=%d is shorter than the schedule's warm-up (%d) + cool-down (%d) "
               "steps: clipped to %d + %d for this run", total, warmup, cooldown, new_warmup,
               new_cooldown)


def _check_tower_dims(config):
  """Positive sizes and a width the heads divide, per tower, and embeddings of one size, before
  anything is traced."""
  out_dim = config.model.out_dim
  out_dims = two_towers.pair_of_out_dims(out_dim)
  embed = {}
  for tower, cls, head in (("image", vit.ViT, out_dims[0]),
                           ("text", text_model.TextTransformer, out_dims[1])):
    cfg = resolve_variant(config.model[tower], f"model.{tower}")
    dims = cls(**{k: cfg[k] for k in ("variant", "width", "depth", "mlp_dim", "num_heads")
                  if cfg.get(k) is not None}).dims
    for key in ("width", "depth", "num_heads"):
      value = dims[key]
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"config key `model.{tower}.{key}` must be a positive integer; "
                          f"got {value!r}")
    if dims["width"] % dims["num_heads"]:
      raise ConfigError(f"config key `model.{tower}.num_heads`: width {dims['width']} is not "
                        f"divisible by {dims['num_heads']} heads")
    if dims.get("mlp_dim") is not None and dims["mlp_dim"] <= 0:
      raise ConfigError(f"config key `model.{tower}.mlp_dim` must be positive; "
                        f"got {dims['mlp_dim']!r}")
    patch = dims.get("patch_size")
    if patch is not None and min(patch) <= 0:
      raise ConfigError(f"config key `model.image.patch_size` must be positive; got {patch!r}")
    rep = cfg.get("rep_size") if tower == "image" else None
    embed[tower] = head or (dims["width"] if rep is True else rep) or dims["width"]
  if embed["image"] != embed["text"]:
    raise ConfigError(f"config key `model.out_dim`: the image embedding has {embed['image']} "
                      f"dimensions and the text embedding {embed['text']} (out_dim "
                      f"{tuple(out_dims)}, widths as configured): they must be equal")


def resolve_variant(tower_cfg, key):
  """A tower's kwargs with its `variant` ("B/16") spelled out; explicit values win."""
  cfg = dict(tower_cfg)
  if cfg.get("variant"):
    try:
      base = models.decode_variant(cfg["variant"])
    except ValueError as e:
      raise ConfigError(f"config key `{key}.variant`: {e}") from None
    for k, v in base.items():
      if cfg.get(k) is None:
        cfg[k] = v
  return cfg


def make_tokenizer(config):
  from siglip_jax.data import tokenizer
  path = config.input.get("tokenizer", "") or None
  # The data pipeline's text options too, so evaluators tokenize prompts as training did.
  try:
    return tokenizer.Tokenizer(path, **tokenizer.options_from_input(config.input))
  except (OSError, ValueError) as e:
    raise ConfigError(f"config key `input.tokenizer`: {e}") from None


def portable_attention(config, platform):
  """For bench/preflight on a machine without the config's GPU: cuDNN attention lowers only on
  NVIDIA GPUs, so elsewhere it becomes XLA's (same math). Returns a note saying so, or None."""
  if platform != "gpu" and config.model.get("attention_impl") == "cudnn":
    config.model.attention_impl = ""
    return ("model.attention_impl='cudnn' replaced by XLA attention on this "
            f"{platform} backend (the fused kernel keeps no attention matrix)")
  return None


def make_model(config, vocab_size):
  """The TwoTowers module; a text vocab_size of 0 in the config means the tokenizer's."""
  model_cfg = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  text = dict(model_cfg["text"])
  if not text.get("vocab_size"):
    text["vocab_size"] = vocab_size
  model_cfg["text"] = text
  # "" in a config (ml_collections cannot override a None field from the command line) = auto.
  model_cfg["attention_impl"] = model_cfg.get("attention_impl") or None
  return models.from_config(model_cfg), text["vocab_size"]


def make_train_source(config):
  """The configured training data as a random-access source of raw records (`data/sources.py`):
  real data and the embedded demo sets alike."""
  from siglip_jax.data import sources
  return _config_errors(sources.from_config, config)


def _config_errors(fn, *args):
  """Bad data settings (no shards match, an unprepared TFDS set) as one-line ConfigErrors."""
  try:
    return fn(*args)
  except (ValueError, OSError) as e:
    raise ConfigError(f"config key `input` (input.data={args[0].input.get('data')!r}): "
                      f"{e}") from None


def make_train_data(config, tokenizer, sharding, data_state=None, views_from=None):
  """The trainer's batch iterator (`pipeline.Batches`: every source goes through the one Grain
  loader), starting at `data_state` ({"data_position": next step, "data_skipped": running skip
  total}, as checkpoints keep it; {} for a fresh run); batches of steps >= `views_from` also
  hold SILC/TIPS's views. `tokenizer` is unused: the loader tokenizes with the same `input`
  settings (`preprocess.from_config`)."""
  del tokenizer
  from siglip_jax.data import pipeline
  return _config_errors(pipeline.make_batches, config, sharding, data_state or {}, views_from)


def make_evaluators(config):
  evals = []
  for name, cfg in (config.get("evals") or {}).items():
    kind = cfg.get("kind", name)
    if kind == "shapes":
      from siglip_jax.data import shapes
      from siglip_jax.evaluators.shapes import ShapesEvaluator
      # num_heldout / num_unseen: a smaller set where the shapes are only a smoke check.
      ds = shapes.ShapesDataset(seed=config.seed, image_size=config.input.image_size,
                                num_heldout=cfg.get("num_heldout", 512),
                                num_unseen=cfg.get("num_unseen", 512))
      evals.append(ShapesEvaluator(ds, every_steps=cfg.get("every_steps", 0), prefix=name))
    elif kind == "shapes_naflex":
      from siglip_jax.data import shapes_naflex
      from siglip_jax.evaluators.shapes_naflex import ShapesNaflexEvaluator
      # base_size: the canvases' short side, by default the training source's (image_size).
      ds = shapes_naflex.AspectShapesDataset(
          seed=config.seed, base_size=cfg.get("base_size", config.input.image_size),
          num_heldout=cfg.get("num_heldout", 512), num_unseen=cfg.get("num_unseen", 512))
      evals.append(ShapesNaflexEvaluator(ds, every_steps=cfg.get("every_steps", 0),
                                         prefix=name, batch_size=cfg.get("batch_size", 256)))
    elif kind == "scenes":
      from siglip_jax.data import scenes
      from siglip_jax.evaluators.scenes import ScenesEvaluator
      ds = scenes.ScenesDataset(seed=config.seed, image_size=config.input.image_size,
                                num_heldout=cfg.get("num_heldout", 512),
                                num_unseen=cfg.get("num_unseen", 256))
      evals.append(ScenesEvaluator(ds, every_steps=cfg.get("every_steps", 0), prefix=name,
                                   num_probe_train=cfg.get("num_probe_train", 1024)))
    elif kind in ("zeroshot", "retrieval"):
      import importlib  # their sources may need optional packages (tensorflow_datasets)
      module = importlib.import_module(f"siglip_jax.evaluators.{kind}")
      try:
        evals.append(module.from_config(name, cfg))
      except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"config key `evals.{name}`: {e}") from None
    else:
      raise ConfigError(f"config key `evals.{name}.kind`: {kind!r} is unknown")
  return evals


def example_batch(config, objectives, seq_len=None):
  """ShapeDtypeStructs of a global batch: the image (a NaFlex run's patches, patch mask and
  grid shapes at `seq_len`, default its longest length) and text, and what the objectives
  read."""
  import jax
  import jax.numpy as jnp
  if naflex_config.is_naflex(config):
    n = seq_len or max(naflex_config.seq_lens(config))
    b = naflex_config.batch_sizes(config).get(n, config.input.batch_size)
    p = naflex_config.patch_size(config)
    out = {"patches": jax.ShapeDtypeStruct((b, n, p * p * 3), jnp.float32),
           "patch_mask": jax.ShapeDtypeStruct((b, n), jnp.int32),
           "spatial_shapes": jax.ShapeDtypeStruct((b, 2), jnp.int32)}
  else:
    b, size = config.input.batch_size, config.input.image_size
    out = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)}
  out["text"] = jax.ShapeDtypeStruct((b, config.input.text_len), jnp.int32)
  for o in objectives:
    out.update({k: jax.ShapeDtypeStruct((b, *shape), dtype)
                for k, (shape, dtype) in o.batch_spec(config).items()})
  return out
