"""SigLIP 2, stage B: SILC (local-to-global self-distillation) and TIPS (masked patch
prediction) against an EMA teacher of the image tower.

The teacher is `TrainState.teacher`: {"params": {"img", "silc_head", "tips_head"} (EMA copies of
the student's), "centers": {"silc": [K], "tips": [K]}}. It exists from step 0 (every checkpoint
has one structure), becomes the student at the switch step (`switch`: heads and mask token
re-initialised from (seed, name), their optimizer moments zeroed, centers zeroed) and follows
`teacher = m * teacher + (1 - m) * student` after every update from then on. The teacher sees
the global view unmasked; gradients never reach it (its outputs are computed outside the
differentiated function).

Both losses are DINO's cross-entropy between the teacher's centred, sharpened softmax and the
student's softmax: H(softmax((t - c) / T_t), log_softmax(s / T_s)), averaged over the global
batch (SILC: every local crop against the global view's pooled output; TIPS: every masked
patch against the teacher's output at that patch). Centers follow
`c = mu * c + (1 - mu) * mean(teacher outputs)`.
"""
import zlib

import jax
import jax.numpy as jnp

from siglip_jax import flops
from siglip_jax.models import distill_head, two_towers
from siglip_jax.objectives.distill_config import view_settings
from siglip_jax.objectives.registry import Objective


# ------------------------------------------------------------------------------- the losses

def distill_xent(student_logits, teacher_logits, center, *, student_temp, teacher_temp):
  """Per row: H(softmax((teacher - center) / T_t), log_softmax(student / T_s)), float32."""
  target = jax.nn.softmax((teacher_logits - center) / teacher_temp, axis=-1)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  return -jnp.sum(jax.lax.stop_gradient(target) * log_p, axis=-1)


def silc_loss(student_logits, teacher_logits, center, *, student_temp, teacher_temp,
              num_crops=None):
  """student [B, n_local, K] (local crops), teacher [B, K] (global view) -> the sum over crops
  over `num_crops` (default B * n_local: the mean; a micro-batch passes the global count)."""
  xent = distill_xent(student_logits, teacher_logits[:, None], center,
                      student_temp=student_temp, teacher_temp=teacher_temp)
  return jnp.sum(xent) / (xent.size if num_crops is None else num_crops)


def tips_loss(student_logits, teacher_logits, mask, center, *, student_temp, teacher_temp,
              num_masked=None):
  """student, teacher [B, P, K] (masked / unmasked global view), mask [B, P] -> the mean over
  the masked patches of the whole batch (`num_masked`: their count; default this batch's)."""
  xent = distill_xent(student_logits, teacher_logits, center, student_temp=student_temp,
                      teacher_temp=teacher_temp)
  w = mask.astype(jnp.float32)
  num_masked = jnp.sum(w) if num_masked is None else num_masked
  return jnp.sum(xent * w) / jnp.maximum(num_masked, 1.0)


def batch_mean(teacher_logits):
  """The teacher's mean output over the batch (and patches): what its center follows."""
  return jnp.mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]), axis=0)


def update_center(center, teacher_logits, momentum, mean=None):
  """DINO's centering: the EMA of the teacher's mean output over the batch (and patches);
  `mean` given (the whole batch's, from micro-batches) replaces the one of `teacher_logits`."""
  mean = batch_mean(teacher_logits) if mean is None else mean
  return momentum * center + (1.0 - momentum) * mean


def ema(teacher, student, momentum):
  return jax.tree_util.tree_map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher,
                                student)


def teacher_momentum(cfg, step, switch_step, total_steps):
  """The EMA momentum for the update after `step`: constant, or DINO's cosine from
  `momentum` at the switch to 1.0 at the last step."""
  m = float(cfg.momentum)
  if cfg.momentum_schedule == "constant":
    return jnp.asarray(m, jnp.float32)
  switch_step = jnp.asarray(switch_step, jnp.float32)
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - switch_step) /
                  jnp.maximum(float(total_steps) - switch_step, 1.0), 0.0, 1.0)
  return 1.0 - (1.0 - m) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


# ------------------------------------------------------------------------------- objectives

def _key(seed, name):
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7fffffff)


