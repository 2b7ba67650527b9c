"""The LocCa decoder's three passes for one example, as token rows (numpy; runs in the loader).

Each pass is `decoder_len` tokens of teacher forcing: `inputs[t]` is the sequence's token t and
`targets[t]` its token t + 1; `task[t]` names the pass where the target is trained on and is -1
elsewhere (the prefix, padding). Sequences, with `<task>` the pass's task token and `</s>` the
text EOS (`eos="append"`: a caption cut by `decoder_len` loses it like any other token):

  caption    <caption> caption </s>                   trained on: caption </s>
  refexp     <refexp> region-caption </s> y0 x0 y1 x1 </s>   trained on: y0 x0 y1 x1 </s>
  grounded   <grounded> y0 x0 y1 x1 region-caption </s>      trained on: region-caption </s>

Parallel prediction (CapPa): the caption pass's inputs after its task token are all the mask
token, so every caption token is predicted from the image alone, at once. Prefixes are never
masked. Padding is id 0 and never trained on. An example without a region has only the caption
pass (the other two rows are padding).

A box `[x0, y0, x1, y1]` in [0, 1] becomes the location tokens y0 x0 y1 x1 (big_vision's and
LocCa's order), each `text_vocab + bin`, `bin = floor(coordinate * loc_bins)` clipped to the
last bin; `tokens_to_box` reads them back at bin centres (within one bin of the box).
"""
import numpy as np

from siglip_jax.models import decoder as decoder_lib

PAD = 0
NO_LOSS = -1
TASK_IDS = {name: k for k, name in enumerate(decoder_lib.TASKS)}


def box_to_tokens(box, text_vocab, loc_bins):
  """[x0, y0, x1, y1] in [0, 1] -> 4 location token ids in the order y0, x0, y1, x1."""
  x0, y0, x1, y1 = (float(v) for v in box)
  bins = np.clip(np.floor(np.array([y0, x0, y1, x1]) * loc_bins), 0, loc_bins - 1)
  return [text_vocab + int(b) for b in bins]


def tokens_to_box(tokens, text_vocab, loc_bins):
  """4 location token ids (y0 x0 y1 x1) -> [x0, y0, x1, y1] at bin centres; a token outside the
  location range is clipped into it, and swapped corners (a decoder may emit them) are put in
  order, so the box is never inverted."""
  bins = np.clip(np.asarray(tokens, np.int64) - text_vocab, 0, loc_bins - 1)
  y0, x0, y1, x1 = (bins + 0.5) / loc_bins
  return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def min_decoder_len():
  """The shortest `input.decoder_len` that holds a location target: task token, one caption
  token, EOS, four location tokens, EOS, less the one token teacher forcing drops."""
  return 1 + 1 + 1 + 4 + 1 - 1


class DecoderText:
  """`passes(caption, refexp region, grounded region, parallel)` -> (inputs, targets, task),
  int32 [3, L]; a region None leaves its pass empty."""

  def __init__(self, tokenizer, *, decoder_len, text_vocab, loc_bins):
    if decoder_len < min_decoder_len():
      raise ValueError(f"decoder_len {decoder_len} cannot hold a location target (needs >= "
                       f"{min_decoder_len()})")
    self.tok, self.length = tokenizer, int(decoder_len)
    self.text_vocab, self.loc_bins = int(text_vocab), int(loc_bins)
    self.special = decoder_lib.special_ids(self.text_vocab, self.loc_bins)
    self.eos = int(tokenizer.eos_id)

  def _row(self, task, prefix, target):
    """One pass: `prefix` (task token first) and `target` cut to fit `decoder_len` + 1 tokens;
    the target is cut, never the location tokens of a refexp target (its prefix is cut)."""
    room = self.length + 1
    if task == "refexp":
      prefix = prefix[:room - len(target)]
    seq = (prefix + target)[:room]
    inputs = np.full(self.length, PAD, np.int32)
    targets = np.full(self.length, PAD, np.int32)
    tasks = np.full(self.length, NO_LOSS, np.int32)
    n = len(seq) - 1
    inputs[:n], targets[:n] = seq[:-1], seq[1:]
    tasks[len(prefix) - 1:n] = TASK_IDS[task]
    return inputs, targets, tasks

  def passes(self, caption, refexp=None, grounded=None, parallel=False):
    rows = [self._row("caption", [self.special["caption"]], self.tok.ids(caption) + [self.eos])]
    if parallel:
      inputs, targets, tasks = rows[0]
      inputs = inputs.copy()
      inputs[1:] = np.where(targets[1:] != PAD, self.special["mask"], PAD)
      rows[0] = (inputs, targets, tasks)
    empty = (np.full(self.length, PAD, np.int32),) * 2 + (np.full(self.length, NO_LOSS,
                                                                  np.int32),)
    if refexp is not None:
      loc = box_to_tokens(refexp["box"], self.text_vocab, self.loc_bins)
      rows.append(self._row("refexp", [self.special["refexp"]] + self.tok.ids(refexp["caption"])
                            + [self.eos], loc + [self.eos]))
    else:
      rows.append(empty)
    if grounded is not None:
      loc = box_to_tokens(grounded["box"], self.text_vocab, self.loc_bins)
      rows.append(self._row("grounded", [self.special["grounded"]] + loc,
                            self.tok.ids(grounded["caption"]) + [self.eos]))
    else:
      rows.append(empty)
    return tuple(np.stack(parts) for parts in zip(*rows))
