"""Every shipped config keeps the config contract, holds only its own choices (defaults live once,
in siglip_jax/config_defaults.py), and passes the pre-compile checks."""
import glob
import os

import ml_collections
import pytest

from conftest import REPO
from siglip_jax import cli, config_defaults, experiment
from siglip_jax.models import text as text_model, vit

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# ../shared/design.md, "Training CLI": keys every config holds.
CONTRACT_KEYS = ("seed", "total_steps", "log_every_steps", "input.batch_size", "loss.kind",
                 "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_every",
                 "model_init", "model_load.dont_load", "mesh")


def _has(config, dotted):
  node = config
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_has_the_contract_keys_and_passes_the_checks(path):
  config = cli.load_config_file(path)
  for key in CONTRACT_KEYS + experiment.REQUIRED_KEYS:
    assert _has(config, key), f"{os.path.basename(path)} lacks `{key}`"
  assert config.loss.kind in ("sigmoid_ring", "sigmoid_gather", "sigmoid", "softmax")
  assert config_defaults.unknown_keys(config) == []
  experiment.check_config(config)


def test_demo_exports_to_hf():
  config = cli.load_config_file(os.path.join(REPO, "configs", "demo.py"))
  assert config.loss.kind == "sigmoid_ring"
  # HF's SigLIP shape: MAP image pooling, no image head, last-token text pooling.
  assert config.model.image["pool_type"] == "map"
  assert config.model.out_dim[0] is None
  assert config.model.text["pool_type"] == "last"


def test_lit_freezes_the_image_tower_and_loads_it():
  config = cli.load_config_file(os.path.join(REPO, "configs", "demo.py") + ":lit=/runs/image")
  experiment.check_config(config)
  assert config.model_init == "/runs/image"
  assert config.optim.frozen == ("img/.*",)
  assert "txt/.*" in config.model_load.dont_load


def test_required_keys_have_no_default():
  base = config_defaults.base()
  with pytest.raises(experiment.ConfigError, match="total_steps"):
    experiment.check_config(base)
  base.total_steps = 10
  with pytest.raises(experiment.ConfigError, match="input.batch_size"):
    experiment.check_config(base)


def test_unknown_keys_are_named_with_the_nearest_known_one():
  config = config_defaults.base()
  config.total_steps, config.input.batch_size = 10, 8
  config.input.batchsize = 8
  with pytest.raises(experiment.ConfigError, match="`input.batchsize`.*`input.batch_size`"):
    experiment.check_config(config)
  del config.input["batchsize"]
  config.evals.shapes = dict(kind="shapes", every_step=5)
  with pytest.raises(experiment.ConfigError, match="`evals.shapes.every_step`.*every_steps"):
    experiment.check_config(config)


def test_a_partial_config_is_completed_with_the_defaults():
  config = ml_collections.ConfigDict({"total_steps": 5, "input": {"batch_size": 8}})
  experiment.check_config(config)
  assert config.input.image_size == config_defaults.base().input.image_size
  assert config.optim.name == "adamw" and config.checkpoint.keep == 2


def test_tower_key_lists_are_the_towers_fields():
  fields = lambda cls: set(cls.__dataclass_fields__) - {"parent", "name"}  # noqa: E731
  assert fields(vit.ViT) <= set(config_defaults.IMAGE_TOWER_KEYS)
  assert fields(text_model.TextTransformer) <= set(config_defaults.TEXT_TOWER_KEYS)


def test_config_files_hold_no_repeated_blocks():
  """Each config sets only what differs from the defaults (the blocks copied across files
  before live once in config_defaults)."""
  for path in CONFIGS:
    with open(path) as f:
      text = f.read()
    for key in ("c.checkpoint.keep =", "c.optim.b1 =", "c.optim.clip_norm =", "c.mesh =",
                "c.loss.kind =", "c.model_load.dont_load = ()"):
      assert key not in text, f"{os.path.basename(path)} repeats the default `{key}`"
