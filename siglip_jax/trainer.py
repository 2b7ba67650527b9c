"""The training loop: wires mesh, state, data, the jitted step, checkpoints, evals, metrics."""
import contextlib
import functools
import math
import sys

import jax
import jax.numpy as jnp

from etils import epath

from siglip_jax import checkpoint, experiment, inference, mesh as mesh_lib, metrics, objectives
from siglip_jax import microbatch, naflex_config, optim, step
from siglip_jax.objectives import distill, distill_config
from siglip_jax import paths, perf, workdir_lease


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, say); the message names the step."""


def build(config, workdir=None):
  """Everything a run needs before its first step; the checks come before any compiling."""
  experiment.check_config(config)
  try:
    mesh = mesh_lib.make_mesh(config.mesh)
  except ValueError as e:
    raise experiment.ConfigError(f"config key `mesh`: {e}") from None
  try:
    mesh_lib.check_batch_size(config.input.batch_size, mesh)
  except ValueError as e:
    raise experiment.ConfigError(str(e)) from None  # names input.batch_size
  # Each NaFlex length's batch splits over the batch axes' devices and the processes too.
  batch_devices = math.lcm(mesh_lib.batch_size_divisor(mesh), jax.process_count())
  naflex_config.check_config(config, batch_devices=batch_devices)
  microbatch.check_config(config, batch_devices=batch_devices)
  tokenizer = experiment.make_tokenizer(config)
  model, vocab_size = experiment.make_model(config, tokenizer.vocab_size)
  objs = objectives.build(config, towers=model, text_vocab=vocab_size, mesh=mesh)
  example = experiment.example_batch(config, objs)   # all the full step reads
  # The distillation views are not needed to initialise anything (and are big at scale).
  init_example = experiment.example_batch(config, [o for o in objs if not o.uses_teacher])
  abstract_params = jax.eval_shape(
      lambda b: step.init_params(model, objs, jax.random.key(0), b), init_example)
  tx, lr_fn = optim.make_optimizer(abstract_params, config.optim, config.total_steps)
  update_mults = optim.update_multipliers(abstract_params, distill_config.lr_mults(config))
  init = functools.partial(step.init_state, model, objs, tx)
  abstract_state = jax.eval_shape(init, jax.random.key(config.seed), init_example)
  rules = config.sharding_rules
  try:
    state_sharding = mesh_lib.tree_shardings(abstract_state, mesh, rules,
                                             config.fsdp_min_size_mb)
    mesh_lib.check_axes_used(mesh, rules)
  except ValueError as e:
    raise experiment.ConfigError(f"config key `sharding_rules`: {e}") from None
  batch_sharding = mesh_lib.batch_sharding(mesh)
  plan = microbatch.Plan(microbatch.count(config), mesh, state_sharding.params)
  teacher_cfg, total = config.objectives.teacher, config.total_steps
  momentum = lambda done, switch: distill.teacher_momentum(  # noqa: E731
      teacher_cfg, done, switch, total)

  @functools.lru_cache(maxsize=None)
  def train_step_for(active):
    """The jitted step training the objectives named in `active` (one compile per set); its
    batch holds what those objectives read (the views only from the switch on)."""
    keys = experiment.example_batch(config, [o for o in objs if o.name in active])
    return jax.jit(step.make_train_step(model, tx, objs, lr_fn, active, momentum,
                                        update_mults, plan),
                   in_shardings=(state_sharding, {k: batch_sharding for k in keys}),
                   out_shardings=(state_sharding, None), donate_argnums=(0,))

  switch = None
  if distill.on(objs):
    switch = jax.jit(functools.partial(distill.switch, objectives=objs),
                     in_shardings=(state_sharding,), out_shardings=state_sharding,
                     donate_argnums=(0,))
  return dict(mesh=mesh, model=model, objectives=objs, tokenizer=tokenizer,
              vocab_size=vocab_size, tx=tx, example=example, init_example=init_example,
              switch=switch, abstract_state=abstract_state, plan=plan,
              state_sharding=state_sharding, batch_sharding=batch_sharding,
              train_step=train_step_for(frozenset(o.name for o in objs)),
              train_step_at=lambda done: train_step_for(objectives.active_names(objs, done)),
              init=jax.jit(init, out_shardings=state_sharding))


def _with_shardings(abstract, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def initial_state(config, parts, ckpt):
  """Latest checkpoint of this workdir, else `model_init`'s weights, else a fresh init."""
  target = _with_shardings(parts["abstract_state"], parts["state_sharding"])
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(target)
    # The data loader's resume point: next step and running skip total (data/skipped).
    return state, {"data_position": int(extra.get("data_position", int(state.step))),
                   "data_skipped": int(extra.get("data_skipped", 0)),
                   "data_skipped_regions": int(extra.get("data_skipped_regions", 0))}
  state = parts["init"](jax.random.key(config.seed), _zeros_like(parts["init_example"]))
  if config.model_init:
    from siglip_jax import model_init  # fine-tune start only; the module reads checkpoints
    try:
      # SILC/TIPS's heads and mask token start fresh at their switch whatever is loaded.
      fresh = tuple(f"{n}(/.*)?" for o in parts["objectives"] if o.uses_teacher
                    for n in o.param_names)
      params = model_init.load_init_params(config.model_init, state.params,
                                           dont_load=tuple(config.model_load.dont_load) + fresh)
    except (ValueError, OSError) as e:
      raise experiment.ConfigError(f"config key `model_init`: {e}") from None
    state = state.replace(params=params,
                          opt_state=jax.jit(parts["tx"].init, out_shardings=parts[
                              "state_sharding"].opt_state)(params))
  return state, {}


