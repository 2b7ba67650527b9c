"""Mesh construction, batch shardings and regex parameter-sharding rules."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from siglip_jax import mesh as mesh_lib  # noqa: E402

CPU = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPU) < 8, reason="needs 8 simulated CPU devices")


def test_make_mesh_sizes():
  mesh = mesh_lib.make_mesh([("data", -1)], devices=CPU)
  assert dict(mesh.shape) == {"data": 8}
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", -1)], devices=CPU)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert mesh_lib.batch_axes(mesh) == ("data", "fsdp")
  mesh = mesh_lib.make_mesh([["data", -1], ["model", 2]], devices=CPU)  # lists from configs
  assert mesh_lib.batch_axes(mesh) == ("data",)
  assert dict(mesh_lib.make_mesh([("data", 2)], devices=CPU[:2]).shape) == {"data": 2}


@pytest.mark.parametrize("spec", [[("data", 3)], [("data", 16)], [("data", 3), ("fsdp", -1)],
                                  [("data", -1), ("fsdp", -1)], [("data", 0)]])
def test_make_mesh_bad_size(spec):
  with pytest.raises(ValueError, match=r"mesh.*\(.data."):
    mesh_lib.make_mesh(spec, devices=CPU)


def test_make_mesh_names_device_count():
  with pytest.raises(ValueError, match="8 devices"):
    mesh_lib.make_mesh([("data", 3)], devices=CPU)


@pytest.mark.parametrize("spec", [[("dta", -1)], [("data", 2), ("data", 4)], [], ["data"]])
def test_make_mesh_bad_names(spec):
  with pytest.raises(ValueError, match="mesh"):
    mesh_lib.make_mesh(spec, devices=CPU)


def test_batch_sharding_jit_and_shard_map_work_together():
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)], devices=CPU)
  x = jax.device_put(jnp.arange(32.0).reshape(16, 2), mesh_lib.batch_sharding(mesh))
  assert x.sharding.spec == P(("data", "fsdp"))
  assert x.addressable_shards[0].data.shape == (2, 2)
  # The plain global formula under jit (XLA all-gathers), then a shard_map on the same mesh.
  gram = jax.jit(lambda a: a @ a.T)(x)
  np.testing.assert_allclose(gram, np.asarray(x) @ np.asarray(x).T)
  total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a.sum(), ("data", "fsdp")), mesh=mesh,
                                in_specs=P(("data", "fsdp")), out_specs=P()))(x)
  assert float(total) == float(np.sum(np.arange(32.0)))
  r = jax.device_put(jnp.ones(3), mesh_lib.replicated(mesh))
  assert r.sharding.is_fully_replicated


def test_check_batch_size():
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)], devices=CPU)
  mesh_lib.check_batch_size(64, mesh)
  with pytest.raises(ValueError, match=r"input\.batch_size"):
    mesh_lib.check_batch_size(12, mesh)
  model = mesh_lib.make_mesh([("data", 4), ("model", 2)], devices=CPU)
  mesh_lib.check_batch_size(12, model)  # only batch axes count


PARAMS = {
    "img": {"embedding": {"kernel": jax.ShapeDtypeStruct((16, 16, 3, 64), jnp.float32),
                          "bias": jax.ShapeDtypeStruct((64,), jnp.float32)},
            "head": {"kernel": jax.ShapeDtypeStruct((64, 40), jnp.float32)}},
    "txt": {"Embed_0": {"embedding": jax.ShapeDtypeStruct((1000, 64), jnp.float32)},
            "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32)},
    "t": jax.ShapeDtypeStruct((1,), jnp.float32),
}
RULES = [(".*/bias", "replicate"), ("img/.*", "fsdp"), ("txt/.*", "fsdp")]


def specs(tree):
  return jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda x: hasattr(x, "spec"))


def test_fsdp_shards_largest_divisible_dimension():
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)], devices=CPU)
  got = specs(mesh_lib.param_shardings(PARAMS, mesh, RULES))
  assert got["img"]["embedding"]["kernel"] == P(None, None, None, "fsdp")
  assert got["img"]["embedding"]["bias"] == P()  # first match wins: replicate
  assert got["img"]["head"]["kernel"] == P("fsdp", None)  # 64 > 40, both divisible by 4
  assert got["txt"]["Embed_0"]["embedding"] == P("fsdp", None)
  assert got["txt"]["odd"] == P()  # nothing divisible by 4
  assert got["t"] == P()  # unmatched
  eight = mesh_lib.make_mesh([("fsdp", 8)], devices=CPU)
  head = specs(mesh_lib.param_shardings(PARAMS, eight, RULES))["img"]["head"]["kernel"]
  assert head == P("fsdp", None)
  data = mesh_lib.make_mesh([("data", 8)], devices=CPU)
  assert specs(mesh_lib.param_shardings(PARAMS, data, [(".*", "fsdp:data")]))["txt"]["odd"] == P()
  assert (specs(mesh_lib.param_shardings(PARAMS, data, [(".*", "fsdp:data")]))
          ["img"]["head"]["kernel"] == P("data", None))


def test_rules_apply_to_optimizer_state():
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)], devices=CPU)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), PARAMS)
  state = jax.eval_shape(optax.adamw(1e-3).init, params)
  got = mesh_lib.tree_shardings(state, mesh, RULES)
  mu = specs(got[0].mu)
  assert mu["img"]["embedding"]["kernel"] == P(None, None, None, "fsdp")
  assert mu["txt"]["Embed_0"]["embedding"] == P("fsdp", None)
  assert specs(got[0].count) == P()
  # The shardings place real state.
  placed = jax.device_put(optax.adamw(1e-3).init(params), got)
  assert placed[0].nu["img"]["head"]["kernel"].sharding.spec == P("fsdp", None)


@pytest.mark.parametrize("rule", [("img/.*", "shard"), ("img/.*", "fsdp:model"),
                                  ("img/.*", "fsdp:nope"), ("img/[", "replicate"), ("img",)])
def test_bad_rules(rule):
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)], devices=CPU)
  with pytest.raises(ValueError, match="rule"):
    mesh_lib.param_shardings(PARAMS, mesh, [rule])


def test_fsdp_leaves_arrays_below_the_size_threshold_replicated():
  mesh = mesh_lib.make_mesh([("fsdp", 8)], devices=CPU)
  params = {"big": jax.ShapeDtypeStruct((1024, 512), jnp.float32),     # 2 MiB
            "small": jax.ShapeDtypeStruct((256, 512), jnp.float32)}    # 0.5 MiB
  got = specs(mesh_lib.tree_shardings(params, mesh, [(".*", "fsdp")], min_size_mb=1.0))
  assert got == {"big": P("fsdp", None), "small": P()}
  got = specs(mesh_lib.tree_shardings(params, mesh, [(".*", "fsdp")], min_size_mb=0.0))
  assert got == {"big": P("fsdp", None), "small": P(None, "fsdp")}   # the largest dimension


def test_a_mesh_axis_nothing_uses_is_refused():
  mesh = mesh_lib.make_mesh([("data", 4), ("model", 2)], devices=CPU)
  with pytest.raises(ValueError, match="'model'.*repeat"):
    mesh_lib.check_axes_used(mesh, [(".*", "replicate")])
  mesh_lib.check_axes_used(mesh, [("img/.*", "fsdp:model")])          # a rule uses it
  mesh_lib.check_axes_used(mesh_lib.make_mesh([("data", 8), ("model", 1)], devices=CPU), [])
  mesh_lib.check_axes_used(mesh_lib.make_mesh([("data", 2), ("fsdp", 4)], devices=CPU), [])


def test_loss_bidirectional_reaches_the_ring_from_the_config():
  import ml_collections
  from siglip_jax.objectives import contrastive
  mesh = mesh_lib.make_mesh([("data", 8)], devices=CPU)
  z = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=mesh_lib.batch_sharding(mesh))

  def hlo(bidirectional):
    loss = contrastive.loss_fn(ml_collections.ConfigDict(
        {"kind": "sigmoid_ring", "bidirectional": bidirectional}), mesh)
    return jax.jit(loss).lower(z, z, 10.0, -10.0).as_text()
  # One direction sends device 0's block to device 1 only; both directions also to device 7.
  assert "[0, 7]" not in hlo(False).replace(" ", "").replace("[0,7]", "[0, 7]")
  assert "[0, 7]" in hlo(True).replace(" ", "").replace("[0,7]", "[0, 7]")
