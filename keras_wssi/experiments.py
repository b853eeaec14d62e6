"""Experiments that train models: the slope-based ranking of data sets by complexity (Johansson et al. 2021, §5).

This sits above `data`, `architectures` and `analysis` (it trains a reference network, then measures it), so
that `keras_wssi.analysis` stays a reader of trained models.
"""

import keras

from keras_wssi import architectures
from keras_wssi import data
from keras_wssi.analysis.slope import slope_distribution

__all__ = ["dataset_complexity"]


def dataset_complexity(
    datasets=("mnist", "fashion_mnist"),
    data_dir=None,
    hidden_units=(100,),
    epochs=3,
    num_train=10000,
    num_points=750,
    batch_size=128,
    learning_rate=1e-3,
    seed=0,
    model_fn=None,
):
    """Ranks data sets by the slope of a reference network trained on each (Johansson et al. 2021, §5).

    For every data set the same reference network (a ReLU MLP `hidden_units`, or `model_fn(input_shape,
    num_classes)`) is trained with Adam on the first `num_train` training images; the slope is measured
    on `num_points` fixed training points. A larger slope means a more complex (harder) data set.

    Returns:
        A list of dicts sorted by median slope (least complex first): `dataset`, `median`, `mean`,
        `quantiles` (0.1, 0.9), `test_accuracy`.
    """
    results = []
    for name in datasets:
        keras.utils.set_random_seed(seed)
        x_train, y_train = data.load_arrays(name, "train", data_dir=data_dir)
        x_test, y_test = data.load_arrays(name, "test", data_dir=data_dir)
        x_train, y_train = x_train[:num_train], y_train[:num_train]
        if model_fn is None:
            model = architectures.mlp(input_shape=x_train.shape[1:], hidden_units=tuple(hidden_units))
        else:
            model = model_fn(x_train.shape[1:], 10)
        model.compile(
            keras.optimizers.Adam(learning_rate),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0)
        accuracy = float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
        distribution = slope_distribution(model, x_train[:num_points], quantiles=(0.1, 0.5, 0.9))
        results.append(
            {
                "dataset": name,
                "median": distribution["quantiles"][0.5],
                "mean": distribution["mean"],
                "quantiles": {0.1: distribution["quantiles"][0.1], 0.9: distribution["quantiles"][0.9]},
                "test_accuracy": accuracy,
            }
        )
    return sorted(results, key=lambda r: r["median"])