def switch_step(state):
  """The step SILC/TIPS start at, as the state records it; None without a teacher."""
  if not state.teacher:
    return None
  return int(jax.device_get(state.teacher["switch_step"]))


def _zeros_like(example):
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), example)


def inference_handle(config, parts, params):
  """The handle evaluators use: the towers, and the LocCa decoder when training has one."""
  towers = step.tower_params(params, parts["objectives"])
  decoding = None
  for o in parts["objectives"]:
    if o.name == "locca":
      from siglip_jax import decoding as decoding_lib
      decoding = decoding_lib.Decoding(parts["model"], towers, o.decoder, params["decoder"],
                                       parts["tokenizer"])
  naflex = naflex_config.is_naflex(config)
  extra = {"max_num_patches": int(config.input.max_num_patches)} if naflex else {}
  return inference.SigLIP(parts["model"], towers,
                          image_size=None if naflex else config.input.image_size,
                          text_len=config.input.text_len, vocab_size=parts["vocab_size"],
                          tokenizer=parts["tokenizer"], mesh=parts["mesh"], config=config,
                          decoding=decoding, **extra)


def run_evals(evaluators, config, parts, params, step_no, writer, force=False):
  results = {}
  for ev in evaluators:
    if force or (ev.every_steps and step_no % ev.every_steps == 0):
      results.update(ev.run(inference_handle(config, parts, params)))
  if results:
    writer.write(step_no, results)
  return results


def _say_what_resume_means(workdir, first, total):
  """A restart from scratch beside an old run's metrics, or a resume with nothing left to do,
  is said loudly: both are usually a mistake (a deleted checkpoints/, a lowered total_steps)."""
  if first == 0:
    logged = metrics.last_logged_step(workdir)
    if logged:
      print(f"WARNING: {paths.join(workdir, 'metrics.jsonl')} has rows up to step {logged} but "
            f"{paths.join(workdir, 'checkpoints')} holds no checkpoint: training RESTARTS FROM "
            "SCRATCH (new rows follow the old ones)", file=sys.stderr, flush=True)
  elif first >= total:
    what = "is past" if first > total else "reached"
    print(f"nothing to train: the checkpoint at step {first} {what} total_steps={total} "
          "(raise --config.total_steps to train on)", file=sys.stderr, flush=True)


def _check_finite(state):
  bad = int(jax.device_get(state.bad_step))
  if bad:
    raise TrainingError(f"the loss or its gradient was not finite at step {bad}; training "
                        "stopped (weights from before that step were kept, none non-finite saved)")


