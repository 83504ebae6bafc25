"""Pytree <-> [batch, features] matrices, so that solvers are written once for flat vectors.

Without a batch axis the whole pytree is one row (batch 1): residuals, mixing coefficients and
stopping are then shared by everything in it. With a declared batch axis every example is a row of
its own, so one slow example never changes the others' iterates.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def flat_dtype(tree: PyTree) -> jnp.dtype:
    """The dtype the solvers work in: the widest floating dtype of the leaves, at least float32
    (bf16 states are solved in float32). Chosen by hand rather than by jnp.result_type, which
    refuses float32 next to float64 under jax_numpy_dtype_promotion='strict'."""
    dtypes = [jnp.asarray(leaf).dtype for leaf in jax.tree.leaves(tree)]
    complex_ = [d for d in dtypes if jnp.issubdtype(d, jnp.complexfloating)]
    if complex_:
        # The residual norms, Anderson's Gram matrix and GMRES's inner products are written
        # for real vectors (no conjugation): a complex state would "converge" to wrong answers.
        raise ValueError(f"fixed_point_layer: complex states are not supported (a leaf of z0 "
                         f"has dtype {complex_[0]}); solve for the real and imaginary parts as "
                         f"two real leaves.")
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return max([jnp.dtype(jnp.float32), *floats], key=lambda d: d.itemsize)


def _at_least_float32(dtype: Any) -> jnp.dtype:
    """float64 stays, anything narrower is float32 (no promotion rule: strict mode allows none)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > 4 else (
        jnp.dtype(jnp.float32))


def make_flattener(
    example: PyTree, batch_axis: int | None
) -> tuple[Callable[[PyTree], jax.Array], Callable[[jax.Array], PyTree], int]:
    """Returns (flatten, unflatten, batch_size) for pytrees shaped like `example`.

    flatten: pytree -> [batch, features] in `flat_dtype(example)`;
    unflatten: [batch, features] -> pytree with the original shapes and dtypes.
    """
    leaves, treedef = jax.tree.flatten(example)
    if not leaves:
        raise ValueError("fixed_point_layer: the state z0 is an empty pytree.")
    shapes = [jnp.shape(leaf) for leaf in leaves]
    dtypes = [jnp.asarray(leaf).dtype for leaf in leaves]
    dtype = flat_dtype(example)
    if batch_axis is None:
        batch = 1
    else:
        sizes = set()
        for shape in shapes:
            if len(shape) == 0 or not -len(shape) <= batch_axis < len(shape):
                raise ValueError(
                    f"fixed_point_layer: batch_axis={batch_axis} is out of range for a state leaf "
                    f"of shape {shape}; every leaf of z0 must carry the batch axis.")
            sizes.add(shape[batch_axis])
        if len(sizes) != 1:
            raise ValueError(
                f"fixed_point_layer: state leaves disagree on the batch size along "
                f"batch_axis={batch_axis}: sizes {sorted(sizes)}.")
        batch = sizes.pop()
    # Per-leaf shapes with the batch axis moved to the front.
    moved = [shape if batch_axis is None else
             (shape[batch_axis],) + tuple(np.delete(np.array(shape, dtype=int), batch_axis % len(shape)))
             for shape in shapes]
    sizes = [int(np.prod(shape[1:])) if batch_axis is not None else int(np.prod(shape))
             for shape in moved]
    splits = np.cumsum(sizes)[:-1].tolist()

    def flatten(tree: PyTree) -> jax.Array:
        parts = jax.tree.leaves(tree)
        rows = []
        for leaf in parts:
            leaf = jnp.asarray(leaf).astype(dtype)
            if batch_axis is None:
                rows.append(leaf.reshape(1, -1))
            else:
                rows.append(jnp.moveaxis(leaf, batch_axis, 0).reshape(batch, -1))
        return jnp.concatenate(rows, axis=1)  # [batch, features]

    def unflatten(flat: jax.Array) -> PyTree:
        pieces = jnp.split(flat, splits, axis=1) if splits else [flat]
        out = []
        for piece, shape, moved_shape, dt in zip(pieces, shapes, moved, dtypes):
            if batch_axis is None:
                out.append(piece.reshape(shape).astype(dt))
            else:
                leaf = piece.reshape(moved_shape)
                out.append(jnp.moveaxis(leaf, 0, batch_axis).astype(dt))
        return jax.tree.unflatten(treedef, out)

    return flatten, unflatten, batch


def select_rows(mask: jax.Array, on_true: jax.Array, on_false: jax.Array) -> jax.Array:
    """jnp.where with a per-row [batch] mask broadcast over the trailing axes."""
    mask = mask.reshape(mask.shape + (1,) * (on_true.ndim - mask.ndim))
    return jnp.where(mask, on_true, on_false)


NORMS = ("two", "max", "rms")


def row_norm(x: jax.Array, norm: str = "two") -> jax.Array:
    """Norm of each row, in float32 or wider. [batch, features] -> [batch].

    "two": Euclidean; "max": largest absolute entry; "rms": Euclidean / sqrt(features), the
    root mean square (optimistix's two_norm, max_norm and rms_norm).
    """
    x = x.astype(_at_least_float32(x.dtype))
    if norm == "max":
        return jnp.max(jnp.abs(x), axis=1)
    two = jnp.sqrt(jnp.sum(x * x, axis=1))
    if norm == "rms":
        return two / jnp.sqrt(jnp.asarray(max(x.shape[1], 1), two.dtype))
    if norm != "two":
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    return two
