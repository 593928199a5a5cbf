"""Mesh construction and the logical-axis sharding table."""
import pytest
from jax.sharding import PartitionSpec as P

from mrjax.mesh import logical_to_spec, make_mesh


def test_mesh_sizes_fill_with_minus_one():
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=3, fsdp=1, tensor=1), "3 but 8 devices"),
        (dict(data=-1, fsdp=-1, tensor=1), "at most one axis"),
        (dict(data=-1, fsdp=3, tensor=1), "do not divide"),
        (dict(data=0, fsdp=8, tensor=1), "positive or -1"),
    ],
)
def test_bad_mesh_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_table_maps_parameters_and_activations():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P("fsdp", "tensor", None)
    # activations: batch takes data and fsdp, so a later fsdp-mapped axis is left unsharded
    assert logical_to_spec(("batch", "seq", "embed"), (8, 5, 64), mesh) == P(("data", "fsdp"), None, None)
    # a dim the mesh axes do not divide stays replicated
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 9, 16), mesh) == P("fsdp", None, None)
    # size-1 mesh axes are dropped
    assert logical_to_spec(("vocab", "embed"), (256, 64), make_mesh(8, 1, 1)) == P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("nonsense",))