def train(config, workdir):
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the final
  evaluation's metrics. Bad input fails before anything is built; a second run on the same
  workdir is refused (`workdir_lease`) before anything compiles."""
  experiment.check_config(config)
  paths.check_workdir(workdir)
  if config.model_init:
    from siglip_jax import model_init  # fine-tune start only; the module reads checkpoints
    model_init.check_source(config.model_init)
    model_init.continue_schedule(config)
  is_main = jax.process_index() == 0
  # A local folder or a URL (gs://...; see siglip_jax.paths). A bucket needs no folders: one
  # placeholder from process 0, not one write of the same object from every host.
  if is_main or not paths.is_remote(workdir):
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    paths.check_writable(workdir)
  lease = workdir_lease.acquire_for_run(workdir)
  try:
    return _train_holding_lease(config, workdir, is_main)
  finally:
    lease.release()   # last, once checkpoints are written


def _train_holding_lease(config, workdir, is_main):
  parts = build(config)
  with contextlib.ExitStack() as cleanup:
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, config=config)
    cleanup.callback(ckpt.close)
    state, data_state = initial_state(config, parts, ckpt)
    first = int(jax.device_get(state.step))
    total = config.total_steps
    if is_main:
      _say_what_resume_means(workdir, first, total)
    writer = metrics.make_writers(workdir, is_main)
    cleanup.callback(writer.close)
    evaluators = experiment.make_evaluators(config)
    if is_main:
      print(f"siglip_jax: {jax.device_count()} devices x {jax.process_count()} processes, mesh "
            f"{dict(parts['mesh'].shape)}, "
            f"{'resuming at step ' + str(first) if first else 'from scratch'}", flush=True)
    switch_at = switch_step(state)
    if switch_at is not None:   # the recorded one: a resume with other total_steps keeps it
      objectives.set_switch_step(parts["objectives"], switch_at)
    data = experiment.make_train_data(config, parts["tokenizer"], parts["batch_sharding"],
                                      data_state, views_from=switch_at)
    cleanup.callback(data.close)
    profiler = perf.StepProfiler(config.profile_steps, workdir)
    cleanup.callback(profiler.stop)
    final = _loop(config, parts, state, first, data, ckpt, writer, evaluators, profiler,
                  is_main, switch_at)
  if is_main and final:
    print(metrics.summary_table(final), flush=True)
  return final


def _loop(config, parts, state, first, data, ckpt, writer, evaluators, profiler, is_main,
          switch_at):
  """Steps first+1 .. total_steps: train, log, save, evaluate (SILC/TIPS's switch applied
  before the update after `switch_at` completed ones). Returns the last step's evaluation ({}
  when preempted)."""
  total = config.total_steps
  progress = metrics.Progress(total, config.input.batch_size, first_step=first, enabled=is_main)
  perf_meter = perf.PerfMeter(config, parts["model"], objectives=parts["objectives"],
                              enabled=is_main)
  final = {}
  wait_s, pairs = 0.0, 0
  plan = getattr(data, "plan", None)   # NaFlex: each step's length and batch
  for step_no in range(first + 1, total + 1):
    _, batch, wait = next(data)
    wait_s += wait
    pairs += getattr(data, "last_batch_size", config.input.batch_size)
    profiler.before_step(step_no)
    if step_no - 1 == switch_at:
      state = parts["switch"](state)   # SILC/TIPS start: fresh heads, teacher = student
    state, step_metrics = parts["train_step_at"](step_no - 1)(state, batch)
    profiler.after_step(step_no, state)
    last = step_no == total
    if step_no % config.log_every_steps == 0 or last:
      _check_finite(state)
      host = jax.device_get(step_metrics)
      pairs_per_s = progress.update(step_no, float(host["train/loss"]), pairs)
      host.update({"train/pairs_per_s": pairs_per_s, "perf/data_wait_s": wait_s,
                   **data.metrics(),
                   **perf_meter.metrics(pairs_per_s, objectives.active_names(
                       parts["objectives"], step_no - 1),
                       seq_len=plan.length(step_no - 1) if plan is not None else None)})
      if plan is not None:
        host["train/seq_len"] = plan.length(step_no - 1)
      wait_s, pairs = 0.0, 0
      writer.write(step_no, host)
    # Every step: the checkpointer alone decides (schedule, last step, preemption notice).
    if ckpt.maybe_save(step_no, state, data.state, last=last, check=_check_finite):
      if is_main:
        print(f"preempted: saved step {step_no}; rerun the same command to resume", flush=True)
      return {}
    results = run_evals(evaluators, config, parts, state.params, step_no, writer, force=last)
    if last:
      final = results
  return final
