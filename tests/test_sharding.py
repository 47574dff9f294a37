"""Mesh construction, logical -> mesh axis rules, and sharded model loading/forward on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fusejax.models import load_pretrained, model_shardings
from fusejax.sharding import ShardingError, logical_to_spec, make_mesh, merge_rules, resolve_mesh_shape


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("args,shape", [
    ((2, -1, 2), {"data": 2, "fsdp": 2, "tensor": 2}),
    ((-1, 1, 1), {"data": 8, "fsdp": 1, "tensor": 1}),
    ((1, -1, 4), {"data": 1, "fsdp": 2, "tensor": 4}),
    ((1, 8, 1), {"data": 1, "fsdp": 8, "tensor": 1}),
])
def test_make_mesh_fills_minus_one(args, shape):
    mesh = make_mesh(*args)
    assert dict(mesh.shape) == shape
    assert mesh.axis_names == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("args,match", [
    ((-1, -1, 1), r"are all -1"),
    ((3, -1, 1), r"multiply to 3, which does not divide the 8 devices"),
    ((2, 2, 1), r"needs 4 devices but 8 are available"),
    ((0, -1, 1), r"mesh\.data=0"),
])
def test_make_mesh_errors(args, match):
    with pytest.raises(ShardingError, match=match):
        make_mesh(*args)


def test_resolve_mesh_shape_without_devices():
    assert resolve_mesh_shape(data=2, fsdp=-1, tensor=4, n_devices=64) == {"data": 2, "fsdp": 8, "tensor": 4}


def test_logical_to_spec_rules():
    mesh = make_mesh(2, 2, 2)
    # batch takes data and fsdp; a later "embed" (fsdp) cannot reuse fsdp and stays replicated
    assert logical_to_spec(("batch", "length", "embed"), mesh=mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("layers", "embed", "mlp"), mesh=mesh) == P(None, "fsdp", "tensor")
    # axes of size 1 are dropped from the spec
    assert logical_to_spec(("embed", "vocab"), mesh=make_mesh(1, 8, 1)) == P("fsdp", None)
    assert logical_to_spec(("embed", "mlp"), rules=merge_rules({"mlp": None}), mesh=mesh) == P("fsdp", None)


def test_logical_to_spec_divisibility_error():
    mesh = make_mesh(1, 4, 2)
    with pytest.raises(ShardingError, match=r"layers\.wq: dimension 1 \('embed', size 6\) does not divide mesh axes "
                                            r"\('fsdp',\) of total size 4"):
        logical_to_spec(("layers", "embed", "heads"), mesh=mesh, shape=(2, 6, 4), name="layers.wq")


def test_logical_to_spec_unknown_name_and_bad_rule():
    with pytest.raises(ShardingError, match=r"unknown logical axis 'hidden'"):
        logical_to_spec(("hidden",))
    with pytest.raises(ShardingError, match=r"'model' is not a mesh axis"):
        merge_rules({"mlp": "model"})


LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)

# expected PartitionSpec of every parameter on a 2x2x2 mesh under the default rules, written out by hand
EXPECTED_SPECS = {
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm_scale": P(None),
    "layers.attn_norm_scale": P(None, None),
    "layers.mlp_norm_scale": P(None, None),
    "layers.wq": P(None, "fsdp", "tensor", None),
    "layers.wk": P(None, "fsdp", "tensor", None),
    "layers.wv": P(None, "fsdp", "tensor", None),
    "layers.wo": P(None, "tensor", None, "fsdp"),
    "layers.w_gate": P(None, "fsdp", "tensor"),
    "layers.w_up": P(None, "fsdp", "tensor"),
    "layers.w_down": P(None, "tensor", "fsdp"),
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder


def _flat(tree):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(tree)}


def test_parameters_land_with_rule_specs(llama_folder):
    mesh = make_mesh(2, 2, 2)
    model = load_pretrained(llama_folder, mesh=mesh)
    params = _flat(nnx.state(model))
    assert set(params) == set(EXPECTED_SPECS)
    for name, value in params.items():
        assert value.sharding.mesh == mesh, name
        assert value.sharding.spec == EXPECTED_SPECS[name], (name, value.sharding.spec)
    # model_shardings gives the same NamedShardings (the trainer reuses it)
    for name, sharding in _flat(model_shardings(model, mesh)).items():
        assert sharding == NamedSharding(mesh, EXPECTED_SPECS[name]), name


def test_rules_override_changes_placement(llama_folder):
    mesh = make_mesh(2, 2, 2)
    model = load_pretrained(llama_folder, mesh=mesh, rules={"mlp": None, "vocab": None})
    assert model.layers.w_up.get_value().sharding.spec == P(None, "fsdp", None)
    assert model.embed.get_value().sharding.spec == P(None, "fsdp")


def test_activations_follow_the_model_rules_not_ambient_state(llama_folder):
    """The rules a model was loaded with lay out its activations too (here the logits), whoever calls it."""
    mesh = make_mesh(2, 2, 2)
    ids = jnp.zeros((4, 8), jnp.int32)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    forward = nnx.jit(lambda model, ids: model(ids))
    specs = {}
    for name, rules in (("default", None), ("vocab replicated", {"vocab": None})):
        model = load_pretrained(llama_folder, mesh=mesh, rules=rules)
        with jax.set_mesh(mesh):
            spec = tuple(forward(model, jax.device_put(ids, batch)).sharding.spec)
            specs[name] = spec + (None,) * (3 - len(spec))  # trailing None entries may be dropped
    assert specs["default"] == (("data", "fsdp"), None, "tensor")
    assert specs["vocab replicated"] == (("data", "fsdp"), None, None)


def test_indivisible_parameter_is_an_error(llama_folder):
    with pytest.raises(ShardingError, match=r"layers\.wk: dimension 2 \('kv_heads', size 2\) does not divide"):
        load_pretrained(llama_folder, mesh=make_mesh(1, 2, 4))


def test_sharded_forward_equals_unsharded(llama_folder):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 300, (4, 8)), jnp.int32)
    mask = jnp.asarray((np.arange(8)[None] < np.array([8, 5, 3, 8])[:, None]).astype(np.int32))

    @nnx.jit
    def forward(model, ids, mask):
        return model(ids, mask)

    ref = forward(load_pretrained(llama_folder), ids, mask)
    assert len(ref.sharding.device_set) == 1
    mesh = make_mesh(2, 2, 2)
    model = load_pretrained(llama_folder, mesh=mesh)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = forward(model, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(out)[..., :300], np.asarray(ref)[..., :300], atol=1e-5, rtol=1e-5)
    assert np.isneginf(np.asarray(out)[..., 300:]).all()
