"""Data sets: MNIST and Fashion-MNIST, online through tensorflow-datasets or offline from raw IDX files.

Online users get the data from `tensorflow_datasets` (it downloads once and caches). Offline users point
`data_dir` (or the `KERAS_WSSI_DATA_DIR` environment variable) at a folder holding the four original
`*-idx?-ubyte.gz` files of a data set, either directly or in a sub-folder named after the data set
(`<data_dir>/mnist/…`, `<data_dir>/fashion_mnist/…`). Every raw file is verified against the SHA-256
published for the original download before it is parsed, so a truncated or substituted file is refused
instead of silently training on it. Without `data_dir` and without a network, the error comes after a 3 s
probe of the download host (not after minutes of tfds retries) and names the files and where to put them.
`write_description` records inside a `.keras` file which data set and preprocessing a model was trained on.
"""

import gzip
import hashlib
import json
import os
import socket
import struct
import zipfile

import numpy as np
import tensorflow as tf

__all__ = [
    "DATA_DIR_ENV",
    "OFFLINE_ENV",
    "EpochShuffledPipeline",
    "SUPPORTED_DATASETS",
    "DataError",
    "PREPROCESSING",
    "default_data_dir",
    "describe",
    "load_arrays",
    "load_dataset",
    "make_pipeline",
    "read_description",
    "write_description",
]

DATA_DIR_ENV = "KERAS_WSSI_DATA_DIR"
# Set to 1 to treat the download host as unreachable (air-gapped machines; tests of the offline error).
OFFLINE_ENV = "KERAS_WSSI_OFFLINE"

