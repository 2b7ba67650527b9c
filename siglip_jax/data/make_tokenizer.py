"""Regenerates the demo's SentencePiece model: `python -m siglip_jax.data.make_tokenizer`.

A BPE model trained on the demo's caption grammar (every caption template x seen colour-shape
pair x size word, plus the zero-shot prompts): BPE keeps merging up to the vocabulary size, so every
demo word ends up one piece and captions stay short (unigram pruned to ~110 pieces and split words).
A line of single characters makes every lowercase ASCII letter, digit and common punctuation mark
a piece too, so other English text (own data with the demo tokenizer) still encodes, letter by
letter, instead of collapsing to <unk>.

Ids follow big_vision's SigLIP tokenizers: pad 0, eos 1, unk 2, no bos. One thread, no input
shuffling and a fixed random seed make the output byte-identical from run to run.
"""
import argparse
import io
import os
import string

import sentencepiece as spm

from siglip_jax.data import shapes

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "assets", "shapes_sp.model")
VOCAB_SIZE = 256
_CHARSET = " ".join(string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[]_")


def corpus():
  return shapes.caption_corpus() + [_CHARSET]


def train(vocab_size=VOCAB_SIZE):
  """Returns the serialized model (bytes)."""
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()),
      model_writer=model,
      model_type="bpe",
      normalization_rule_name="identity",  # NFKC tables would make the file ~240 KB
      vocab_size=vocab_size,
      hard_vocab_limit=False,  # the grammar is small; take fewer pieces rather than fail
      character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=1,
      shuffle_input_sentence=False,
      input_sentence_size=0,
      minloglevel=2,
  )
  return model.getvalue()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  args = parser.parse_args(argv)
  data = train(args.vocab_size)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "wb") as f:
    f.write(data)
  sp = spm.SentencePieceProcessor(model_proto=data)
  print(f"wrote {args.out}: {len(data)} bytes, vocab {sp.get_piece_size()}")


if __name__ == "__main__":
  main()
