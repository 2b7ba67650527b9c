"""Zero-shot prompt sets: the CLIP paper's 80 ImageNet templates, its 7-template subset, the
class name alone. A template holds one `{}` for the class name.

CLIP_80 is the list from CLIP's "Prompt Engineering for ImageNet" notebook, in its order (and
with its "a origami" / "a embroidered" kept as they are: published numbers were made with them).
SHORT is the 7 templates the same notebook picked by greedy search over the 80.
"""

CLIP_80 = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SHORT = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

NAME_ONLY = ("{}",)

PROMPT_SETS = {"clip80": CLIP_80, "short": SHORT, "name": NAME_ONLY}


def templates(spec):
  """A prompt set by name ("clip80", "short", "name") or an explicit sequence of templates."""
  if isinstance(spec, str):
    if spec not in PROMPT_SETS:
      raise ValueError(f"unknown prompt set {spec!r}; use one of {sorted(PROMPT_SETS)} or a list of "
                       "templates with one {}")
    return PROMPT_SETS[spec]
  spec = tuple(spec)
  if not spec or any(t.count("{}") != 1 for t in spec):
    raise ValueError("prompt templates must each hold exactly one {} for the class name")
  return spec


def class_prompts(class_names, spec="clip80"):
  """Per class, its prompts: [[template.format(name) for template in set] for name in names]."""
  tmpl = templates(spec)
  return [[t.format(name) for t in tmpl] for name in class_names]
