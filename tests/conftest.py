"""Shared fixtures: the offline data folder (../shared/data beside the repository) and quiet TensorFlow."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data_dir():
    """`$KERAS_WSSI_TEST_DATA_DIR`, else `../shared/data` next to the repository."""
    return os.environ.get("KERAS_WSSI_TEST_DATA_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


@pytest.fixture(scope="session")
def data_dir():
    path = shared_data_dir()
    if not os.path.isdir(os.path.join(path, "mnist")):
        pytest.fail(
            f"Real-data tests need the raw MNIST files in {path}/mnist (set KERAS_WSSI_TEST_DATA_DIR); "
            "they are not skipped silently."
        )
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(1234)
    yield
