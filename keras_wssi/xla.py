"""When to compile the train step with XLA: the measured rule behind `jit_compile="auto"`.

On this project's 2-core CPU machine, XLA makes the small CNN's steps 1.4-6.7x slower in every measurement; for
the dense-only MLP the two settings are within ~20% (XLA 0.8x on the idle machine before the penalty-state
refactor, 0.9-1.2x after it). `benchmarks/step_overhead.py --xla_ratio` measures both, quoted in
`docs/benchmarks.md` ("When to use XLA on CPU").
The rule, stated identically in the README, the docs and `examples/train.py`:

    auto: XLA on for models without convolutional layers, or when a GPU/TPU is present; off for convolutional models on CPU

Users can always force it: `compile(jit_compile=True)` or `False`.

The rule was measured on TensorFlow. On JAX the setting matters less: `jit_compile=False` does not avoid XLA
there (Keras then runs the step op by op, each op compiled by XLA), and both settings gave the same step time
for the small CNN on this CPU (about 0.3 s, against 0.07 s for TensorFlow without XLA); `examples/train.py`
compiles every JAX step.
"""

import keras

from keras_wssi import backend

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
    return bool(backend.accelerators())


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


def recommended_jit_compile(model, accelerator=None):
    """Whether to compile `model`'s train step with XLA, by the measured rule (see `RULE`).

    XLA on for models without convolutional layers, or when a GPU/TPU is present; off for convolutional models
    on CPU, where XLA made the small CNN's steps 1.4-6.7x slower (docs/benchmarks.md).

    Args:
        model: a `keras.Model`.
        accelerator: whether a GPU/TPU is present; None asks the backend (`has_accelerator`).

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
    convolutional = has_convolutions(model)
    if accelerator is None:
        accelerator = has_accelerator()
    return accelerator or not convolutional


def resolve_jit_compile(value, model, accelerator=None):
    """Turns a `jit_compile` setting (`True`, `False`, `"auto"`, or the strings `"true"`/`"false"`) into a bool.

    `"auto"` applies `recommended_jit_compile`; an explicit value is kept, so users can always force XLA on or off.

    Args:
        value: the setting, e.g. a command-line flag's value.
        model: the `keras.Model` to be compiled.
        accelerator: as in `recommended_jit_compile`.

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
            return recommended_jit_compile(model, accelerator=accelerator)
        return value == "true"
    raise ValueError(f"jit_compile must be True, False or 'auto' (or 'true'/'false'), got {value!r}.")
