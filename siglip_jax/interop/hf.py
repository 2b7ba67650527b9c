"""HF transformers `SiglipModel` folders: write (config.json + model.safetensors [+ the tokenizer
files of interop/hf_tokenizer.py]), read back. Neither direction imports torch or transformers, so
export works on a training machine without them (safetensors' numpy API; HF `tokenizers`).

One table (`_table`) lists every HF tensor with the big_vision names it comes from and how:
export runs it forward, import backward, so a round trip is exact. HF's SigLIP is a fixed shape:
MAP image pooling, no image head, last-token text pooling with a text head as wide as the image
embedding, a bias; pre-LN, eps 1e-6, tanh GELU ("gelu_pytorch_tanh"), as big_vision. Anything
else is refused with a message naming what does not fit.
"""
import json
import os

import numpy as np

from siglip_jax.interop import big_vision, hf_tokenizer, naflex_spec

CONFIG, WEIGHTS, SPIECE = "config.json", "model.safetensors", hf_tokenizer.SPIECE
PREPROCESSOR = "preprocessor_config.json"
# transformers' Siglip{Text,Vision}Config defaults: published config.json files leave them out.
_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")   # both the tanh form big_vision uses


def check_exportable(spec):
  """ValueError listing everything about `spec` that HF's SiglipModel cannot hold."""
  i, t = spec["image"], spec["text"]
  problems = []
  if i["pool_type"] != "map":
    problems.append(f"image pooling is {i['pool_type']!r}; HF SigLIP pools with a MAP head "
                    "(pool_type='map')")
  if i.get("posemb", "learn") != "learn":
    problems.append(f"image position embedding is {i['posemb']!r}; HF SigLIP has a learned one")
  if i.get("rep_size"):
    problems.append("the image tower has a pre_logits layer (rep_size), which HF SigLIP lacks")
  if spec["out_dim"][0]:
    problems.append(f"the image tower has a head (out_dim {spec['out_dim'][0]}), which HF "
                    "SigLIP lacks (image out_dim must be None)")
  if t["pool_type"] != "last":
    problems.append(f"text pooling is {t['pool_type']!r}; HF SigLIP reads the last token")
  if not spec["out_dim"][1]:
    problems.append("the text tower has no head; HF SigLIP's text model always has one")
  elif not spec["out_dim"][0] and spec["out_dim"][1] != i["width"]:
    problems.append(f"the text head's width {spec['out_dim'][1]} differs from the image "
                    f"embedding's {i['width']}: HF SigLIP compares them directly")
  if spec["bias_init"] is None:
    problems.append("the model has no logit bias b; HF SigLIP always has logit_bias")
  if problems:
    raise ValueError("this model does not fit HF transformers' SigLIP:\n  "
                     + "\n  ".join(problems))


def _blocks(hf, bv, depth):
  rows = []
  for n in range(depth):
    h, b = f"{hf}.encoder.layers.{n}.", f"{bv}/encoderblock_{n}/"
    att = b + "MultiHeadDotProductAttention_0/"
    for p, q in (("q", "query"), ("k", "key"), ("v", "value")):
      rows += [(h + f"self_attn.{p}_proj.weight", [att + q + "/kernel"], "in_kernel"),
               (h + f"self_attn.{p}_proj.bias", [att + q + "/bias"], "flat")]
    rows += [(h + "self_attn.out_proj.weight", [att + "out/kernel"], "out_kernel"),
             (h + "self_attn.out_proj.bias", [att + "out/bias"], "same")]
    rows += _norm(h + "layer_norm1", b + "LayerNorm_0")
    rows += _norm(h + "layer_norm2", b + "LayerNorm_1")
    rows += _mlp(h + "mlp", b + "MlpBlock_0")
  return rows


def _norm(h, b):
  return [(h + ".weight", [b + "/scale"], "same"), (h + ".bias", [b + "/bias"], "same")]


def _mlp(h, b):
  return [(f"{h}.fc{r + 1}.{w}", [f"{b}/Dense_{r}/{k}"], kind) for r in range(2)
          for w, k, kind in (("weight", "kernel", "dense"), ("bias", "bias", "same"))]


