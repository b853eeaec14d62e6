"""How analysis compiles its batch functions and in which dtype it reports, on every Keras backend.

- `compiled(fn, variables)`: `fn` through `keras_wssi.backend.function`, reading the current values of
  `variables` on every call. On TensorFlow a plain `tf.function` as analysis always used (no XLA: any layer, float64
  graphs); on JAX a `jax.jit` (op-by-op JAX would be slow).
- `precise_dtype()`: the dtype of the results analysis reports "to float64 accuracy": float64 where the backend
  computes in it (TensorFlow; JAX with `jax_enable_x64`), else float32 (JAX by default: every float64 request
  would silently become float32 there, so analysis asks for float32 and documents it).
"""

from keras_wssi import backend

__all__ = ["compiled", "precise_dtype"]


def compiled(fn, variables):
    """`fn` compiled for analysis, reading the current values of `variables` (e.g. `model.variables`) per call."""
    return backend.function(fn, variables=variables, jit_compile=backend.BACKEND == "jax")


def precise_dtype():
    """`"float64"` where the backend computes in float64, else `"float32"` (JAX without `jax_enable_x64`)."""
    return "float64" if backend.supports_float64() else "float32"


def unique_variables(*groups):
    """The variables of `groups` (lists), each once, in order."""
    seen, result = set(), []
    for group in groups:
        for variable in group:
            if id(variable) not in seen:
                seen.add(id(variable))
                result.append(variable)
    return result
