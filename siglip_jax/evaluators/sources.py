"""Evaluation data: labelled images (a folder or a TFDS data set) and captioned images (a folder
with captions.jsonl, or a TFDS data set), read in batches of model-ready float32 images.

Layouts:
  classification folder  root/<class_name>/*.jpg|jpeg|png|webp; classes in sorted folder order,
                         named by the folder ("golden_retriever" -> "golden retriever") unless
                         `class_names` is given (a list, or a .txt file with one name a line)
  captions folder        root/captions.jsonl, one {"image": "x.jpg", "captions": [...]} a line
                         (or "caption": "..."); image paths relative to root
  TFDS                   `tfds.data_source(name, split=...)` (random access, no TensorFlow
                         graph); tensorflow_datasets is imported only when a TFDS source is used

Images are resized to the model's square input (bilinear, no crop: big_vision's SigLIP eval) and
scaled to [-1, 1]. Every process reads every batch; the inference handle keeps each process's
slice, so the result is the same whatever the process count.
"""
import json
import os

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def to_model_input(image, size):
  """A PIL image, a uint8 [H, W, C] / [H, W] array or a path -> float32 [size, size, 3] in [-1, 1]."""
  from PIL import Image
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as im:
      return to_model_input(im.convert("RGB"), size)
  if not isinstance(image, Image.Image):
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    image = Image.fromarray(arr.astype(np.uint8))
  image = image.convert("RGB")
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def _read_names(class_names):
  if isinstance(class_names, str):
    with open(class_names, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  return [str(n) for n in class_names]


def _batched(n, batch_size, max_examples=0):
  n = min(n, max_examples) if max_examples else n
  for start in range(0, n, batch_size):
    yield range(start, min(start + batch_size, n))


class FolderClassification:
  """Labelled images under root/<class>/; see the module docstring."""

  def __init__(self, root, class_names=None, max_examples=0):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"no image folder at {root}")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files, labels = [], []
    for label, folder in enumerate(folders):
      names = sorted(f for f in os.listdir(os.path.join(root, folder))
                     if f.lower().endswith(IMAGE_EXTS))
      self.files += [os.path.join(root, folder, f) for f in names]
      labels += [label] * len(names)
    if not self.files:
      raise ValueError(f"{root}: no images in <class>/ subfolders ({', '.join(IMAGE_EXTS)})")
    self.labels = np.asarray(labels, np.int32)
    self.class_names = (_read_names(class_names) if class_names
                        else [f.replace("_", " ") for f in folders])
    if len(self.class_names) != len(folders):
      raise ValueError(f"{root}: {len(folders)} class folders but {len(self.class_names)} "
                       "class names")
    self.max_examples = int(max_examples or 0)

  def batches(self, batch_size, image_size):
    for idx in _batched(len(self.files), batch_size, self.max_examples):
      images = np.stack([to_model_input(self.files[i], image_size) for i in idx])
      yield images, self.labels[list(idx)]


def _get(example, key):
  """`key` may be a path into nested features: "captions/text"."""
  for part in key.split("/"):
    example = example[part]
  return example


class TfdsClassification:
  """Any TFDS classification data set with an image feature and a ClassLabel feature."""

  def __init__(self, name, split="test", data_dir=None, image_key="image", label_key="label",
               class_names=None, max_examples=0):
    import tensorflow_datasets as tfds  # optional ([data] extra): only this source needs it
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.image_key, self.label_key = image_key, label_key
    if class_names:
      self.class_names = _read_names(class_names)
    else:
      info = getattr(self.source, "dataset_info", None) or tfds.builder(
          name, data_dir=data_dir or None).info
      self.class_names = [n.replace("_", " ") for n in info.features[label_key].names]
    self.max_examples = int(max_examples or 0)

  def batches(self, batch_size, image_size):
    for idx in _batched(len(self.source), batch_size, self.max_examples):
      examples = self.source.__getitems__(list(idx)) if hasattr(
          self.source, "__getitems__") else [self.source[i] for i in idx]
      images = np.stack([to_model_input(_get(e, self.image_key), image_size) for e in examples])
      labels = np.asarray([int(_get(e, self.label_key)) for e in examples], np.int32)
      yield images, labels


class FolderCaptions:
  """Images with several captions each, from root/captions.jsonl; see the module docstring."""

  def __init__(self, root, captions_file="captions.jsonl", max_examples=0):
    path = os.path.join(root, captions_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no {captions_file} in {root}")
    self.files, self.captions = [], []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        caps = row.get("captions", row.get("caption"))
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        if "image" not in row or not caps:
          raise ValueError(f"{path}:{n}: needs \"image\" and a non-empty \"captions\"")
        self.files.append(os.path.join(root, row["image"]))
        self.captions.append([str(c) for c in caps])
    if max_examples:
      self.files, self.captions = self.files[:max_examples], self.captions[:max_examples]

  def batches(self, batch_size, image_size):
    """Yields (images [b, H, W, 3], [captions of each image])."""
    for idx in _batched(len(self.files), batch_size):
      yield (np.stack([to_model_input(self.files[i], image_size) for i in idx]),
             [self.captions[i] for i in idx])


class TfdsCaptions:
  """A TFDS image-text data set, e.g. coco_captions (image_key="image",
  caption_key="captions/text")."""

  def __init__(self, name, split="test", data_dir=None, image_key="image",
               caption_key="captions/text", max_examples=0):
    import tensorflow_datasets as tfds  # optional, as above
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.image_key, self.caption_key = image_key, caption_key
    self.max_examples = int(max_examples or 0)

  def batches(self, batch_size, image_size):
    for idx in _batched(len(self.source), batch_size, self.max_examples):
      examples = [self.source[i] for i in idx]
      captions = []
      for e in examples:
        caps = _get(e, self.caption_key)
        caps = [caps] if isinstance(caps, (str, bytes)) else list(caps)
        captions.append([c.decode() if isinstance(c, bytes) else str(c) for c in caps])
      yield (np.stack([to_model_input(_get(e, self.image_key), image_size) for e in examples]),
             captions)


def classification_source(cfg):
  """From an evaluator's config: source="folder" (path) or "tfds" (tfds_name, split, ...)."""
  kind = cfg.get("source", "folder")
  common = dict(class_names=cfg.get("class_names") or None,
                max_examples=cfg.get("max_examples", 0))
  if kind == "folder":
    return FolderClassification(cfg["path"], **common)
  if kind == "tfds":
    return TfdsClassification(cfg["tfds_name"], split=cfg.get("split", "test"),
                              data_dir=cfg.get("data_dir") or None,
                              image_key=cfg.get("image_key", "image"),
                              label_key=cfg.get("label_key", "label"), **common)
  raise ValueError(f"unknown zero-shot source {kind!r}; use \"folder\" or \"tfds\"")


def caption_source(cfg):
  kind = cfg.get("source", "folder")
  if kind == "folder":
    return FolderCaptions(cfg["path"], cfg.get("captions_file", "captions.jsonl"),
                          max_examples=cfg.get("max_examples", 0))
  if kind == "tfds":
    return TfdsCaptions(cfg["tfds_name"], split=cfg.get("split", "test"),
                        data_dir=cfg.get("data_dir") or None,
                        image_key=cfg.get("image_key", "image"),
                        caption_key=cfg.get("caption_key", "captions/text"),
                        max_examples=cfg.get("max_examples", 0))
  raise ValueError(f"unknown retrieval source {kind!r}; use \"folder\" or \"tfds\"")
