"""Logical axes -> device mesh: the one place that decides how arrays are laid out.

Model code names the axes of every parameter and activation with *logical* names (``embed``, ``mlp``,
``heads``, ``kv_heads``, ``vocab``, ``batch``, ``length``, ...). One rules table,
:data:`fusejax.config.DEFAULT_RULES` (the defaults of the ``mesh`` section, overridden key by key by
``mesh.rules``), maps each logical name onto zero, one or several axes of a mesh whose axes are ``data``,
``fsdp`` and ``tensor``; this module turns it into shardings. A model keeps its rules (``Transformer.rules``)
and lays out its parameters and (inside ``jax.set_mesh``) its activations with them: the same rules for both.

Dimensions that do not divide the mesh axes they are mapped to raise :class:`ShardingError` naming the
array, the dimension and the sizes; nothing is silently replicated. To replicate a dimension on purpose,
map its logical name to ``null`` (``None``) in the rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fusejax.config import DEFAULT_RULES, MESH_AXES, MeshAxes


class ShardingError(ValueError):
    """A logical layout that cannot be placed on the mesh (unknown name, indivisible dimension, ...)."""


def merge_rules(overrides: Mapping[str, MeshAxes] | None = None) -> dict[str, MeshAxes]:
    """The default rules with ``overrides`` applied key by key; mesh axis names are checked."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in _as_tuple(axes):
            if axis not in MESH_AXES:
                raise ShardingError(
                    f"sharding rule {name!r} -> {axes!r}: {axis!r} is not a mesh axis (expected one of {MESH_AXES})"
                )
        rules[name] = axes
    return rules


def frozen_rules(overrides: Mapping[str, MeshAxes] | None = None) -> tuple[tuple[str, MeshAxes], ...]:
    """:func:`merge_rules` as a sorted tuple of ``(logical name, mesh axes)`` pairs: hashable, so that a model
    can keep its rules as static data; ``dict(...)`` gives the mapping back."""
    return tuple(sorted(merge_rules(overrides).items()))


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def resolve_mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, n_devices: int | None = None) -> dict[str, int]:
    """Mesh axis sizes with at most one ``-1`` filled so that their product is ``n_devices``."""
    n_devices = jax.device_count() if n_devices is None else n_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ShardingError(f"mesh.{k}={v!r}: mesh axis sizes must be positive integers or -1")
    if len(fill) > 1:
        raise ShardingError(f"mesh axes {fill} are all -1: at most one axis can fill the remaining devices")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n_devices % known:
            raise ShardingError(
                f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide the {n_devices} devices"
            )
        sizes[fill[0]] = n_devices // known
    elif known != n_devices:
        raise ShardingError(f"mesh {sizes} needs {known} devices but {n_devices} are available")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all), with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    axes: Sequence[str | None],
    *,
    rules: Mapping[str, MeshAxes] | None = None,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
    name: str = "array",
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have logical names ``axes``.

    With ``mesh`` and ``shape`` given, every sharded dimension must divide by the product of its mesh axis
    sizes (else :class:`ShardingError` naming ``name``). A mesh axis already used by an earlier dimension is
    not reused (the later dimension stays replicated along it), as GSPMD requires.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if shape is not None and len(shape) != len(axes):
        raise ShardingError(f"{name}: {len(axes)} logical axes {tuple(axes)} for an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(axes):
        if logical is None:
            spec.append(None)
            continue
        if logical not in rules:
            raise ShardingError(f"{name}: unknown logical axis {logical!r}; known: {sorted(rules)}")
        mesh_axes = tuple(a for a in _as_tuple(rules[logical]) if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        used.update(mesh_axes)
        if mesh is not None and shape is not None and mesh_axes:
            parts = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % parts:
                raise ShardingError(
                    f"{name}: dimension {dim} ({logical!r}, size {shape[dim]}) does not divide mesh axes "
                    f"{mesh_axes} of total size {parts}; change the mesh or map {logical!r} to null in mesh.rules"
                )
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None, *, name: str = "array", rules=None
) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` for logical ``axes`` (see :func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(axes, rules=rules, mesh=mesh, shape=shape, name=name))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, MeshAxes]) -> jax.Array:
    """Constrain an activation's layout by logical names under ``rules`` (the model's, the same that place its
    parameters); a no-op outside a mesh context (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, rules=rules, mesh=None)
    spec = PartitionSpec(*(_drop_trivial(s, mesh) for s in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _drop_trivial(entry, mesh):
    axes = tuple(a for a in _as_tuple(entry) if mesh.shape[a] > 1)
    return axes[0] if len(axes) == 1 else (axes or None)
