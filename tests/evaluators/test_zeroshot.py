"""Zero-shot metrics against a loop-by-loop numpy computation, and a folder-of-images run."""
import re

import numpy as np
import pytest
from PIL import Image

from siglip_jax.evaluators import prompts, sources, zeroshot


def _brute_topk(image_emb, class_emb, labels, k):
  """Loops only: an image is right at k when fewer than k classes score strictly higher."""
  right = 0
  for i in range(len(image_emb)):
    score = [sum(float(a) * float(b) for a, b in zip(image_emb[i], c)) for c in class_emb]
    better = sum(1 for c in range(len(class_emb)) if score[c] > score[labels[i]])
    right += better < k
  return right / len(image_emb)


def _tied_data(seed, n=40, c=9, d=6):
  # Dyadic values make every dot product exact in float32, so ties are ties for both codes.
  rng = np.random.default_rng(seed)
  class_emb = rng.integers(-2, 3, (c, d)).astype(np.float32) / 4
  class_emb[3] = class_emb[1]                 # two classes with the same embedding: ties
  image_emb = rng.integers(-2, 3, (n, d)).astype(np.float32) / 4
  image_emb[:5] = class_emb[1]                # images exactly on the tied classes
  image_emb[5] = 0                            # an all-zero image: every class ties
  labels = rng.integers(0, c, n)
  labels[:5] = [1, 3, 1, 3, 2]
  return image_emb, class_emb, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_matches_brute_force_with_ties(seed):
  image_emb, class_emb, labels = _tied_data(seed)
  got = zeroshot.topk_accuracy(image_emb, class_emb, labels, ks=(1, 2, 5))
  for k in (1, 2, 5):
    assert got[k] == pytest.approx(_brute_topk(image_emb, class_emb, labels, k))
  # Ties in the model's favour: the all-zero image is right at top-1 whatever its label.
  assert zeroshot.true_class_rank(image_emb[5:6], class_emb, labels[5:6])[0] == 0


def test_class_embeddings_match_loops_and_chunking():
  rng = np.random.default_rng(0)
  table = {}

  def encode(texts):
    for t in texts:
      table.setdefault(t, rng.normal(size=8).astype(np.float32))
    return np.stack([table[t] for t in texts])

  per_class = [[f"c{c} p{p}" for p in range(n)] for c, n in enumerate([3, 1, 4, 2, 5])]
  whole = zeroshot.class_embeddings(encode, per_class)
  chunked = zeroshot.class_embeddings(encode, per_class, chunk=4)
  for c, ps in enumerate(per_class):
    mean = sum(table[p] / np.linalg.norm(table[p]) for p in ps) / len(ps)
    np.testing.assert_allclose(whole[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)


def test_prompt_sets():
  assert len(prompts.CLIP_80) == 80 and len(set(prompts.CLIP_80)) == 80
  assert prompts.CLIP_80[0] == "a bad photo of a {}."
  assert len(prompts.SHORT) == 7 and set(prompts.SHORT) <= set(prompts.CLIP_80)
  assert prompts.class_prompts(["cat"], "name") == [["cat"]]
  assert prompts.class_prompts(["cat"], ["{} here"]) == [["cat here"]]
  with pytest.raises(ValueError):
    prompts.templates("nope")
  with pytest.raises(ValueError):
    prompts.templates(["no slot"])


class _ListSource:
  def __init__(self, images, labels, names):
    self.images, self.labels, self.class_names = images, labels, names

  def batches(self, batch_size, image_size):
    for s in range(0, len(self.images), batch_size):
      yield self.images[s:s + batch_size], self.labels[s:s + batch_size]


class _TableModel:
  """Embeddings looked up from tables: images are their own embeddings, prompts name a class."""
  image_size = 1

  def __init__(self, class_emb):
    self.class_emb = class_emb

  def encode_image(self, images):
    return np.asarray(images, np.float32)

  def encode_strings(self, texts):
    return np.stack([self.class_emb[int(re.search(r"class (\d+)", t).group(1))] for t in texts])


def test_streaming_evaluator_matches_brute_force():
  image_emb, _, labels = _tied_data(5, n=37)
  # Unit class vectors +-e_i (with repeats: ties) stay exact through mean-and-renormalize.
  norm = np.zeros((9, 6), np.float32)
  for c in range(9):
    norm[c, c % 6] = 1.0 if c % 2 else -1.0
  norm[3] = norm[1]
  names = [f"class {c}" for c in range(len(norm))]
  ev = zeroshot.ZeroShotEvaluator(_ListSource(image_emb, labels, names), prefix="toy",
                                  prompts="short", batch_size=8)
  got = ev.run(_TableModel(norm))
  assert set(got) == {"toy/zeroshot_top1", "toy/zeroshot_top5"}
  for k in (1, 5):
    assert got[f"toy/zeroshot_top{k}"] == pytest.approx(_brute_topk(image_emb, norm, labels, k))


COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 60, 250)}


class _ColourModel:
  """Images -> their mean colour; prompts -> the colour word they contain."""
  image_size = 16

  def encode_image(self, images):
    assert images.shape[1:] == (16, 16, 3) and images.min() >= -1 and images.max() <= 1
    mean = images.mean((1, 2))
    return np.eye(3, dtype=np.float32)[mean.argmax(1)]

  def encode_strings(self, texts):
    return np.stack([np.eye(3, dtype=np.float32)[
        next(i for i, c in enumerate(COLORS) if c in t)] for t in texts])


def test_folder_of_images_end_to_end(tmp_path):
  for name, rgb in COLORS.items():
    folder = tmp_path / f"{name}_thing"
    folder.mkdir()
    for j in range(3):   # odd sizes and modes: resized and converted on the way in
      Image.new("RGB", (20 + j, 24), rgb).save(folder / f"{j}.png")
    Image.new("RGB", (8, 8), rgb).convert("P").save(folder / "p.png")
  # One mislabelled image: a red one filed under blue.
  Image.new("RGB", (10, 10), COLORS["red"]).save(tmp_path / "blue_thing" / "x.jpg")
  source = sources.FolderClassification(str(tmp_path))
  assert source.class_names == ["blue thing", "green thing", "red thing"]
  ev = zeroshot.from_config("folder", dict(kind="zeroshot", path=str(tmp_path), prompts="clip80",
                                           batch_size=4))
  got = ev.run(_ColourModel())
  assert got == {"folder/zeroshot_top1": pytest.approx(12 / 13)}   # 3 classes: no top-5
  names_file = tmp_path.parent / "names.txt"
  names_file.write_text("azure\nlime\ncrimson\n")
  assert sources.FolderClassification(str(tmp_path), class_names=str(names_file)).class_names == [
      "azure", "lime", "crimson"]


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import sys
  sys.path.insert(0, str(tmp_path))

  class TinyColours(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(names=list(COLORS))}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, rgb in enumerate(COLORS.values()):
        yield i, {"image": np.full((8, 8, 3), rgb, np.uint8), "label": i}

  TinyColours(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ev = zeroshot.from_config("tiny", dict(source="tfds", tfds_name="tiny_colours",
                                         data_dir=str(tmp_path), prompts="name"))
  assert ev.source.class_names == list(COLORS)
  assert ev.run(_ColourModel()) == {"tiny/zeroshot_top1": 1.0}
