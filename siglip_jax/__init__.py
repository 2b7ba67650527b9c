"""siglip_jax: SigLIP and CLIP image-text pretraining in JAX/Flax, from one CPU to a pod."""

__version__ = "0.1.0"


def load(path):
  """Returns an inference handle (`siglip_jax.inference.SigLIP`) for a workdir, checkpoint,
  big_vision `.npz` or HF SigLIP folder; NaFlex models too (a NaFlex run, a big_vision NaFlex
  `.npz`, an HF Siglip2Model folder). Imported lazily so `import siglip_jax` stays cheap."""
  from siglip_jax import inference
  return inference.load(path)
