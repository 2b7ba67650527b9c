"""The tokenizer files of an HF export: a `tokenizer.json` that gives siglip_jax's ids.

transformers' own `SiglipTokenizer` cannot: it always strips punctuation (by deleting it, not by
spacing it out as `strip_punctuation` does) and wraps SentencePiece in its own prefix handling.
So the export ships a fast tokenizer (HF `tokenizers`) built here from the SentencePiece model
and the run's text options, loaded through `tokenizer_class: PreTrainedTokenizerFast`, which
transformers 4.x and 5.x both read from `tokenizer.json` as written (docs/exports.md):

- normalizer: siglip_jax's own (`Tokenizer.normalize`: lowercase per character; optionally
  punctuation to spaces and whitespace runs collapsed), then SentencePiece's (its precompiled
  character map, extra-whitespace removal, spaces as "▁", the dummy prefix);
- model: the same pieces and scores (unigram) or merges ranked by piece score (BPE), byte
  fallback and user-defined pieces as SentencePiece treats them;
- post-processor: EOS appended (eos sticky/append), so HF's truncation keeps it as sticky does;
- `model_input_names: ["input_ids"]`, as the published SigLIP configs list it: no attention
  mask, because the model was trained attending to the padding.

tests/interop/test_hf_tokenizer.py checks the ids against `Tokenizer.encode` on a fuzzed corpus
for several kinds of SentencePiece model.
"""
import functools
import json
import os
import re

from siglip_jax.data.tokenizer import PUNCTUATION

TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPIECE = "spiece.model"
OPTIONS_KEY = "siglip_jax"   # in tokenizer_config.json: the options `Tokenizer` was built with
# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def _char_class(chars):
  return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


@functools.lru_cache(maxsize=None)
def _python_whitespace():
  # What str.split() splits on, which is what strip_punctuation collapses.
  return "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


def _model_proto(tokenizer):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.serialized_model())
  return proto


def _model(proto):
  from tokenizers import models
  ts = proto.trainer_spec
  user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
  if ts.model_type == 2:   # BPE: SentencePiece merges the pair whose result scores highest
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    return models.BPE(vocab={p.piece: i for i, p in enumerate(proto.pieces)},
                      merges=[(a, b) for _, _, a, b in ranked], unk_token=ts.unk_piece,
                      fuse_unk=True, byte_fallback=ts.byte_fallback,
                      # user-defined pieces come whole, never from merges
                      ignore_merges=bool(user_defined))
  if ts.model_type == 1:
    return models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=ts.unk_id,
                          byte_fallback=ts.byte_fallback)
  raise ValueError(f"the SentencePiece model is of type {ts.model_type} (char or word); only "
                   "unigram and BPE models are exported to HF")


def _control_piece_guard(proto):
  """A pattern that cuts every "</s>", "<pad>", "<unk>" ... in a text in two, or None.

  SentencePiece never produces control or unknown pieces from text; a unigram model here would
  match "</s>" in a text as the piece. Cutting the text inside each such string, between two
  characters that no piece holds together, stops that and changes nothing else."""
  pieces = [p.piece for p in proto.pieces if p.type in (_NORMAL, _USER_DEFINED)]
  cuts = []
  for p in proto.pieces:
    if p.type not in (_UNKNOWN, _CONTROL) or len(p.piece) < 2:
      continue
    k = next((k for k in range(1, len(p.piece))
              if not any(p.piece[k - 1:k + 1] in q for q in pieces)), None)
    if k is not None:   # else some piece spans every cut: left as it is (never seen in practice)
      cuts.append(f"(?<={re.escape(p.piece[:k])}){re.escape(p.piece[k:])}")
  return "|".join(cuts) or None


def text_normalizer(tokenizer):
  """HF tokenizers' form of `tokenizer.normalize` (siglip_jax's own step, before SentencePiece's)."""
  from tokenizers import Regex, normalizers
  steps = []
  if tokenizer.lowercase:
    steps.append(normalizers.Lowercase())
  if tokenizer.strip_punctuation:
    steps += [normalizers.Replace(Regex(_char_class(PUNCTUATION)), " "),
              normalizers.Replace(Regex(_char_class(_python_whitespace()) + "+"), " "),
              normalizers.Replace(Regex(r"\A | \z"), "")]
  return normalizers.Sequence(steps)


