"""keras_wssi.xla: the measured XLA rule (docs/benchmarks.md, "When to use XLA on CPU") applied to models."""

import os

import keras
import pytest

import keras_wssi as kw
from keras_wssi import xla

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = keras.layers


def _tiny(layer, input_shape):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, L.Dense(3)(L.Flatten()(layer(inputs))))


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (lambda: L.Conv1D(2, 3), (8, 2)),
        (lambda: L.Conv2D(2, 3), (8, 8, 1)),
        (lambda: L.Conv3D(2, 3), (4, 4, 4, 1)),
        (lambda: L.Conv1DTranspose(2, 3), (8, 2)),
        (lambda: L.Conv2DTranspose(2, 3), (8, 8, 1)),
        (lambda: L.DepthwiseConv2D(3), (8, 8, 2)),
        (lambda: L.SeparableConv2D(2, 3), (8, 8, 2)),
        (lambda: L.SeparableConv1D(2, 3), (8, 2)),
    ],
    ids=lambda value: getattr(value, "__name__", None) if not isinstance(value, tuple) else str(value),
)
def test_every_convolution_type_is_detected(layer, input_shape):
    model = _tiny(layer(), input_shape)
    assert xla.has_convolutions(model)
    assert xla.recommended_jit_compile(model, accelerator=False, backend="tensorflow") is False
    assert xla.recommended_jit_compile(model, accelerator=True, backend="tensorflow") is True


def test_dense_only_models_get_xla_on_cpu_and_on_accelerators():
    for model in (kw.architectures.mlp(hidden_units=(8,)), keras.Sequential([keras.Input((4,)), L.Dense(3)])):
        assert not xla.has_convolutions(model)
        assert xla.recommended_jit_compile(model, accelerator=False, backend="tensorflow") is True
        assert xla.recommended_jit_compile(model, accelerator=True, backend="tensorflow") is True


def test_convolutions_are_found_inside_wrappers_nested_models_and_custom_layers():
    class Block(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = L.Conv2D(2, 3, padding="same")

        def call(self, x):
            return self.conv(x)

    class Subclassed(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.block = Block()
            self.head = L.Dense(3)

        def call(self, x):
            return self.head(keras.ops.mean(self.block(x), axis=(1, 2)))

    subclassed = Subclassed()
    subclassed(keras.ops.zeros((1, 8, 8, 1)))
    inner = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3)], name="inner")
    inputs = keras.Input((8, 8, 1))
    nested = keras.Model(inputs, L.Dense(3)(L.Flatten()(inner(inputs))))
    for model in (kw.wrap(subclassed), subclassed, nested, kw.wrap(nested), kw.architectures.small_resnet()):
        assert xla.has_convolutions(model), model.name
        assert xla.recommended_jit_compile(model, accelerator=False, backend="tensorflow") is False


def test_resolve_keeps_forced_settings_and_applies_the_rule_for_auto():
    cnn, mlp = kw.architectures.small_cnn(), kw.architectures.mlp(hidden_units=(8,))
    # Users can always force it, whatever the rule says.
    assert xla.resolve_jit_compile(True, cnn, accelerator=False) is True
    assert xla.resolve_jit_compile("false", mlp, accelerator=False) is False
    assert xla.resolve_jit_compile(" TRUE ", cnn, accelerator=False) is True
    assert xla.resolve_jit_compile("auto", cnn, accelerator=False, backend="tensorflow") is False
    assert xla.resolve_jit_compile("auto", cnn, accelerator=True) is True
    assert xla.resolve_jit_compile("Auto", mlp, accelerator=False) is True
    # Without `accelerator`, the machine is asked; without `backend`, the active backend's rule applies.
    assert xla.resolve_jit_compile("auto", cnn, backend="tensorflow") is xla.has_accelerator()
    assert xla.resolve_jit_compile("auto", cnn) is (keras.backend.backend() == "jax" or xla.has_accelerator())
    # On JAX every model gets XLA: without it Keras runs the JAX step op by op (keras_wssi/xla.py).
    for model in (cnn, mlp):
        assert xla.recommended_jit_compile(model, accelerator=False, backend="jax") is True
        assert xla.resolve_jit_compile("auto", model, accelerator=False, backend="jax") is True


def test_bad_arguments_are_named():
    mlp = kw.architectures.mlp(hidden_units=(8,))
    with pytest.raises(ValueError, match="jit_compile must be True, False or 'auto'"):
        xla.resolve_jit_compile("yes", mlp)
    with pytest.raises(ValueError, match="jit_compile"):
        xla.resolve_jit_compile(None, mlp)
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        xla.recommended_jit_compile("mlp")
    with pytest.raises(TypeError, match="accelerator must be True, False or None"):
        xla.recommended_jit_compile(mlp, accelerator="gpu")


def test_the_rule_is_stated_identically_in_the_docs():
    assert xla.RULE.startswith("auto: XLA on for models without convolutional layers")
    for path in ("README.md", os.path.join("docs", "benchmarks.md")):
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
            assert xla.RULE in " ".join(handle.read().split()), f"{path} must state the rule: {xla.RULE}"


def test_train_script_rule_agrees_with_the_library_for_every_built_in_architecture():
    """examples/train.py decides `--jit_compile=auto` before it builds the model, from the architecture's name; it
    must give what `recommended_jit_compile` gives for the built model."""
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train.py")
    source = open(path, encoding="utf-8").read()
    names = ast.literal_eval(source.split("CONVOLUTIONAL_MODELS = ", 1)[1].split("\n", 1)[0])
    for name in kw.architectures.ARCHITECTURES:
        model = kw.architectures.build(name)
        assert xla.recommended_jit_compile(model, accelerator=False, backend="tensorflow") == (name not in names), name
