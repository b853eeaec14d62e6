"""Where the benchmarks read MNIST from: the flag, else $KERAS_WSSI_DATA_DIR, else ../shared/data beside the
repository (the project's offline copy), else None (tensorflow-datasets downloads it)."""

import os

import keras_wssi as kw


def resolve_data_dir(flag_value):
    data_dir = flag_value or kw.data.default_data_dir()
    if data_dir is None:
        candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
        data_dir = candidate if os.path.isdir(candidate) else None
    return data_dir
