"""SigLIP model definitions (flax.linen) in big_vision's parameter layout."""

from siglip_jax.models.text import TextTransformer
from siglip_jax.models.two_towers import TwoTowers, from_config
from siglip_jax.models.vit import ViT, check_image_size, decode_variant

__all__ = ["TwoTowers", "ViT", "TextTransformer", "from_config", "decode_variant",
           "check_image_size"]
