"""What the benchmarks share: where they read MNIST from (the flag, else $KERAS_WSSI_DATA_DIR, else ../shared/data
beside the repository, the project's offline copy, else None: tensorflow-datasets downloads it), and the model an
attack benchmark attacks."""

import os

import keras

import keras_wssi as kw


def resolve_data_dir(flag_value):
    data_dir = flag_value or kw.data.default_data_dir()
    if data_dir is None:
        candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
        data_dir = candidate if os.path.isdir(candidate) else None
    return data_dir


def model_to_attack(model_path, architecture, hidden_units, data_dir):
    """`(model, description)`: the `.keras` file at `model_path`, else `architecture` trained for 1 epoch on the first
    10,000 MNIST training images (seed 0)."""
    if model_path:
        return kw.evaluation.load_model(model_path)[0], model_path
    keras.utils.set_random_seed(0)
    kwargs = {"hidden_units": tuple(int(h) for h in hidden_units)} if architecture == "mlp" else {}
    model = kw.architectures.build(architecture, **kwargs)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x_train, y_train = kw.data.load_arrays("mnist", "train", data_dir)
    model.fit(x_train[:10000], y_train[:10000], epochs=1, batch_size=128, verbose=0)
    description = f"{architecture} {hidden_units if architecture == 'mlp' else ''}".strip()
    return model, f"{description} (1 epoch on 10k MNIST training images)"
