r"""SigLIP B/16 at 224 px on a TFDS image-text data set: COCO captions as the example.

    pip install -e '.[data]'
    tfds build coco_captions --file_format=array_record    # once: downloads COCO 2014 (~20 GB)
    python -m siglip_jax.train --config=configs/tfds_coco.py --workdir=DIR

Any TFDS data set prepared as ArrayRecord works (`tfds.data_source` gives random access):
name it in `input.tfds_name` and map its fields with `input.image_key` / `input.text_key`
("/" for nesting; a text field may hold one caption or several, one drawn per example).
Everything else keeps its default (siglip_jax/config_defaults.py), as in configs/webdataset.py.
"""
from siglip_jax import config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.total_steps = 20_000                # ~60 epochs of COCO's 82k train images
  c.input.data = "tfds"
  c.input.tfds_name = "coco_captions"   # coco_captions/2014: Karpathy splits of COCO 2014
  c.input.split = "train"               # TFDS split syntax works: "train+restval"
  c.input.image_key = "image"
  c.input.text_key = "captions/text"    # five captions an image
  c.input.batch_size = 256
  c.optim.schedule.warmup_steps = 1_000
  return c
