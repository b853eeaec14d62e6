"""The one label normalizer: class labels in any of the forms Keras accepts, read the same way everywhere.

Sparse labels `(N,)` or `(N, 1)` of integers, and one-hot or soft labels `(N, C)`, are accepted. Penalties
(tensors, inside a traced step) use `sparse_or_dense`; analysis and evaluation (NumPy) use `class_indices`.
"""

import numpy as np
from keras import ops

__all__ = ["class_indices", "sparse_or_dense"]


def _is_dense(shape_rank, last_dim, num_classes):
    return shape_rank == 2 and last_dim == num_classes and num_classes is not None and num_classes > 1


def sparse_or_dense(y, num_classes, argument="y"):
    """Tensor labels as `(sparse, dense)`: exactly one is not None.

    Args:
        y: labels `(B,)`, `(B, 1)` (integer classes) or `(B, C)` (one-hot or soft).
        num_classes: `C`, a Python int.
        argument: how the caller names `y` in errors.

    Returns:
        `(int32 (B,), None)` for sparse labels, `(None, float32 (B, C))` for dense ones.
    """
    if y is None:
        raise ValueError(f"{argument}: labels are needed here, got None (was fit() called without targets?).")
    y = ops.convert_to_tensor(y)
    try:
        rank = len(y.shape)
    except (TypeError, ValueError):  # A symbolic tensor of unknown rank (TensorFlow).
        rank = None
    if _is_dense(rank, y.shape[-1] if rank else None, num_classes):
        return None, ops.cast(y, "float32")
    return ops.cast(ops.reshape(y, [-1]), "int32"), None


def class_indices(y, num_classes=None, argument="labels"):
    """NumPy labels as integer class indices `(N,)` (one-hot or soft `(N, C)` labels give their argmax).

    Raises a clear error for non-integer sparse labels and, when `num_classes` is given, for classes outside
    `[0, num_classes)`.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[-1] > 1 and (num_classes is None or y.shape[-1] == num_classes):
        return np.argmax(y, axis=-1).astype(np.int64)
    flat = y.reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        if not np.all(np.isfinite(flat)) or not np.all(flat == np.round(flat)):
            raise ValueError(f"{argument} must be integer class indices or one-hot rows, got values like {flat[:3]!r}.")
    flat = flat.astype(np.int64)
    if num_classes is not None and flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(
            f"{argument} must be class indices in [0, {num_classes}), got values in [{flat.min()}, {flat.max()}]."
        )
    return flat