class _Distill(Objective):
  """Shared by SILC and TIPS: a head of its own (`<name>_head`), the teacher's targets."""
  uses_teacher = True
  head_input = ""      # the image tower output the head reads

  def __init__(self, config, *, towers, weight, start_step, **unused):
    del unused
    super().__init__(weight, start_step)
    cfg = config.objectives[self.name]
    self.cfg, self.seed = cfg, int(config.seed)
    dtype = jnp.dtype(config.model.dtype)
    self.head = distill_head.DistillHead(hidden_dim=cfg.head_hidden,
                                         bottleneck_dim=cfg.head_bottleneck,
                                         out_dim=cfg.head_dim, dtype=dtype)
    self.vit = two_towers.image_tower(towers)
    self.views = view_settings(config)
    self.temps = dict(student_temp=float(cfg.student_temp),
                      teacher_temp=float(cfg.teacher_temp))
    # The grid the position embedding is learned on; views of other sizes resize it.
    self.posemb_grid = tuple(int(config.input.image_size) // p
                             for p in self.vit.dims["patch_size"])

  def head_params(self, rng, width):
    return self.head.init(rng, jnp.zeros((1, width), jnp.float32))["params"]

  def init(self, rng, batch, tower_out):
    del batch
    return {f"{self.name}_head": self.head_params(rng, tower_out[self.head_input].shape[-1])}

  def fresh(self, params):
    """This objective's parameters re-initialised from (seed, name): the switch's."""
    width = params[f"{self.name}_head"]["hidden_0"]["kernel"].shape[0]
    return {f"{self.name}_head": self.head_params(_key(self.seed, self.name), width)}

  def head_flops(self, width):
    c = self.cfg
    return 2 * (width * c.head_hidden + c.head_hidden ** 2 + c.head_hidden * c.head_bottleneck
                + c.head_bottleneck * c.head_dim)

  def teacher_logits(self, teacher_params, teacher_out):
    return self.head.apply({"params": teacher_params[f"{self.name}_head"]},
                           teacher_out[self.head_input])

  def teacher_forward_flops(self):
    """The teacher's forward of the global view (no backward: a third of a trained one)."""
    return flops.image_tower_flops(image_size=self.views["global_size"],
                                   **_tower(self.vit)) / flops.TRAIN_MULTIPLIER


class SILC(_Distill):
  name = "silc"
  batch_keys = ("view_global", "view_local")
  param_names = ("silc_head",)
  head_input = "img/pre_logits"

  def batch_spec(self, config):
    v = self.views
    return {"view_global": ((v["global_size"], v["global_size"], 3), jnp.float32),
            "view_local": ((v["n_local"], v["local_size"], v["local_size"], 3), jnp.float32)}

  def synthetic_batch(self, key, batch_size, text_vocab):
    del text_vocab
    return {k: jax.random.uniform(jax.random.fold_in(key, i), (batch_size, *shape), dtype,
                                  -1.0, 1.0)
            for i, (k, (shape, dtype)) in enumerate(self.batch_spec(None).items())}

  def forward_flops(self, *, image_tokens, image_width):
    del image_tokens
    v = self.views
    local = flops.image_tower_flops(image_size=v["local_size"], **_tower(self.vit))
    teacher = self.head_flops(image_width) / flops.TRAIN_MULTIPLIER
    if not v["num_masked"]:   # without TIPS the teacher's tower forward is counted here
      teacher += self.teacher_forward_flops()
    return v["n_local"] * (local + self.head_flops(image_width)) + teacher

  def normalizer(self, batch):
    return jnp.asarray(batch["view_local"].shape[0] * batch["view_local"].shape[1], jnp.float32)

  def loss(self, params, batch, ctx, norm=None):
    local = batch["view_local"]
    b, n = local.shape[:2]
    _, out = self.vit.apply({"params": params["img"]}, local.reshape(b * n, *local.shape[2:]),
                            posemb_grid=self.posemb_grid)
    student = self.head.apply({"params": params["silc_head"]}, out["pre_logits"])
    loss = silc_loss(student.reshape(b, n, -1), ctx["teacher/silc"], ctx["center/silc"],
                     num_crops=norm, **self.temps)
    return loss, {}


