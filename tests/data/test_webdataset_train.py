"""Training from real-data sources through the CLI, bad records included, and an exact resume."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, TINY_DEMO, run_module
from hostile_data import hostile  # noqa: F401  pylint: disable=unused-import
from wds_fixtures import TFDS_NAME, tiny_tfds_dir, wds  # noqa: F401  pylint: disable=unused-import

# The demo's tiny-model overrides on the WebDataset config (12 steps of 16: 192 examples, more
# than the 50-record set, so the run wraps into a new epoch).
TINY = ["--config=configs/webdataset.py"] + [a for a in TINY_DEMO if not a.startswith("--config=")]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def _train_rows(workdir):
  return {m["step"]: m for m in _metrics(workdir) if "train/loss" in m}


def _expected_skips(glob, steps, batch=16, seed=0):
  """What the loader must report: the same deterministic slot -> record mapping, in-process."""
  from siglip_jax.data import pipeline, preprocess, sources
  loader = pipeline.StepLoader(sources.WebDatasetSource(glob),
                               preprocess.Preprocessor(image_size=16, text_len=8), seed=seed,
                               global_batch=batch, rows=range(batch), threads=1)
  return np.cumsum([int(loader(s)["skipped"].sum()) for s in range(steps)])


def test_train_12_steps_with_bad_records_then_resume_exactly(wds, tmp_path):
  args = TINY + [f"--config.input.shards={wds['glob']}", "--config.total_steps=12",
                 "--config.log_every_steps=3", "--config.checkpoint.every_steps=6"]
  straight = str(tmp_path / "straight")
  run_module("siglip_jax.train", args + [f"--workdir={straight}"])
  rows = _train_rows(straight)
  assert sorted(rows) == [3, 6, 9, 12]
  skips = _expected_skips(wds["glob"], 12)
  assert [rows[s]["data/skipped"] for s in (3, 6, 9, 12)] == [skips[s - 1] for s in (3, 6, 9, 12)]
  assert rows[12]["data/skipped"] > 0 and all(np.isfinite(r["train/loss"]) for r in rows.values())

  # A run stopped after step 6's checkpoint (its workdir holds only that checkpoint) and rerun:
  # the loader restarts at the saved position, so losses and skip totals match the straight run.
  resumed = tmp_path / "resumed"
  shutil.copytree(os.path.join(straight, "checkpoints", "6"), resumed / "checkpoints" / "6")
  proc = run_module("siglip_jax.train", args + [f"--workdir={resumed}"])
  assert "resuming at step 6" in proc.stdout
  again = _train_rows(str(resumed))
  for s in (9, 12):
    assert again[s]["data/skipped"] == rows[s]["data/skipped"]
    np.testing.assert_allclose(again[s]["train/loss"], rows[s]["train/loss"], rtol=1e-5)


def test_train_from_a_mixture_of_prepared_tfds_and_hostile_sources(wds, hostile, tmp_path,
                                                                     tmp_path_factory):
  """input.mixture: an ArrayRecord set made by `prepare`, (where TFDS is installed) a TFDS set
  prepared here, else the raw shards; and the hostile shards (by their brace pattern) and
  hostile folder, weighted up so that 3 steps of 16 meet their bad records (a terabyte header,
  a 1.2 GB member and file, /dev/zero, a FIFO, duplicate keys, cut shards). The acceptance
  run: it finishes, and `data/skipped` counts exactly the skips the same slots give here."""
  pytest.importorskip("array_record")
  import ml_collections
  from siglip_jax.data import pipeline, prepare, preprocess, sources
  out = str(tmp_path / "prepared")
  prepare.prepare(sources.WebDatasetSource(wds["glob"]), out, workers=1)
  data_dir = tiny_tfds_dir(tmp_path_factory)
  if data_dir is None:
    second = ("webdataset", {"shards": wds["glob"]}, 1.0)
  else:
    second = ("tfds", {"tfds_name": TFDS_NAME, "tfds_data_dir": data_dir}, 1.0)
  mixture = (("folder", {"dir": out}, 1.0), second,
             ("webdataset", {"shards": hostile["shards"]["pattern"]}, 3.0),
             ("folder", {"dir": hostile["folder"]["dir"]}, 3.0))
  workdir = str(tmp_path / "run")
  proc = run_module("siglip_jax.train", TINY + [
      "--config.input.image_size=32", "--config.total_steps=3", "--config.log_every_steps=3",
      "--config.evals.shapes.num_heldout=8", "--config.evals.shapes.num_unseen=8",
      f"--config.input.mixture={mixture!r}", f"--workdir={workdir}"])
  row = _train_rows(workdir)[3]
  assert np.isfinite(row["train/loss"])
  config = ml_collections.ConfigDict({"seed": 0, "input": {"mixture": mixture}})
  loader = pipeline.StepLoader(sources.from_config(config),
                               preprocess.Preprocessor(image_size=32, text_len=8), seed=0,
                               global_batch=16, rows=range(16), threads=1)
  met = [r for slot in range(3 * 16) for r in loader.example(slot)[2]]
  assert row["data/skipped"] == len(met)
  assert {"duplicate_key", "outside_folder", "not_a_regular_file"} <= set(met), met
  assert "h-00002.tar" in proc.stderr + proc.stdout   # the index's warning, once per shard


def _load_config(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs",
                                                                           f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["webdataset", "tfds_coco"])
def test_configs_keep_the_contract(name):
  from siglip_jax import experiment
  config = _load_config(name)
  experiment.check_config(config)   # every required key, valid values
  assert config.input.data == {"webdataset": "webdataset", "tfds_coco": "tfds"}[name]
  if name == "tfds_coco":
    assert (config.input.tfds_name, config.input.image_key, config.input.text_key) == (
        "coco_captions", "image", "captions/text")


def test_no_shards_is_a_config_error_naming_input(tmp_path):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from siglip_jax import experiment
  from siglip_jax.data import tokenizer
  config = _load_config("webdataset")
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
  for shards, message in (("", "input.shards"), (f"{tmp_path}/no-*.tar", "no WebDataset shards")):
    config.input.shards = shards
    with pytest.raises(experiment.ConfigError, match=message):
      experiment.make_train_data(config, tokenizer.Tokenizer(), sharding)
