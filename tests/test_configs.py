"""Every shipped config keeps the config contract and passes the pre-compile checks."""
import glob
import importlib.util
import os

import pytest

from conftest import REPO
from siglip_jax import experiment

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_has_the_contract_keys(path):
  config = _load(path)
  for key in experiment.REQUIRED_KEYS:
    node = config
    for part in key.split("."):
      assert part in node, f"{os.path.basename(path)} lacks `{key}`"
      node = node[part]
  assert config.loss.kind in ("sigmoid_ring", "sigmoid_gather", "sigmoid", "softmax")


def test_demo_passes_the_checks_and_exports_to_hf():
  config = _load(os.path.join(REPO, "configs", "demo.py"))
  experiment.check_config(config)
  assert config.loss.kind == "sigmoid_ring"
  # HF's SigLIP shape: MAP image pooling, no image head, last-token text pooling.
  assert config.model.image["pool_type"] == "map"
  assert config.model.out_dim[0] is None
  assert config.model.text["pool_type"] == "last"


def test_lit_config_freezes_the_image_tower_and_loads_it():
  config = _load(os.path.join(REPO, "configs", "lit_demo.py"), "/runs/image_run")
  experiment.check_config(config)
  assert config.model_init == "/runs/image_run"
  assert config.optim.frozen == ("img/.*",)
  assert "txt/.*" in config.model_load.dont_load
