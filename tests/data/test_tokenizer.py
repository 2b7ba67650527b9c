"""The SentencePiece wrapper and the shipped demo model."""
import os

import numpy as np
import pytest

from siglip_jax.data import make_tokenizer, shapes
from siglip_jax.data.shapes import ShapesDataset
from siglip_jax.data.tokenizer import DEMO_MODEL, Tokenizer

TEXT_LEN = 16  # the demo config's text length


@pytest.fixture(scope="module")
def tok():
  return Tokenizer()


def test_demo_model(tok):
  assert os.path.getsize(DEMO_MODEL) < 64 * 1024
  assert 128 <= tok.vocab_size <= 512
  assert tok.eos_id == 1 and tok.pad_value == tok.eos_id


def test_demo_model_is_reproducible():
  with open(DEMO_MODEL, "rb") as f:
    assert make_tokenizer.train() == f.read(), "rerun python -m siglip_jax.data.make_tokenizer"


def test_all_demo_texts_fit(tok):
  texts = shapes.caption_corpus(include_unseen=True)
  ids = tok.encode(texts, 64)
  lengths = (ids != tok.eos_id).sum(1) + 1  # tokens plus the EOS
  assert lengths.max() <= TEXT_LEN, texts[int(lengths.argmax())]
  assert not (ids == tok._sp.unk_id()).any()
  ex = ShapesDataset(seed=0).train_examples(np.arange(200))
  assert tok.decode(tok.encode(ex["text"], TEXT_LEN)) == ex["text"]


def test_roundtrip_and_sticky_padding(tok):
  ids = tok.encode(["a photo of a red star."], TEXT_LEN)
  assert ids.shape == (1, TEXT_LEN) and ids.dtype == np.int32
  assert tok.decode(ids[0]) == "a photo of a red star."
  n = int((ids[0] != tok.eos_id).sum())
  assert (ids[0, n:] == tok.eos_id).all() and (ids[0, :n] != tok.eos_id).all()
  assert tok.encode("a red star", 8).shape == (1, 8)  # one str is one row
  assert tok.encode([], 8).shape == (0, 8)


def test_lowercase(tok):
  np.testing.assert_array_equal(tok.encode(["A Photo of a RED Star"], 16),
                                tok.encode(["a photo of a red star"], 16))
  cased = Tokenizer(lowercase=False)
  assert not np.array_equal(cased.encode(["A RED Star"], 16), tok.encode(["A RED Star"], 16))


def test_lowercase_is_per_character(tok):
  # As HF tokenizers' Lowercase, so an HF export lowercases the same; Python's str.lower() maps a
  # word-final capital sigma to "ς" instead.
  assert tok.normalize("ΟΔΟΣ ΚΑΙ") == "οδοσ και"
  assert tok.normalize("A Photo, of a RED Star") == "a photo, of a red star"


def test_options_rebuild_the_tokenizer():
  t = Tokenizer(strip_punctuation=True, eos="append", pad_id=3)
  again = Tokenizer(t.path, **t.options)
  assert again.options == t.options == dict(lowercase=True, strip_punctuation=True,
                                            eos="append", pad_id=3)
  texts = ["A photo, of a RED star!", "there is a large purple heart on a noisy background"]
  np.testing.assert_array_equal(again.encode(texts, 8), t.encode(texts, 8))


def test_truncation(tok):
  text = "there is a large purple heart on a noisy background in the picture"
  full = tok.encode([text], 64)[0]
  n = int((full != tok.eos_id).sum())
  short = tok.encode([text], 5)[0]
  # sticky: the first length-1 tokens, then EOS, so last-token pooling still reads EOS.
  np.testing.assert_array_equal(short, np.r_[full[:4], tok.eos_id])
  exact = tok.encode([text], n + 1)[0]
  np.testing.assert_array_equal(exact, full[:n + 1])
  appended = Tokenizer(eos="append").encode([text], 5)[0]  # big_vision's eos="yes"
  np.testing.assert_array_equal(appended, full[:5])
  none = Tokenizer(eos="none", pad_id=0).encode(["a red star"], 8)[0]
  assert tok.eos_id not in none and none[-1] == 0


def test_pad_id():
  t = Tokenizer(eos="sticky", pad_id=0)  # big_vision's case 3: EOS kept, zeros after
  ids = t.encode(["a red star"], 8)[0]
  n = int((ids != 0).sum())
  assert ids[n - 1] == t.eos_id and (ids[n:] == 0).all()
  assert t.decode(ids) == "a red star"
  assert Tokenizer(eos="append").pad_value == 0  # the model's <pad>


def test_strip_punctuation():
  t = Tokenizer(strip_punctuation=True)
  assert t.decode(t.encode(["A photo, of a red star!!"], 16)[0]) == "a photo of a red star"


def test_other_text_encodes(tok):
  # Words outside the grammar fall back to letters, not <unk>.
  ids = tok.encode(["a zebra jumps quickly"], 64)
  assert tok.decode(ids[0]) == "a zebra jumps quickly"


def test_errors(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer(str(missing))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a sentencepiece model")
  with pytest.raises(ValueError, match="bad.model"):
    Tokenizer(bad)
  with pytest.raises(ValueError, match="eos"):
    Tokenizer(eos="yes")
  with pytest.raises(ValueError, match="length"):
    Tokenizer().encode(["a"], 0)
