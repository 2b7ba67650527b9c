r"""SigLIP B/16 at 224 px on a TFDS image-text data set: COCO captions as the example.

    pip install -e '.[data]'
    tfds build coco_captions --file_format=array_record    # once: downloads COCO 2014 (~20 GB)
    python -m siglip_jax.train --config=configs/tfds_coco.py --workdir=DIR

Any TFDS data set prepared as ArrayRecord works (`tfds.data_source` gives random access):
name it in `input.tfds_name` and map its fields with `input.image_key` / `input.text_key`
("/" for nesting; a text field may hold one caption or several, one drawn per example).
Everything else (model, optimizer, checkpoints, text and image options) is as in
configs/webdataset.py, whose settings this file starts from.
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  del arg
  # Config files are loaded by path (not as a package), so load the sibling one the same way.
  spec = importlib.util.spec_from_file_location("_webdataset_config",
                                                os.path.join(_HERE, "webdataset.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.input.data = "tfds"
  c.input.tfds_name = "coco_captions"   # coco_captions/2014: Karpathy splits of COCO 2014
  c.input.split = "train"               # TFDS split syntax works: "train+restval"
  c.input.tfds_data_dir = ""            # empty: TFDS's default (~/tensorflow_datasets)
  c.input.image_key = "image"
  c.input.text_key = "captions/text"    # five captions an image
  c.input.batch_size = 256
  c.total_steps = 20_000                # ~60 epochs of COCO's 82k train images
  c.optim.schedule.warmup_steps = 1_000
  return c