# Original file names and their published SHA-256 (the same values tensorflow-datasets registers).
_RAW_FILES = {
    "mnist": {
        ("train", "images"): (
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        ("train", "labels"): (
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        ("test", "images"): (
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        ("test", "labels"): (
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "fashion_mnist": {
        ("train", "images"): (
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        ("train", "labels"): (
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        ("test", "images"): (
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        ("test", "labels"): (
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
}

SUPPORTED_DATASETS = tuple(sorted(_RAW_FILES))
_SPLITS = ("train", "test")
_IDX_MAGIC = {"images": 2051, "labels": 2049}

# Parsed arrays are kept per process: tests and scripts load the same files many times.
_ARRAY_CACHE = {}
_VERIFIED_FILES = set()


class DataError(ValueError):
    """Raised when a data set cannot be found, verified or parsed."""


def default_data_dir():
    """The offline data directory from `KERAS_WSSI_DATA_DIR`, or None when unset."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return value or None


def _check_name_and_split(name, split):
    if name not in _RAW_FILES:
        raise DataError(
            f"Unknown dataset {name!r}: expected one of {', '.join(SUPPORTED_DATASETS)}."
        )
    if split not in _SPLITS:
        raise DataError(f"Unknown split {split!r}: expected 'train' or 'test'.")


def _find_raw_file(data_dir, name, file_name):
    candidates = [
        os.path.join(data_dir, name, file_name),
        os.path.join(data_dir, file_name),
        # The layout torchvision / tfds manual_dir users already have.
        os.path.join(data_dir, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name], "raw", file_name),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DataError(
        f"data_dir={data_dir!r} has no {file_name} for dataset {name!r}; looked in "
        f"{', '.join(candidates)}. Point data_dir (or ${DATA_DIR_ENV}) at the folder holding the "
        "original gzip-compressed IDX files, or leave it unset to download with tensorflow-datasets."
    )


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_idx(path, kind, expected_sha256):
    if path not in _VERIFIED_FILES:
        actual = _sha256(path)
        if actual != expected_sha256:
            raise DataError(
                f"Checksum mismatch for {path}: sha256 {actual}, expected {expected_sha256}. "
                "The file is corrupt or is not the original distribution file."
            )
        _VERIFIED_FILES.add(path)
    with gzip.open(path, "rb") as handle:
        payload = handle.read()
    magic = struct.unpack(">I", payload[:4])[0]
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{path} is not an IDX {kind} file (magic {magic}, expected {_IDX_MAGIC[kind]}).")
    if kind == "images":
        count, rows, cols = struct.unpack(">III", payload[4:16])
        array = np.frombuffer(payload, dtype=np.uint8, offset=16)
        if array.size != count * rows * cols:
            raise DataError(f"{path}: payload has {array.size} bytes, header promises {count * rows * cols}.")
        return array.reshape(count, rows, cols, 1)
    count = struct.unpack(">I", payload[4:8])[0]
    array = np.frombuffer(payload, dtype=np.uint8, offset=8)
    if array.size != count:
        raise DataError(f"{path}: payload has {array.size} labels, header promises {count}.")
    return array


def _load_raw(name, split, data_dir):
    arrays = {}
    for kind in ("images", "labels"):
        file_name, sha = _RAW_FILES[name][(split, kind)]
        arrays[kind] = _read_idx(_find_raw_file(data_dir, name, file_name), kind, sha)
    if len(arrays["images"]) != len(arrays["labels"]):
        raise DataError(f"{name}/{split}: {len(arrays['images'])} images but {len(arrays['labels'])} labels.")
    return arrays["images"], arrays["labels"]


def _expected_files_message(name):
    files = ", ".join(file_name for file_name, _ in dict.fromkeys(_RAW_FILES[name].values()))
    return (
        f"Put the four original files of {name!r} ({files}) in a folder, e.g. <dir>/{name}/, and pass that <dir> "
        f"as data_dir (flag --data_dir, or ${DATA_DIR_ENV})."
    )


# Where tensorflow-datasets downloads MNIST and Fashion-MNIST from (the first host answers for both).
_DOWNLOAD_HOSTS = (("storage.googleapis.com", 443),)


def _network_reachable(timeout=3.0):
    """Whether the download host answers within `timeout` seconds (tfds itself retries for minutes)."""
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        return False
    for host, port in _DOWNLOAD_HOSTS:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def _tfds_prepared(builder):
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _load_tfds(name, split):
    try:
        import tensorflow_datasets as tfds  # Imported lazily: it is slow to import and only needed online.
    except ImportError as error:
        raise DataError(
            f"No data_dir was given and tensorflow-datasets is not installed ({error}). {_expected_files_message(name)}"
        ) from error
    builder = tfds.builder(name)
    if not _tfds_prepared(builder) and not _network_reachable():
        # Without this check tfds retries the download for about 200 s before failing.
        raise DataError(
            f"No data_dir was given, {name!r} is not in the tensorflow-datasets cache ({builder.data_dir}) and "
            f"the download host is unreachable (offline?). {_expected_files_message(name)}"
        )
    try:
        images, labels = tfds.as_numpy(
            tfds.load(name, split=split, batch_size=-1, as_supervised=True)
        )
    except Exception as error:  # tfds raises many types (network, checksum, builder) for one cause.
        raise DataError(
            f"Could not load {name!r}/{split} through tensorflow-datasets ({type(error).__name__}: "
            f"{error}). {_expected_files_message(name)}"
        ) from error
    return np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28, 1), np.asarray(labels)


def load_arrays(name, split, data_dir=None):
    """Loads a whole split as NumPy arrays.

    Args:
        name: `"mnist"` or `"fashion_mnist"`.
        split: `"train"` or `"test"`.
        data_dir: folder with the raw IDX `.gz` files (offline). Defaults to `$KERAS_WSSI_DATA_DIR`;
            when neither is set the data comes from tensorflow-datasets (online).

    Returns:
        `(images, labels)`: float32 images in `[0, 1]` of shape `(N, 28, 28, 1)` and int32 labels `(N,)`.
    """
    _check_name_and_split(name, split)
    data_dir = data_dir or default_data_dir()
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"data_dir={data_dir!r} is not a directory.")
    key = (name, split, os.path.abspath(data_dir) if data_dir else None)
    if key not in _ARRAY_CACHE:
        if data_dir:
            images, labels = _load_raw(name, split, data_dir)
        else:
            images, labels = _load_tfds(name, split)
        images = images.astype(np.float32) / np.float32(255.0)
        labels = labels.astype(np.int32)
        images.setflags(write=False)
        labels.setflags(write=False)
        _ARRAY_CACHE[key] = (images, labels)
    return _ARRAY_CACHE[key]


def make_pipeline(images, labels, batch_size, shuffle=False, seed=0, repeat=False, drop_remainder=False):
    """A `tf.data` pipeline over in-memory arrays: cache, shuffle, batch, prefetch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if len(images) == 0:
        raise ValueError("The dataset is empty: there is nothing to batch.")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    if shuffle:
        dataset = dataset.shuffle(min(len(images), 60000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


class EpochShuffledPipeline:
    """A `tf.data` pipeline whose order in epoch `e` is a fixed function of `(seed, e)`.

    `tf.data`'s own `shuffle(seed=…, reshuffle_each_iteration=True)` draws each epoch's order from a stream
    that restarts with the process, so a run resumed at epoch `e` (after `BackupAndRestore`) would see the
    order of epoch 0 again and end with other weights than an uninterrupted run. Here the order is a
    stateless permutation seeded by `(seed, epoch)`; `keras_wssi.callbacks.SetPipelineEpoch` (or any code
    calling `set_epoch`) tells the pipeline which epoch is starting. The arrays are held in non-trainable
    variables, so the pipeline's graph stays small.

    Example:

    ```python
    pipeline = keras_wssi.data.EpochShuffledPipeline(images, labels, batch_size=128, seed=0)
    model.fit(pipeline.dataset, epochs=5, callbacks=[keras_wssi.callbacks.SetPipelineEpoch(pipeline)])
    ```
    """

    def __init__(self, images, labels, batch_size, seed=0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError(
                f"images and labels must be non-empty and of equal length, got {len(images)} and {len(labels)}."
            )
        images = np.asarray(images)
        if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
            bad = int(np.sum(~np.isfinite(images).reshape(len(images), -1).all(axis=1)))
            raise ValueError(f"images contains NaN or Inf in {bad} examples; clean the data before training.")
        self.size = len(images)
        self.batch_size = batch_size
        self.seed = int(seed)
        with tf.device("/cpu:0"):
            self._images = tf.Variable(images, trainable=False, name="pipeline_images")
            self._labels = tf.Variable(labels, trainable=False, name="pipeline_labels")
            self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="pipeline_epoch")
        seed_value = tf.constant(self.seed, tf.int64)

        def epoch_order(_):
            # Read when the epoch's iterator asks for its first element, i.e. after on_epoch_begin.
            order = tf.random.experimental.stateless_shuffle(
                tf.range(self.size, dtype=tf.int64), seed=tf.stack([seed_value, self._epoch.read_value()])
            )
            return tf.data.Dataset.from_tensor_slices(order)

        def gather(indices):
            return tf.gather(self._images, indices), tf.gather(self._labels, indices)

        self.num_batches = -(-self.size // batch_size)
        # `flat_map` hides the length from tf.data; asserting it gives Keras a known epoch length (a progress
        # bar with a total from the first epoch, and no "input ran out of data" warning).
        self.dataset = (
            tf.data.Dataset.range(1)
            .flat_map(epoch_order)
            .batch(batch_size)
            .apply(tf.data.experimental.assert_cardinality(self.num_batches))
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def set_epoch(self, epoch):
        """Selects the order of epoch `epoch` for the next pass over `dataset`."""
        self._epoch.assign(int(epoch))

    def epoch_order(self, epoch):
        """The example order of epoch `epoch` (for tests and inspection)."""
        return tf.random.experimental.stateless_shuffle(
            tf.range(self.size, dtype=tf.int64), seed=tf.constant([self.seed, int(epoch)], tf.int64)
        ).numpy()


def load_dataset(
    name,
    split,
    batch_size=128,
    data_dir=None,
    shuffle=None,
    seed=0,
    limit=None,
    drop_remainder=False,
):
    """Loads a split as a batched `tf.data.Dataset` of `(image, label)`.

    Args:
        name: `"mnist"` or `"fashion_mnist"`.
        split: `"train"` or `"test"`.
        batch_size: examples per batch.
        data_dir: raw IDX folder for offline use (see `load_arrays`).
        shuffle: shuffle every epoch; defaults to True for the train split.
        seed: shuffle seed.
        limit: keep only the first `limit` examples (a quick run); None keeps all.
        drop_remainder: drop the last partial batch (fixed shapes for XLA and TPUs).
    """
    images, labels = load_arrays(name, split, data_dir=data_dir)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
        images, labels = images[:limit], labels[:limit]
    if shuffle is None:
        shuffle = split == "train"
    return make_pipeline(
        images, labels, batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder
    )


# How `load_arrays` turns the files into model inputs; recorded with every trained model.
PREPROCESSING = "uint8 pixels / 255 -> float32 in [0, 1], shape (28, 28, 1); int32 labels 0-9"
_DESCRIPTION_ENTRY = "keras_wssi_data.json"


def describe(name):
    """What a model trained on data set `name` by `load_arrays` expects: `{"dataset", "preprocessing", ...}`.

    Example:

    ```python
    keras_wssi.data.describe("fashion_mnist")["preprocessing"]
    ```
    """
    _check_name_and_split(name, "train")
    return {"dataset": name, "preprocessing": PREPROCESSING, "input_shape": [28, 28, 1], "num_classes": 10}


def write_description(model_path, description):
    """Adds the data description to a saved `.keras` file (an extra JSON entry Keras's loader ignores).

    The model file then says what it was trained on, so an evaluation reads the data set instead of guessing.

    Example:

    ```python
    model.save("model.keras")
    keras_wssi.data.write_description("model.keras", keras_wssi.data.describe("mnist"))
    ```
    """
    with zipfile.ZipFile(model_path, "a") as archive:
        if _DESCRIPTION_ENTRY in archive.namelist():
            raise ValueError(f"{model_path} already carries a data description.")
        archive.writestr(_DESCRIPTION_ENTRY, json.dumps(description, sort_keys=True))


def read_description(model_path):
    """The data description a `.keras` file carries (see `write_description`), or None when it has none.

    Example:

    ```python
    description = keras_wssi.data.read_description("runs/default/model.keras")
    ```
    """
    try:
        with zipfile.ZipFile(model_path) as archive:
            if _DESCRIPTION_ENTRY not in archive.namelist():
                return None
            return json.loads(archive.read(_DESCRIPTION_ENTRY))
    except zipfile.BadZipFile as error:
        raise DataError(f"{model_path} is not a .keras archive ({error}).") from error
