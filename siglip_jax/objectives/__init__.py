"""The train step's objectives: `sum_k weight_k * loss_k`, each on from `start_fraction *
total_steps` (../shared/design.md, "Objectives").

`contrastive` (the loss of `loss.kind`) is always on. SigLIP 2's add parameters of their own under
their own top-level names beside `img`, `txt`, `t`, `b` (`locca`: `decoder/...`), which sharding
rules, `optim.lr_mults`, `optim.frozen` and `model_load.dont_load` address like any other.

An objective is an object with `name`, `weight`, `start_step`, `batch_keys` (what it reads from
the batch besides image and text), `init(rng, batch, tower_out) -> {top-level name: params}`
and `loss(params, batch, tower_out) -> (scalar, {metric: value})`; `tower_out` is the two towers'
intermediates (`img/encoded`: the image patch tokens before the MAP head). SILC and TIPS
(`distill.py`) also read the EMA teacher's outputs from it and start at the recorded switch step.
"""
from siglip_jax.objectives.registry import (NAMES, Objective, active_names, build,
                                            check_config, configured, set_switch_step)

__all__ = ["NAMES", "Objective", "active_names", "build", "check_config", "configured",
           "set_switch_step"]
