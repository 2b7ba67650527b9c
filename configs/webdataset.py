r"""SigLIP B/16 at 224 px trained on your own WebDataset tar shards (img2dataset's layout).

    python -m siglip_jax.data.check --shards='/data/cc12m/{00000..01242}.tar'   # optional, first
    python -m siglip_jax.train --config=configs/webdataset.py --workdir=DIR \
        --config.input.shards='/data/cc12m/{00000..01242}.tar' --config.input.tokenizer=SPM

Members `key.jpg|jpeg|png|webp` + `key.txt` (optional `key.json`). Bad records (truncated or
undecodable images, missing or blank captions) are skipped and counted (`data/skipped` in
metrics.jsonl). Other sources through the same loader: `--config.input.data=folder
--config.input.dir=DIR` (a folder with captions.jsonl, or a set made by
`python -m siglip_jax.data.prepare`), or `input.data=tfds` (see configs/tfds_coco.py), or a
weighted mixture in `input.mixture`. For a published SigLIP tokenizer set `input.tokenizer` to
its .model (`model.text.vocab_size` 0 takes its size). Every other key (the model is B/16 with
text B by default; text options, crops, workers, optimizer, checkpoints) is listed with its
default in siglip_jax/config_defaults.py and can be set with --config.KEY=VALUE.

Feeding an accelerator: see docs/performance.md "Data loader throughput (224 px)" for pairs/s
per CPU core; set `input.workers` to about the number of cores that needs.
"""
from siglip_jax import config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.total_steps = 100_000
  c.input.data = "webdataset"
  c.input.batch_size = 256         # global
  c.optim.schedule.warmup_steps = 10_000
  # A smoke check of the evaluation path only (128 of the demo's shapes at the run's image
  # size, run at the last step): add evaluators for your task (kind "zeroshot" / "retrieval").
  c.evals.shapes = dict(kind="shapes", every_steps=0, batch_size=256, num_heldout=64,
                        num_unseen=64)
  return c
