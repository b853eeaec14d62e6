"""Offline data loading from the raw IDX files: shapes, checksums, layouts and clear errors."""

import gzip
import os
import shutil
import socket
import time

import numpy as np
import pytest

from keras_wssi import data


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_offline_loading_gives_the_published_splits(name, data_dir):
    train_images, train_labels = data.load_arrays(name, "train", data_dir=data_dir)
    test_images, test_labels = data.load_arrays(name, "test", data_dir=data_dir)
    assert train_images.shape == (60000, 28, 28, 1) and test_images.shape == (10000, 28, 28, 1)
    assert train_images.dtype == np.float32 and 0.0 <= train_images.min() and train_images.max() <= 1.0
    assert sorted(np.unique(train_labels)) == list(range(10))
    # Every class is roughly balanced in both data sets (5–15% each).
    counts = np.bincount(test_labels, minlength=10) / len(test_labels)
    assert counts.min() > 0.05 and counts.max() < 0.15


def test_data_dir_from_environment_and_folder_layouts(data_dir, tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    for file_name in os.listdir(os.path.join(data_dir, "mnist")):
        os.symlink(os.path.join(data_dir, "mnist", file_name), flat / file_name)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(flat))
    images, labels = data.load_arrays("mnist", "test")
    reference, reference_labels = data.load_arrays("mnist", "test", data_dir=data_dir)
    np.testing.assert_array_equal(images, reference)
    np.testing.assert_array_equal(labels, reference_labels)


def test_corrupt_file_is_refused_by_checksum(data_dir, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for file_name in os.listdir(os.path.join(data_dir, "mnist")):
        shutil.copy(os.path.join(data_dir, "mnist", file_name), folder / file_name)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "rb") as handle:
        payload = bytearray(handle.read())
    payload[100] = (payload[100] + 1) % 10
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes(payload))
    with pytest.raises(data.DataError, match="Checksum mismatch"):
        data.load_arrays("mnist", "test", data_dir=str(tmp_path))


def test_missing_files_and_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="has no t10k-images"):
        data.load_arrays("mnist", "test", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="is not a directory"):
        data.load_arrays("mnist", "test", data_dir=str(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="Unknown dataset"):
        data.load_arrays("cifar10", "test", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="Unknown split"):
        data.load_arrays("mnist", "validation", data_dir=str(tmp_path))


def test_pipeline_batches_shuffles_and_limits(data_dir):
    dataset = data.load_dataset("mnist", "train", batch_size=100, data_dir=data_dir, limit=250, seed=3)
    batches = list(dataset.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [100, 100, 50]
    images, _ = data.load_arrays("mnist", "train", data_dir=data_dir)
    first_epoch = np.concatenate([b[0] for b in batches])
    # Shuffled (not the file order) but the same 250 examples.
    assert not np.array_equal(first_epoch, images[:250])
    np.testing.assert_allclose(np.sort(first_epoch.sum(axis=(1, 2, 3))), np.sort(images[:250].sum(axis=(1, 2, 3))), rtol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        data.load_dataset("mnist", "test", batch_size=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="limit"):
        data.load_dataset("mnist", "test", data_dir=data_dir, limit=-3)
    with pytest.raises(ValueError, match="empty"):
        data.make_pipeline(images[:0], images[:0], 10)


def test_a_failing_tfds_download_says_what_to_do(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

    def failing(*args, **kwargs):
        raise ConnectionError("no network")

    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds, "load", failing)
    monkeypatch.setattr(data, "_tfds_prepared", lambda builder: False)
    monkeypatch.setattr(data, "_network_reachable", lambda timeout=3.0: True)
    data._ARRAY_CACHE.pop(("fashion_mnist", "test", None), None)
    with pytest.raises(data.DataError, match=r"ConnectionError: no network.*t10k-images-idx3-ubyte.gz.*data_dir"):
        data.load_arrays("fashion_mnist", "test")


def test_offline_without_data_dir_fails_in_seconds_naming_the_files(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.OFFLINE_ENV, "1")
    monkeypatch.setattr(data, "_tfds_prepared", lambda builder: False)
    data._ARRAY_CACHE.pop(("mnist", "train", None), None)
    start = time.time()
    with pytest.raises(data.DataError, match=r"unreachable.*train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz.*<dir>/mnist/"):
        data.load_arrays("mnist", "train")
    assert time.time() - start < 30


def test_the_unreachable_host_is_detected_quickly(monkeypatch):
    monkeypatch.delenv(data.OFFLINE_ENV, raising=False)
    with socket.socket() as server:  # A port nobody listens on: bound, never accepting.
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    monkeypatch.setattr(data, "_DOWNLOAD_HOSTS", (("127.0.0.1", port),))
    start = time.time()
    assert data._network_reachable(timeout=2.0) is False
    assert time.time() - start < 5


def test_a_model_file_carries_its_data_description(tmp_path):
    import keras

    import keras_wssi as kw

    path = str(tmp_path / "model.keras")
    model = kw.architectures.mlp(input_shape=(28, 28, 1), hidden_units=(4,))
    model.save(path)
    assert data.read_description(path) is None
    data.write_description(path, data.describe("fashion_mnist"))
    assert data.read_description(path) == {
        "dataset": "fashion_mnist", "preprocessing": data.PREPROCESSING, "input_shape": [28, 28, 1], "num_classes": 10
    }
    restored = keras.models.load_model(path)  # Keras's loader ignores the extra entry.
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="already carries"):
        data.write_description(path, data.describe("mnist"))
    with pytest.raises(data.DataError, match="Unknown dataset"):
        data.describe("cifar10")