def _table(spec):
  """[(hf name, [big_vision names], kind)] for every tensor of the HF model."""
  v, t = "vision_model", "text_model"
  mha = "img/MAPHead_0/MultiHeadDotProductAttention_0/"
  qkv = [mha + q for q in ("query", "key", "value")]
  return [
      ("logit_scale", ["t"], "same"), ("logit_bias", ["b"], "same"),
      # A NaFlex patch embedding is a Linear on flattened patches (Siglip2Model), not a conv.
      (f"{v}.embeddings.patch_embedding.weight", ["img/embedding/kernel"],
       "dense" if naflex_spec.is_naflex(spec) else "conv"),
      (f"{v}.embeddings.patch_embedding.bias", ["img/embedding/bias"], "same"),
      (f"{v}.embeddings.position_embedding.weight", ["img/pos_embedding"], "posemb"),
      *_blocks(v, "img/Transformer", spec["image"]["depth"]),
      *_norm(f"{v}.post_layernorm", "img/Transformer/encoder_norm"),
      (f"{v}.head.probe", ["img/MAPHead_0/probe"], "same"),
      # torch's nn.MultiheadAttention packs q, k and v into one in_proj.
      (f"{v}.head.attention.in_proj_weight", [n + "/kernel" for n in qkv], "in_kernel"),
      (f"{v}.head.attention.in_proj_bias", [n + "/bias" for n in qkv], "flat"),
      (f"{v}.head.attention.out_proj.weight", [mha + "out/kernel"], "out_kernel"),
      (f"{v}.head.attention.out_proj.bias", [mha + "out/bias"], "same"),
      *_norm(f"{v}.head.layernorm", "img/MAPHead_0/LayerNorm_0"),
      *_mlp(f"{v}.head.mlp", "img/MAPHead_0/MlpBlock_0"),
      (f"{t}.embeddings.token_embedding.weight", ["txt/Embed_0/embedding"], "same"),
      (f"{t}.embeddings.position_embedding.weight", ["txt/pos_embedding"], "posemb"),
      *_blocks(t, "txt/Encoder_0", spec["text"]["depth"]),
      *_norm(f"{t}.final_layer_norm", "txt/Encoder_0/encoder_norm"),
      (f"{t}.head.weight", ["txt/head/kernel"], "dense"),
      (f"{t}.head.bias", ["txt/head/bias"], "same"),
  ]


def _to_hf(kind, arrays):
  """big_vision arrays -> one torch-layout array (Linear weights are [out, in])."""
  if kind == "in_kernel":   # [D, heads, head_dim] each -> [sum(heads*head_dim), D]
    return np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays])
  if kind == "flat":        # [heads, head_dim] each -> [sum(heads*head_dim)]
    return np.concatenate([a.reshape(-1) for a in arrays])
  (a,) = arrays
  return {"out_kernel": lambda: a.reshape(-1, a.shape[-1]).T,   # [heads, head_dim, D] -> [D, hd*]
          "dense": lambda: a.T,
          "conv": lambda: a.transpose(3, 2, 0, 1),              # [p, p, 3, D] -> [D, 3, p, p]
          "posemb": lambda: a.reshape(-1, a.shape[-1]),         # [1, N, D] or [g, g, D]
          "same": lambda: a}[kind]()


def _from_hf(kind, w, shapes):
  """Inverse of `_to_hf`: one HF array -> the big_vision arrays of `shapes`."""
  if kind in ("in_kernel", "flat"):
    parts = np.split(w, len(shapes))
    return [(p.T if kind == "in_kernel" else p).reshape(s) for p, s in zip(parts, shapes)]
  (s,) = shapes
  return [{"out_kernel": lambda: w.T.reshape(s), "dense": lambda: w.T,
           "conv": lambda: w.transpose(2, 3, 1, 0), "posemb": lambda: w.reshape(s),
           "same": lambda: w.reshape(s)}[kind]()]


