"""From a config to the run's parts: tokenizer, model, data source, evaluators.

Shared by train, evaluate, bench and preflight so they all build the same thing. Checks that
need no compiling run first (`check_config`), so bad input fails in a second with one line
naming the config key.
"""
import numpy as np

from siglip_jax import losses, models, optim, perf
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
  try:
    perf.parse_steps(config.get("profile_steps", ""))
  except ValueError as e:
    raise ConfigError(str(e)) from None
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
  inp = config.input
  path = inp.get("tokenizer", "") or None
  pad_id = inp.get("pad_id", -1)   # -1: the EOS mode's default (ml_collections has no None)
  # The data pipeline's text options too, so evaluators tokenize prompts as training did.
  return tokenizer.Tokenizer(path, lowercase=inp.get("lowercase", True),
                             strip_punctuation=inp.get("strip_punctuation", False),
                             eos=inp.get("eos", "sticky"),
                             pad_id=None if pad_id is None or pad_id < 0 else pad_id)


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
  """`examples(global_indices) -> dict(image, text)` for the configured training data."""
  data = config.input.get("data", "shapes")
  if data == "shapes":
    from siglip_jax.data import shapes
    ds = shapes.ShapesDataset(seed=config.seed, image_size=config.input.image_size)
    return ds.train_examples
  if data in _PIPELINE_KINDS:
    from siglip_jax.data import pipeline
    return _config_errors(pipeline.examples_fn, config)
  raise ConfigError(f"config key `input.data`: {data!r} has no index-based source")


_PIPELINE_KINDS = ("webdataset", "tfds", "folder")   # read through siglip_jax.data.pipeline


def _config_errors(fn, *args):
  """Bad data settings (no shards match, an unprepared TFDS set) as one-line ConfigErrors."""
  try:
    return fn(*args)
  except (ValueError, OSError) as e:
    raise ConfigError(f"config key `input` (input.data={args[0].input.get('data')!r}): "
                      f"{e}") from None


def make_train_data(config, tokenizer, sharding, data_state=None):
  """The trainer's batch iterator, starting at `data_state` ({"data_position": next step,
  "data_skipped": running skip total}, as checkpoints keep it; {} for a fresh run)."""
  data_state = data_state or {}
  if config.input.get("data", "shapes") in _PIPELINE_KINDS:
    from siglip_jax.data import pipeline
    return _config_errors(pipeline.make_batches, config, sharding, data_state)
  from siglip_jax.data import batches
  return batches.IndexedBatches(
      make_train_source(config), tokenizer, text_len=config.input.text_len,
      global_batch=config.input.batch_size, sharding=sharding,
      start_step=int(data_state.get("data_position", 0)),
      prefetch=config.input.get("prefetch", 2))


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
