"""The training loop: wires mesh, state, data, the jitted step, checkpoints, evals, metrics."""
import functools

import jax
import jax.numpy as jnp

from siglip_jax import checkpoint, experiment, inference, mesh as mesh_lib, metrics, optim, step
from siglip_jax import paths, perf


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
  tokenizer = experiment.make_tokenizer(config)
  model, vocab_size = experiment.make_model(config, tokenizer.vocab_size)
  size, length = config.input.image_size, config.input.text_len
  example = {"image": jax.ShapeDtypeStruct((config.input.batch_size, size, size, 3), jnp.float32),
             "text": jax.ShapeDtypeStruct((config.input.batch_size, length), jnp.int32)}
  abstract_params = jax.eval_shape(
      lambda i, t: model.init(jax.random.key(0), i, t), example["image"], example["text"])["params"]
  tx, lr_fn = optim.make_optimizer(abstract_params, config.optim, config.total_steps)
  init = functools.partial(step.init_state, model, tx)
  abstract_state = jax.eval_shape(init, jax.random.key(config.seed), example)
  rules = config.get("sharding_rules", ((".*", "replicate"),))
  try:
    state_sharding = mesh_lib.tree_shardings(abstract_state, mesh, rules)
  except ValueError as e:
    raise experiment.ConfigError(f"config key `sharding_rules`: {e}") from None
  batch_sharding = mesh_lib.batch_sharding(mesh)
  data_sharding = {"image": batch_sharding, "text": batch_sharding}
  loss_fn = step.make_loss_fn(config.loss.kind, mesh)
  train_step = jax.jit(step.make_train_step(model, tx, loss_fn, lr_fn),
                       in_shardings=(state_sharding, data_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=(0,))
  return dict(mesh=mesh, model=model, tokenizer=tokenizer, vocab_size=vocab_size, tx=tx,
              abstract_state=abstract_state, state_sharding=state_sharding,
              batch_sharding=batch_sharding, train_step=train_step,
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
                   "data_skipped": int(extra.get("data_skipped", 0))}
  state = parts["init"](jax.random.key(config.seed), _zeros_like_batch(config))
  if config.model_init:
    from siglip_jax import model_init  # fine-tune start only; the module reads checkpoints
    params = model_init.load_init_params(config.model_init, state.params,
                                         dont_load=config.model_load.dont_load)
    state = state.replace(params=params,
                          opt_state=jax.jit(parts["tx"].init, out_shardings=parts[
                              "state_sharding"].opt_state)(params))
  return state, {}


def _zeros_like_batch(config):
  size, b = config.input.image_size, config.input.batch_size
  return {"image": jnp.zeros((b, size, size, 3), jnp.float32),
          "text": jnp.zeros((b, config.input.text_len), jnp.int32)}


def inference_handle(config, parts, params):
  return inference.SigLIP(parts["model"], params, image_size=config.input.image_size,
                          text_len=config.input.text_len, vocab_size=parts["vocab_size"],
                          tokenizer=parts["tokenizer"], mesh=parts["mesh"], config=config)


def run_evals(evaluators, config, parts, params, step_no, writer, force=False):
  results = {}
  for ev in evaluators:
    if force or (ev.every_steps and step_no % ev.every_steps == 0):
      results.update(ev.run(inference_handle(config, parts, params)))
  if results:
    writer.write(step_no, results)
  return results


def _check_finite(state):
  bad = int(jax.device_get(state.bad_step))
  if bad:
    raise TrainingError(f"the loss or its gradient was not finite at step {bad}; training "
                        "stopped (weights from before that step were kept, none non-finite saved)")


def train(config, workdir):
  parts = build(config)
  is_main = jax.process_index() == 0
  # A local folder or a URL (gs://...; see siglip_jax.paths). A bucket needs no folders: one
  # placeholder from process 0, not one write of the same object from every host.
  if is_main or not paths.is_remote(workdir):
    paths.makedirs(workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, config=config)
  state, data_state = initial_state(config, parts, ckpt)
  first = int(jax.device_get(state.step))
  total = config.total_steps
  writer = metrics.make_writers(workdir, is_main)
  evaluators = experiment.make_evaluators(config)
  if is_main:
    print(f"siglip_jax: {jax.device_count()} devices x {jax.process_count()} processes, mesh "
          f"{dict(parts['mesh'].shape)}, {'resuming at step ' + str(first) if first else 'from scratch'}",
          flush=True)
  data = experiment.make_train_data(config, parts["tokenizer"], parts["batch_sharding"],
                                    data_state)
  progress = metrics.Progress(total, config.input.batch_size, first_step=first, enabled=is_main)
  perf_meter = perf.PerfMeter(config, parts["model"], enabled=is_main)
  profiler = perf.StepProfiler(config.get("profile_steps", ""), workdir)
  final = {}
  wait_s = 0.0
  try:
    for step_no in range(first + 1, total + 1):
      _, batch, wait = next(data)
      wait_s += wait
      profiler.before_step(step_no)
      state, step_metrics = parts["train_step"](state, batch)
      profiler.after_step(step_no, state)
      last = step_no == total
      if step_no % config.log_every_steps == 0 or last:
        _check_finite(state)
        host = jax.device_get(step_metrics)
        pairs_per_s = progress.update(step_no, float(host["train/loss"]))
        host.update({"train/pairs_per_s": pairs_per_s, "perf/data_wait_s": wait_s,
                     "data/skipped": data.skipped_total(),
                     **perf_meter.metrics(pairs_per_s)})
        wait_s = 0.0
        writer.write(step_no, host)
      if ckpt.should_save(step_no, last=last) or ckpt.reached_preemption(step_no):
        _check_finite(state)
        ckpt.save(step_no, state, data.state())
        if ckpt.reached_preemption(step_no) and not last:
          ckpt.wait()
          if is_main:
            print(f"preempted: saved step {step_no}; rerun the same command to resume", flush=True)
          return {}
      results = run_evals(evaluators, config, parts, state.params, step_no, writer, force=last)
      if last:
        final = results
  finally:
    profiler.stop()
    data.close()
    ckpt.close()
    writer.close()
  if is_main and final:
    print(metrics.summary_table(final), flush=True)
  return final
