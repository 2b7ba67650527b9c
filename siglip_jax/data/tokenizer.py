"""SentencePiece tokenization to fixed-length int32 rows, with big_vision's EOS conventions.

Any SentencePiece `.model` works (the demo's, shipped in `assets/`, or the published SigLIP
ones). The EOS modes follow big_vision's `pp/ops_text.py` `tokenize` op:

- "sticky" (SigLIP's recipe): append EOS and keep it when truncating, i.e. a text too long for
  `length` keeps its first `length - 1` tokens and ends in EOS. Padding is EOS too unless
  `pad_id` is given, so with last-token pooling the pooled token is always EOS.
- "append": append EOS; truncation cuts it off like any other token (for generative models,
  which should only predict EOS where a text really ends). Pads with `pad_id`, else the model's
  pad id (0 when the model has none).
- "none": no EOS; pads as "append".

Text is normalised before SentencePiece sees it: lowercased character by character (the way
HF tokenizers' `Lowercase` does; Python's `str.lower` alone would map a word-final capital
sigma to "ς"), and, with `strip_punctuation`, each ASCII punctuation mark replaced by a space
and runs of whitespace collapsed. An HF export carries exactly this normalisation in its
`tokenizer.json` (interop/hf_tokenizer.py), so the exported tokenizer gives these ids.
"""
import os
import re
import string

import numpy as np
import sentencepiece as spm

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_sp.model")
EOS_MODES = ("sticky", "append", "none")
PUNCTUATION = string.punctuation   # what strip_punctuation replaces (ASCII only)
_PUNCT = re.compile("[" + re.escape(PUNCTUATION) + "]")


def options_from_input(inp):
  """Tokenizer keyword arguments from a config's `input` block (a dict or ConfigDict; missing
  keys take their defaults): the one mapping training, evaluation, load() and export share."""
  get = inp.get
  pad_id = get("pad_id", -1)   # -1: the EOS mode's default (ml_collections has no None)
  return dict(lowercase=get("lowercase", True), strip_punctuation=get("strip_punctuation", False),
              eos=get("eos", "sticky"), pad_id=None if pad_id is None or pad_id < 0 else pad_id)


class Tokenizer:
  """`Tokenizer(path=None)` wraps the demo model; `encode(texts, length)` -> int32 [N, length]."""

  def __init__(self, path=None, *, lowercase=True, strip_punctuation=False, eos="sticky",
               pad_id=None):
    if eos not in EOS_MODES:
      raise ValueError(f"eos must be one of {EOS_MODES}, got {eos!r}")
    self.path = DEMO_MODEL if path is None else os.fspath(path)
    self.lowercase, self.strip_punctuation, self.eos = lowercase, strip_punctuation, eos
    self.pad_id = pad_id
    # Read the bytes ourselves: SentencePiece's own loader reports a bare "Not found" or a
    # protobuf parse failure without saying which file it was given.
    try:
      with open(self.path, "rb") as f:
        proto = f.read()
    except OSError as e:
      err = FileNotFoundError if isinstance(e, FileNotFoundError) else OSError
      raise err(f"cannot read SentencePiece model {self.path!r}: {e.strerror or e}") from None
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
      ok = bool(proto) and self._sp.get_piece_size() > 0
    except Exception:  # pylint: disable=broad-except
      ok = False
    if not ok:
      raise ValueError(f"{self.path!r} is not a valid SentencePiece model") from None
    self.eos_id = int(self._sp.eos_id())
    if eos != "none" and self.eos_id < 0:
      raise ValueError(f"SentencePiece model {self.path!r} has no EOS piece; use eos='none'")
    if pad_id is not None:
      self.pad_value = int(pad_id)
    elif eos == "sticky":
      self.pad_value = self.eos_id
    else:
      self.pad_value = max(int(self._sp.pad_id()), 0)
    if not 0 <= self.pad_value < self.vocab_size:
      raise ValueError(f"pad id {self.pad_value} outside the vocabulary [0, {self.vocab_size})")

  @property
  def vocab_size(self):
    return int(self._sp.get_piece_size())

  def id_to_piece(self, i):
    return self._sp.id_to_piece(int(i))

  def serialized_model(self):
    """The SentencePiece model's bytes (what its `.model` file holds)."""
    return self._sp.serialized_model_proto()

  @property
  def options(self):
    """The keyword arguments that rebuild this tokenizer from its model file."""
    return dict(lowercase=self.lowercase, strip_punctuation=self.strip_punctuation,
                eos=self.eos, pad_id=self.pad_id)

  def normalize(self, text):
    """`text` as SentencePiece receives it (see the module docstring)."""
    if self.lowercase:
      text = "".join(map(str.lower, text))
    if self.strip_punctuation:
      text = " ".join(_PUNCT.sub(" ", text).split())
    return text

  def ids(self, text):
    """The normalised text's SentencePiece ids: no EOS, no padding (decoder sequences are put
    together from such pieces)."""
    return list(self._sp.encode(self.normalize(str(text))))

  def encode(self, texts, length):
    """Tokenizes `texts` (a list of str, or one str) into int32 [len(texts), length]."""
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}")
    out = np.full((len(texts), length), self.pad_value, np.int32)
    if not texts:
      return out
    for row, ids in enumerate(self._sp.encode([self.normalize(t) for t in texts])):
      if self.eos != "none":
        ids = ids + [self.eos_id]
      if len(ids) > length:
        ids = ids[:length - 1] + [self.eos_id] if self.eos == "sticky" else ids[:length]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids):
    """Token ids -> text: a 1-D row gives a str, a 2-D batch a list of str.

    Reading stops at the first EOS; trailing padding is dropped.
    """
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    ids = [int(i) for i in ids.reshape(-1)]
    if self.eos_id >= 0 and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    while ids and ids[-1] == self.pad_value:
      ids.pop()
    return self._sp.decode(ids)

  def __repr__(self):
    return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.eos!r}, "
            f"pad_value={self.pad_value})")