def _sentencepiece_normalizer(spec):
  """SentencePiece's own normalizer (`spec`: the model's normalizer_spec), in its order."""
  from tokenizers import Regex, normalizers
  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", "▁"))
  if spec.remove_extra_whitespaces:
    # SentencePiece strips trailing "▁" after escaping, a "▁" of the text's own included.
    steps.append(normalizers.Replace(Regex("▁+\\z" if spec.escape_whitespaces else " +\\z"), ""))
  if spec.add_dummy_prefix:
    # The Metaspace pre-tokenizer adds no prefix to a text that starts with "▁"; SentencePiece
    # does.
    steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
  return normalizers.Sequence(steps)


def build(tokenizer):
  """The `tokenizers.Tokenizer` that encodes as `tokenizer` (a siglip_jax Tokenizer) does,
  EOS included; padding and truncation are left to the caller (HF sets them per call)."""
  try:
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers,
                            processors)
  except ImportError:
    raise ValueError("the HF export's tokenizer.json is built with HF `tokenizers`, which is "
                     "not installed: pip install tokenizers") from None
  proto = _model_proto(tokenizer)
  spec = proto.normalizer_spec
  out = Tokenizer(_model(proto))
  out.normalizer = normalizers.Sequence([text_normalizer(tokenizer),
                                         _sentencepiece_normalizer(spec)])
  pre = []
  if spec.add_dummy_prefix:
    pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
  user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
  if user_defined:   # SentencePiece emits them whole wherever they occur
    pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
    pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
  guard = _control_piece_guard(proto)
  if guard:
    pre.append(pre_tokenizers.Split(Regex(guard), behavior="merged_with_next"))
  if pre:
    out.pre_tokenizer = pre_tokenizers.Sequence(pre)
  if tokenizer.eos == "none":
    out.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
  else:
    eos = tokenizer.id_to_piece(tokenizer.eos_id)
    out.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
        special_tokens=[(eos, tokenizer.eos_id)])
  # Control and unknown pieces are HF special tokens (skipped when decoding); the export's
  # `split_special_tokens` keeps a literal "</s>" in a text from matching one, as in SentencePiece.
  out.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)])
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if spec.add_dummy_prefix:
    steps.append(decoders.Strip(" ", 1, 0))
  out.decoder = decoders.Sequence(steps)
  return out


def _special_tokens(tokenizer):
  piece = tokenizer.id_to_piece
  proto = _model_proto(tokenizer)
  out = {"unk_token": proto.trainer_spec.unk_piece, "pad_token": piece(tokenizer.pad_value)}
  if tokenizer.eos_id >= 0:
    out["eos_token"] = piece(tokenizer.eos_id)
  return out


def tokenizer_config(tokenizer, text_len, processor_class="SiglipProcessor", extra=None):
  """tokenizer_config.json: the fast tokenizer class, the length, no attention mask; `extra`:
  more init kwargs (a processor applies them to every modality that takes them)."""
  return {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "processor_class": processor_class,
      "model_max_length": int(text_len),
      "model_input_names": ["input_ids"],
      # transformers 5's processors take these as their defaults: processor(text=...) then
      # pads and truncates to model_max_length as training did, without being asked to.
      "padding": "max_length", "truncation": True,
      "padding_side": "right", "truncation_side": "right",
      "split_special_tokens": True,
      "clean_up_tokenization_spaces": False,
      **_special_tokens(tokenizer),
      **(extra or {}),
      OPTIONS_KEY: tokenizer.options,
  }


def write(out, tokenizer, text_len, processor_class="SiglipProcessor", extra=None):
  """Writes the tokenizer files into the folder `out`, the SentencePiece model included (for
  siglip_jax.load and for anyone who wants big_vision's own tokenizer)."""
  build(tokenizer).save(os.path.join(out, TOKENIZER_JSON))
  with open(os.path.join(out, SPIECE), "wb") as f:
    f.write(tokenizer.serialized_model())
  for name, content in ((TOKENIZER_CONFIG, tokenizer_config(tokenizer, text_len,
                                                             processor_class, extra)),
                        (SPECIAL_TOKENS, _special_tokens(tokenizer))):
    with open(os.path.join(out, name), "w") as f:
      json.dump(content, f, indent=2)


def read_options(folder):
  """The siglip_jax text options an export recorded ({} for other HF folders)."""
  path = os.path.join(folder, TOKENIZER_CONFIG)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return dict(json.load(f).get(OPTIONS_KEY) or {})
