"""From a config to the run's parts: tokenizer, model, data source, evaluators.

Shared by train, evaluate, bench and preflight so they all build the same thing. Checks that
need no compiling run first (`check_config`), so bad input fails in a second with one line
naming the config key.
"""
import numpy as np

from siglip_jax import losses, models, optim
from siglip_jax.models import text as text_model, vit


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


REQUIRED_KEYS = ("seed", "total_steps", "log_every_steps", "input.batch_size", "loss.kind",
                 "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_every",
                 "model_init", "model_load.dont_load", "mesh")
DATA_KINDS = ("shapes", "webdataset", "tfds", "folder", "synthetic")


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


def check_config(config, num_devices=None):
  """Raises ConfigError naming the first bad key. Cheap: builds nothing, compiles nothing."""
  for key in REQUIRED_KEYS:
    _lookup(config, key)
  for key in ("total_steps", "log_every_steps", "input.batch_size", "checkpoint.every_steps",
              "checkpoint.keep"):
    _positive_int(config, key)
  if config.loss.kind not in losses.LOSS_KINDS:
    raise ConfigError(f"config key `loss.kind`: {config.loss.kind!r} is unknown; "
                      f"use one of {', '.join(losses.LOSS_KINDS)}")
  data = config.input.get("data", "shapes")
  if data not in DATA_KINDS:
    raise ConfigError(f"config key `input.data`: {data!r} is unknown; use one of {DATA_KINDS}")
  image_cfg = resolve_variant(config.model.image, "model.image")
  resolve_variant(config.model.text, "model.text")
  for tower, allowed in (("image", vit.POOL_TYPES), ("text", text_model.POOL_TYPES)):
    pool = config.model[tower].get("pool_type", allowed[0])
    if pool not in allowed:
      raise ConfigError(f"config key `model.{tower}.pool_type`: {pool!r} is unknown; "
                        f"use one of {', '.join(allowed)}")
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
  if config.get("optim") is not None:
    try:
      optim.make_schedule(config.optim, config.total_steps)
    except ValueError as e:
      raise ConfigError(str(e)) from None


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
  return tokenizer.Tokenizer(path)


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
  """`examples(global_indices) -> dict(image, text)` for the configured training data."""
  data = config.input.get("data", "shapes")
  if data == "shapes":
    from siglip_jax.data import shapes
    ds = shapes.ShapesDataset(seed=config.seed, image_size=config.input.image_size)
    return ds.train_examples
  raise ConfigError(f"config key `input.data`: {data!r} needs the data pipeline "
                    "(siglip_jax.data.pipeline)")


def make_evaluators(config):
  evals = []
  for name, cfg in (config.get("evals") or {}).items():
    kind = cfg.get("kind", name)
    if kind == "shapes":
      from siglip_jax.data import shapes
      from siglip_jax.evaluators.shapes import ShapesEvaluator
      ds = shapes.ShapesDataset(seed=config.seed, image_size=config.input.image_size)
      evals.append(ShapesEvaluator(ds, every_steps=cfg.get("every_steps", 0), prefix=name))
    else:
      raise ConfigError(f"config key `evals.{name}.kind`: {kind!r} is unknown")
  return evals
