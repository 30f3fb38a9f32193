"""Mesh shapes from the config's `mesh` field, and the errors for ones that cannot be built."""

import pytest

from infllava_jax import sharding


@pytest.mark.parametrize("spec, shape", [
    ("fsdp=4,tensor=2", {"data": 1, "fsdp": 4, "tensor": 2}),
    ("data=2,fsdp=-1", {"data": 2, "fsdp": 4, "tensor": 1}),
    ({"tensor": 8}, {"data": 1, "fsdp": 1, "tensor": 8}),
])
def test_parse_mesh(spec, shape):
  assert sharding.parse_mesh(spec, 8) == shape


@pytest.mark.parametrize("spec, words", [
    ("fsdp:8", "or 'axis=size,...' with axes ('data', 'fsdp', 'tensor')"),
    ("fsdp=eight", "axis sizes must be integers"),
    ("fsdp=0,tensor=-1", "axis sizes must be >= 1 (or one -1), got {'fsdp': 0}"),
    ("tensor=3,fsdp=-1", "the other axes take 3 devices, which does not divide the 8 available"),
    ("fsdp=-1,tensor=-1", "at most one axis may be -1"),
    ("pipeline=8", "mesh axes ['pipeline'] unknown"),
    ("fsdp=4", "needs 4 devices; 8 are available"),
])
def test_parse_mesh_errors_say_what_is_wrong(spec, words):
  with pytest.raises(ValueError) as error:
    sharding.parse_mesh(spec, 8)
  assert words in str(error.value)
