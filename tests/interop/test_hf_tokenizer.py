"""The HF export's tokenizer gives siglip_jax's ids for any text: transformers' AutoTokenizer,
loading the exported files as a user would, against `Tokenizer.encode` (SentencePiece itself)
on a fuzzed corpus, for the demo's model and for SentencePiece models of other kinds."""
import io
import random
import string
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from siglip_jax.data import shapes
from siglip_jax.data.tokenizer import DEMO_MODEL, Tokenizer
from siglip_jax.interop import hf_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LENGTH = 12   # short, so that many fuzzed texts are truncated (sticky EOS must survive)
# Letters, digits, every ASCII punctuation mark and whitespace; accented, capital and final-form
# letters, NFKC-folded ones (ligature, circled digit, fraction), CJK, a literal "▁".
_ALPHABET = (string.printable + "▁éÉßİΣσςÅ\u00a0\u2003\x1c\x85\u3000日本語ﬁ①½𝔘" + "   ")


def _fuzz(seed=0, n=1500):
  rng = random.Random(seed)
  words = shapes.caption_corpus(include_unseen=True)
  texts = ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(n)]
  texts += [rng.choice(words) + rng.choice(["", ".", " .", "!", "  ", "\t", "é", "ﬁ", "<img>"])
            + rng.choice(words).upper() for _ in range(n // 2)]
  return texts + ["", " ", "▁", "▁a", "</s>", "<unk>", "a</s>b", "<pad> x", "A  B", " a "]


def _sp_model(tmp_path, name, **kw):
  """A small SentencePiece model trained here (byte-identical from run to run)."""
  rng = random.Random(1)
  corpus = shapes.caption_corpus() + ["".join(rng.choice(_ALPHABET) for _ in range(40))
                                      for _ in range(200)]
  spm.set_random_generator_seed(0)
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=out, vocab_size=600, hard_vocab_limit=False,
      character_coverage=0.98, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
      minloglevel=2, **kw)
  path = tmp_path / f"{name}.model"
  path.write_bytes(out.getvalue())
  return str(path)


MODELS = {
    # NFKC character map, extra-whitespace removal, dummy prefix (big_vision's c4_en kind).
    "unigram_nfkc": dict(model_type="unigram"),
    # Gemma's kind: BPE, byte fallback, no normalization, no dummy prefix, digits split.
    "bpe_bytes": dict(model_type="bpe", normalization_rule_name="identity",
                      add_dummy_prefix=False, remove_extra_whitespaces=False, byte_fallback=True,
                      split_digits=True),
    "bpe_user_defined": dict(model_type="bpe", user_defined_symbols=["<img>", "▁red"]),
}


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sp")
  return {"demo": DEMO_MODEL, **{k: _sp_model(tmp, k, **kw) for k, kw in MODELS.items()}}


def _hf_ids(tokenizer, texts, tmp_path):
  hf_tokenizer.write(tmp_path, tokenizer, LENGTH)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  enc = theirs(texts, padding="max_length", max_length=LENGTH, truncation=True)
  assert list(enc) == ["input_ids"]   # model_input_names: no attention mask
  return np.array(enc["input_ids"])


@pytest.mark.parametrize("model", ["demo", *MODELS])
@pytest.mark.parametrize("options", [
    {}, {"strip_punctuation": True}, {"lowercase": False, "eos": "none", "pad_id": 0}],
    ids=["default", "strip_punctuation", "cased_no_eos"])
def test_exported_tokenizer_gives_our_ids(sp_models, model, options, tmp_path):
  ours = Tokenizer(sp_models[model], **options)
  texts = _fuzz()
  want = ours.encode(texts, LENGTH)
  got = _hf_ids(ours, texts, tmp_path)
  bad = [(t, list(w), list(g)) for t, w, g in zip(texts, want, got) if not np.array_equal(w, g)]
  assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[:3]}"


def test_normalization_matches_hf_on_every_character():
  """Every code point this Python's Unicode tables assign, lowercased and (strip_punctuation)
  respaced, as HF tokenizers' normalizer does it; a word-final capital sigma too (Python's
  `str.lower` alone maps it to "ς", HF's `Lowercase` to "σ")."""
  chars = "".join(chr(c) for c in range(0x110000)
                  if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn")
  for options in ({}, {"strip_punctuation": True}):
    ours = Tokenizer(**options)
    theirs = hf_tokenizer.text_normalizer(ours)
    for text in (chars, "ΟΔΟΣ ΟΔΟΣ.", "the SHAPE IS RED!"):
      assert theirs.normalize_str(text) == ours.normalize(text)
  assert Tokenizer().normalize("ΟΔΟΣ") == "οδοσ"


def test_config_records_length_options_and_no_attention_mask(tmp_path):
  ours = Tokenizer(strip_punctuation=True)
  hf_tokenizer.write(tmp_path, ours, 64)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert theirs.model_max_length == 64 and theirs.model_input_names == ["input_ids"]
  assert (theirs.pad_token_id, theirs.eos_token_id) == (ours.pad_value, ours.eos_id)
  assert hf_tokenizer.read_options(tmp_path) == ours.options
  assert (tmp_path / hf_tokenizer.SPIECE).read_bytes() == open(DEMO_MODEL, "rb").read()