def hf_config(spec, tokenizer=None):
  """config.json contents; `tokenizer` (a siglip_jax Tokenizer) sets the special token ids."""
  i, t = spec["image"], spec["text"]
  ids = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
  if tokenizer is not None:
    ids.update(pad_token_id=int(tokenizer.pad_value), eos_token_id=int(tokenizer.eos_id))
  return {
      "architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0,
      "torch_dtype": "float32",
      "text_config": dict(
          model_type="siglip_text_model", vocab_size=t["vocab_size"], hidden_size=t["width"],
          intermediate_size=t["mlp_dim"], num_hidden_layers=t["depth"],
          num_attention_heads=t["num_heads"], max_position_embeddings=spec["text_len"],
          projection_size=spec["out_dim"][1], hidden_act="gelu_pytorch_tanh",
          layer_norm_eps=1e-6, attention_dropout=0.0, **ids),
      "vision_config": dict(
          model_type="siglip_vision_model", hidden_size=i["width"],
          intermediate_size=i["mlp_dim"], num_hidden_layers=i["depth"],
          num_attention_heads=i["num_heads"], num_channels=3, image_size=spec["image_size"],
          patch_size=i["patch_size"][0], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
          attention_dropout=0.0, vision_use_head=True),
  }


PIPELINE_TEXT_LEN = 64   # what transformers' zero-shot pipeline pads SigLIP text to, always


def export_warnings(spec, tokenizer=None):
  """What of an HF export will not work as a user expects, as sentences (empty: nothing)."""
  out = []
  if spec["text_len"] != PIPELINE_TEXT_LEN:
    out.append(
        f"the model reads {spec['text_len']} text tokens, but transformers' "
        f"zero-shot-image-classification pipeline pads SigLIP text to {PIPELINE_TEXT_LEN} "
        "tokens whatever the model says, so pipeline(...) will fail or read the wrong token; "
        "use AutoModel + AutoProcessor instead: processor(text=..., images=..., "
        f"padding='max_length') pads to {spec['text_len']} (the tokenizer's model_max_length), "
        "then model(**inputs)")
  if tokenizer is None:
    out.append("no SentencePiece model is known for this source (a bare .npz names none), so the "
               "export has no tokenizer files, which transformers' pipeline and AutoProcessor "
               "need")
  elif tokenizer.eos == "append":
    out.append("the tokenizer appends EOS without keeping it on truncation (eos='append'); HF "
               "truncation keeps it, so texts longer than the text length get other ids")
  return out