class TIPS(_Distill):
  name = "tips"
  batch_keys = ("view_global", "tips_mask")
  param_names = ("tips_head", "mask_token")
  head_input = "img/encoded"

  def init(self, rng, batch, tower_out):
    k_head, k_token = jax.random.split(rng)
    width = tower_out["img/encoded"].shape[-1]
    return {"tips_head": self.head_params(k_head, width),
            "mask_token": 0.02 * jax.random.truncated_normal(k_token, -2.0, 2.0, (width,))}

  def fresh(self, params):
    return self.init(_key(self.seed, self.name), None,
                     {"img/encoded": params["mask_token"][None, None]})

  def batch_spec(self, config):
    v = self.views
    return {"view_global": ((v["global_size"], v["global_size"], 3), jnp.float32),
            "tips_mask": ((v["grid"],), jnp.bool_)}

  def synthetic_batch(self, key, batch_size, text_vocab):
    del text_vocab
    v = self.views
    keys = jax.random.split(key, batch_size + 1)
    order = jax.vmap(lambda k: jax.random.permutation(k, v["grid"]))(keys[1:])
    return {"view_global": jax.random.uniform(keys[0], (batch_size, v["global_size"],
                                                        v["global_size"], 3), jnp.float32,
                                              -1.0, 1.0),
            "tips_mask": order < v["num_masked"]}

  def forward_flops(self, *, image_tokens, image_width):
    del image_tokens
    one = flops.image_tower_flops(image_size=self.views["global_size"], **_tower(self.vit))
    heads = self.views["grid"] * self.head_flops(image_width)
    # Student: the masked view and the head on every patch. Teacher: the global view (SILC's
    # too, counted here once) and its head, without backward.
    return one + heads + heads / flops.TRAIN_MULTIPLIER + self.teacher_forward_flops()

  def normalizer(self, batch):
    mask = batch["tips_mask"]
    return {"masked": jnp.sum(mask.astype(jnp.float32)),
            "patches": jnp.asarray(mask.size, jnp.float32)}

  def loss(self, params, batch, ctx, norm=None):
    norm = self.normalizer(batch) if norm is None else norm
    _, out = self.vit.apply({"params": params["img"]}, batch["view_global"],
                            masked=batch["tips_mask"], mask_token=params["mask_token"],
                            posemb_grid=self.posemb_grid)
    student = self.head.apply({"params": params["tips_head"]}, out["encoded"])
    loss = tips_loss(student, ctx["teacher/tips"], batch["tips_mask"], ctx["center/tips"],
                     num_masked=norm["masked"], **self.temps)
    masked = jnp.sum(batch["tips_mask"].astype(jnp.float32))
    return loss, {"train/tips_masked_fraction": masked / norm["patches"]}


def _tower(vit):
  dims = vit.dims
  return dict(patch_size=dims["patch_size"], width=dims["width"], depth=dims["depth"],
              mlp_dim=dims["mlp_dim"], num_heads=dims["num_heads"],
              pool_type=vit.pool_type)


# ------------------------------------------------------------------------------- the teacher

def on(objectives):
  return [o for o in objectives if o.uses_teacher]


def init_teacher(params, objectives):
  """The teacher at step 0: copies of the student's image tower and heads, zero centers, and
  the switch step (recorded, so a resume with another total_steps cannot move it). {} when
  neither SILC nor TIPS is configured."""
  objs = on(objectives)
  if not objs:
    return {}
  names = ["img"] + [f"{o.name}_head" for o in objs]
  return {"params": _copy({k: params[k] for k in names}),
          "centers": {o.name: jnp.zeros((o.cfg.head_dim,), jnp.float32) for o in objs},
          "switch_step": jnp.asarray(objs[0].start_step, jnp.int32)}


def _copy(tree):
  # A real copy: the teacher must never share a buffer with the (donated) student params.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def switch(state, objectives):
  """The state at the switch: the heads and mask token re-initialised from (seed, name), their
  optimizer moments zeroed, the teacher a copy of the student, centers zeroed."""
  objs = on(objectives)
  params = dict(state.params)
  for o in objs:
    params.update(o.fresh(params))
  fresh = {n for o in objs for n in o.param_names}

  def zero_fresh(path, leaf):
    return jnp.zeros_like(leaf) if any(getattr(k, "key", None) in fresh for k in path) else leaf
  opt_state = jax.tree_util.tree_map_with_path(zero_fresh, state.opt_state)
  teacher = dict(state.teacher)
  teacher["params"] = _copy({k: params[k] for k in state.teacher["params"]})
  teacher["centers"] = jax.tree_util.tree_map(jnp.zeros_like, state.teacher["centers"])
  return state.replace(params=params, opt_state=opt_state, teacher=teacher)


def teacher_targets(objectives, teacher, batch):
  """{"teacher/<name>": the teacher's head outputs on the global view, "center/<name>"} for
  the distillation objectives in `objectives` (all on at this step); no gradient flows."""
  objs = on(objectives)
  first = objs[0]
  _, out = first.vit.apply({"params": teacher["params"]["img"]}, batch["view_global"],
                           posemb_grid=first.posemb_grid)
  out = {f"img/{k}": v for k, v in out.items()}
  ctx = {}
  for o in objs:
    ctx[f"teacher/{o.name}"] = o.teacher_logits(teacher["params"], out)
    ctx[f"center/{o.name}"] = teacher["centers"][o.name]
  return jax.lax.stop_gradient(ctx)


def target_means(objectives, ctx):
  """{name: the teacher's mean output over this batch} of `teacher_targets`' ctx."""
  return {o.name: batch_mean(ctx[f"teacher/{o.name}"]) for o in on(objectives)}


def next_teacher(teacher, params, means, objectives, momentum):
  """The teacher after an update: EMA of the new student params, centers moved towards
  `means` (`target_means` of the whole batch)."""
  objs = on(objectives)
  centers = dict(teacher["centers"])
  for o in objs:
    centers[o.name] = update_center(centers[o.name], None, float(o.cfg.center_momentum),
                                    mean=means[o.name])
  student = {k: params[k] for k in teacher["params"]}
  return dict(teacher, params=ema(teacher["params"], student, momentum), centers=centers)
