"""When to compile the train step with XLA: the measured rule behind `jit_compile="auto"`.

On this project's 2-core CPU machine, XLA makes the small CNN's steps 1.4-6.7x slower in every measurement; for
the dense-only MLP the two settings are within ~20% (XLA 0.8x on the idle machine before the penalty-state
refactor, 0.9-1.2x after it). `benchmarks/step_overhead.py --xla_ratio` measures both, quoted in
`docs/benchmarks.md` ("When to use XLA on CPU").
The rule, stated identically in the README, the docs and `examples/train.py`:

    auto: XLA on for models without convolutional layers, or when a GPU/TPU is present; off for convolutional models on CPU

Users can always force it: `compile(jit_compile=True)` or `False`.

The rule was measured on TensorFlow, whose alternative to XLA is a graph of its own kernels. On JAX there is no
such alternative: `jit_compile=False` makes Keras run the step op by op (each op still an XLA program), which
was never faster here — the same for a plain small CNN (about 0.3 s per step of 128 both ways) and 6x slower for
a CNN with the input-gradient penalty (179 vs 28 ms per step of 32). So on the JAX backend the recommendation is
XLA on for every model, as `examples/train.py --jit_compile=auto` does.
"""

import keras

from keras_wssi import backend as keras_backend

__all__ = ["RULE", "has_accelerator", "has_convolutions", "recommended_jit_compile", "resolve_jit_compile"]

RULE = (
    "auto: XLA on for models without convolutional layers, or when a GPU/TPU is present; "
    "off for convolutional models on CPU"
)

_L = keras.layers
_CONVOLUTION_TYPES = tuple(
    layer_type
    for layer_type in (
        getattr(_L, name, None)
        for name in (
            "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
            "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
        )
    )
    if layer_type is not None
)


def has_accelerator():
    """True when the Keras backend sees a GPU or a TPU on this machine (`keras_wssi.backend.accelerators()`:
    TensorFlow's physical devices, which it lists without allocating device memory, or JAX's devices).

    Example:

    ```python
    keras_wssi.xla.has_accelerator()   # False on a CPU-only machine
    ```
    """
    return bool(keras_backend.accelerators())


def has_convolutions(model):
    """True when `model` (nested models and `keras_wssi.wrap` wrappers included) has a convolutional layer.

    Convolutional layers are Conv1D/2D/3D, their transposes, depthwise and separable convolutions.

    Args:
        model: a `keras.Model` (functional, Sequential or subclassed; a subclassed model's layers are the ones
            it tracks as attributes).

    Example:

    ```python
    keras_wssi.xla.has_convolutions(keras_wssi.architectures.small_cnn())   # True
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    return any(isinstance(layer, _CONVOLUTION_TYPES) for layer in model._flatten_layers(include_self=False))


def recommended_jit_compile(model, accelerator=None, backend=None):
    """Whether to compile `model`'s train step with XLA, by the measured rule (see `RULE`).

    On TensorFlow: XLA on for models without convolutional layers, or when a GPU/TPU is present; off for
    convolutional models on CPU, where XLA made the small CNN's steps 1.4-6.7x slower (docs/benchmarks.md). On
    JAX: always on (without XLA compilation of the whole step, JAX runs it op by op; see the module docstring).

    Args:
        model: a `keras.Model`.
        accelerator: whether a GPU/TPU is present; None asks the backend (`has_accelerator`).
        backend: `"tensorflow"` or `"jax"`: the backend whose rule applies; None is the active Keras backend.

    Returns:
        A bool for `compile(jit_compile=...)`.

    Example:

    ```python
    model = keras_wssi.wrap(my_model)
    model.compile("adam", loss, regularizers=["weissi:1e-3"], jit_compile=recommended_jit_compile(model))
    ```
    """
    if accelerator is not None and not isinstance(accelerator, bool):
        raise TypeError(f"accelerator must be True, False or None (detect), got {accelerator!r}.")
    backend_name = keras_backend.BACKEND if backend is None else backend
    if backend_name not in ("tensorflow", "jax"):
        raise ValueError(f"backend must be 'tensorflow', 'jax' or None (the active one), got {backend!r}.")
    convolutional = has_convolutions(model)
    if backend_name == "jax":
        return True
    if accelerator is None:
        accelerator = has_accelerator()
    return accelerator or not convolutional


def resolve_jit_compile(value, model, accelerator=None, backend=None):
    """Turns a `jit_compile` setting (`True`, `False`, `"auto"`, or the strings `"true"`/`"false"`) into a bool.

    `"auto"` applies `recommended_jit_compile`; an explicit value is kept, so users can always force XLA on or off.

    Args:
        value: the setting, e.g. a command-line flag's value.
        model: the `keras.Model` to be compiled.
        accelerator, backend: as in `recommended_jit_compile`.

    Example:

    ```python
    jit_compile = resolve_jit_compile(FLAGS.jit_compile, model)   # --jit_compile=auto|true|false
    ```
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
        value = value.strip().lower()
        if value == "auto":
            return recommended_jit_compile(model, accelerator=accelerator, backend=backend)
        return value == "true"
    raise ValueError(f"jit_compile must be True, False or 'auto' (or 'true'/'false'), got {value!r}.")