def sincos_as_table(flat, spec):
  """A fixed 2-D sin-cos image position embedding written out as the table it is: HF SigLIP's
  learned `position_embedding` then holds exactly the values the model adds (at the trained
  image size). -> (flat, spec) with posemb "learn"; others unchanged."""
  image = spec["image"]
  if image.get("posemb", "learn") != "sincos2d":
    return flat, spec
  from siglip_jax.models.vit import posemb_sincos_2d
  ph, pw = image["patch_size"]
  flat = {**flat, "img/pos_embedding": np.asarray(posemb_sincos_2d(
      spec["image_size"] // ph, spec["image_size"] // pw, image["width"]), np.float32)}
  return flat, {**spec, "image": {**image, "posemb": "learn"}}


def write_weights(flat, spec, out):
  """Checks that `spec` fits HF's SigLIP shape, then writes `out`/model.safetensors (the folder
  created); returns the spec as exported (a sincos posemb written as its table)."""
  from safetensors.numpy import save_file
  flat, spec = sincos_as_table(flat, spec)
  check_exportable(spec)
  flat = big_vision.unscan(flat)
  big_vision.check_params(flat, spec, "the model to export")
  tensors = {h: np.ascontiguousarray(_to_hf(kind, [flat[n] for n in bv]), np.float32)
             for h, bv, kind in _table(spec)}
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, WEIGHTS), metadata={"format": "pt"})
  return spec


def write_json(path, content):
  with open(path, "w") as f:
    json.dump(content, f, indent=2)


def save(flat, spec, out, tokenizer=None):
  """Writes an HF SigLIP folder at `out` (created; files in it replaced)."""
  spec = write_weights(flat, spec, out)
  write_json(os.path.join(out, CONFIG), hf_config(spec, tokenizer))
  # Images in [-1, 1] as the model takes them: x / 255, then (x - 0.5) / 0.5.
  size = spec["image_size"]
  pre = {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
         "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
         "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
  write_json(os.path.join(out, PREPROCESSOR), pre)
  if tokenizer is not None:
    hf_tokenizer.write(out, tokenizer, spec["text_len"])


def is_hf_folder(path):
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def _sub(cfg, key, defaults, path):
  sub = {**defaults, **{k: v for k, v in (cfg.get(key) or {}).items() if v is not None}}
  if sub["hidden_act"] not in _TANH_GELU or abs(float(sub["layer_norm_eps"]) - 1e-6) > 1e-12:
    raise ValueError(f"{path}: {key} has hidden_act {sub['hidden_act']!r} and layer_norm_eps "
                     f"{sub['layer_norm_eps']}; siglip_jax computes tanh GELU with eps 1e-6")
  return sub


def read_json(path, name=CONFIG):
  with open(os.path.join(path, name)) as f:
    return json.load(f)


def read_config(path):
  """The spec of the HF SigLIP folder at `path`, from its config.json (defaults filled in)."""
  cfg = read_json(path)
  if cfg.get("model_type") != "siglip":
    raise ValueError(f"{path}: config.json has model_type {cfg.get('model_type')!r}; only "
                     "'siglip' (SiglipModel) and 'siglip2' (Siglip2Model) folders are read")
  spec, v = spec_from_config(cfg, path)
  size = v["image_size"] if np.ndim(v["image_size"]) == 0 else v["image_size"][0]
  return {**spec, "image_size": int(size)}


def spec_from_config(cfg, path, vision_defaults=VISION_DEFAULTS):
  """(the spec less `image_size`, the vision_config with defaults) of a SigLIP or SigLIP 2
  config.json's contents: both have the same towers, apart from the patch embedding."""
  v = _sub(cfg, "vision_config", vision_defaults, path)
  t = _sub(cfg, "text_config", _TEXT_DEFAULTS, path)
  if not v["vision_use_head"]:
    raise ValueError(f"{path}: vision_use_head is false, so the model has no image embedding")
  patch = v["patch_size"] if np.ndim(v["patch_size"]) == 0 else v["patch_size"][0]
  return {
      "image": dict(patch_size=(int(patch), int(patch)), width=v["hidden_size"],
                    depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
                    num_heads=v["num_attention_heads"], pool_type="map", posemb="learn",
                    rep_size=False),
      "text": dict(width=t["hidden_size"], depth=t["num_hidden_layers"],
                   mlp_dim=t["intermediate_size"], num_heads=t["num_attention_heads"],
                   vocab_size=t["vocab_size"], pool_type="last"),
      "out_dim": (None, t["projection_size"] or t["hidden_size"]),
      "bias_init": -10.0, "text_len": t["max_position_embeddings"],
  }, v


def _read_tensors(path):
  from safetensors.numpy import load_file
  index = os.path.join(path, WEIGHTS + ".index.json")
  if os.path.isfile(index):   # sharded: model-0000x-of-0000n.safetensors
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(path, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise ValueError(f"{path}: no {WEIGHTS} (only safetensors weights are read, never pickles)")
  out = {}
  for name in files:
    try:
      out.update(load_file(os.path.join(path, name)))
    except OSError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # safetensors' own error class
      raise ValueError(f"{os.path.join(path, name)} is damaged or truncated ({e})") from None
  return out


def load(path):
  """(flat per-layer params, spec, SentencePiece path or None) of an HF SigLIP folder."""
  path = os.fspath(path)
  spec = read_config(path)
  return read_weights(path, spec), spec, spiece_path(path)


def spiece_path(path):
  sp = os.path.join(path, SPIECE)
  return sp if os.path.isfile(sp) else None


def read_weights(path, spec):
  """The flat per-layer params of the HF folder `path` whose config says `spec`, checked."""
  tensors = _read_tensors(path)
  tensors.pop("text_model.embeddings.position_ids", None)   # buffers older versions saved
  tensors.pop("vision_model.embeddings.position_ids", None)
  table = _table(spec)
  want = {h for h, _, _ in table}
  missing, extra = want - set(tensors), set(tensors) - want
  if missing or extra:
    raise ValueError(f"{path}: {WEIGHTS} does not match its config.json: missing "
                     f"{big_vision.name_list(missing) or 'none'}; unexpected "
                     f"{big_vision.name_list(extra) or 'none'}")
  shapes = big_vision.expected_shapes(spec)
  flat = {}
  for h, bv, kind in table:
    w = np.asarray(tensors[h], np.float32)
    if w.size != sum(int(np.prod(shapes[n])) for n in bv):
      raise ValueError(f"{path}: {h} has shape {w.shape}, which contradicts config.json "
                       f"(expected {' + '.join(str(shapes[n]) for n in bv)})")
    flat.update(zip(bv, _from_hf(kind, w, [shapes[n] for n in bv])))
  big_vision.check_params(flat, spec, path)
  return flat
