"""Reference architectures used by the training script, the benchmarks and the tests.

All of them end in a linear layer that outputs logits (penalties and attacks are defined on logits) and
use only positively homogeneous activations, so the WEISSI scale shift applies to them.
"""

import keras

from keras_wssi.models import Model

__all__ = ["ARCHITECTURES", "build", "mlp", "small_cnn", "small_resnet"]


def mlp(input_shape=(28, 28, 1), num_classes=10, hidden_units=(1024, 1024), name="mlp"):
    """A ReLU multilayer perceptron `input → hidden… → logits`."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Flatten()(inputs)
    for index, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{index}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return Model(inputs, outputs, name=name)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, filters=(32, 64), dense_units=128, name="small_cnn"):
    """Conv(3×3)-ReLU-MaxPool blocks, then a ReLU dense layer and the logits."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for index, channels in enumerate(filters):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"conv_{index}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool_{index}")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return Model(inputs, outputs, name=name)


def small_resnet(input_shape=(28, 28, 1), num_classes=10, channels=32, num_blocks=2, name="small_resnet"):
    """A stem convolution, `num_blocks` identity residual blocks `h + conv(relu(conv(h)))`, pooling, logits.

    The blocks are pre-activation style without normalization, so the network stays positively
    homogeneous and the residual WEISSI form and bound apply to it.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.MaxPooling2D(2, name="stem_pool")(x)
    for index in range(num_blocks):
        branch = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"block{index}_conv_a")(x)
        branch = keras.layers.Conv2D(channels, 3, padding="same", name=f"block{index}_conv_b")(branch)
        x = keras.layers.Add(name=f"block{index}_add")([x, branch])
        x = keras.layers.ReLU(name=f"block{index}_relu")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return Model(inputs, outputs, name=name)


ARCHITECTURES = {"mlp": mlp, "cnn": small_cnn, "resnet": small_resnet}


def build(name, input_shape=(28, 28, 1), num_classes=10, **kwargs):
    """Builds a reference architecture by name (`"mlp"`, `"cnn"` or `"resnet"`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}: expected one of {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name](input_shape=input_shape, num_classes=num_classes, **kwargs)
