"""Helpers shared by several test modules."""


def tf_functions(function):
    """The `tf.function`s behind a Keras train/test function (searched through its closures), so a test can
    count their concrete functions and prove that nothing retraces per step."""
    if hasattr(function, "_list_all_concrete_functions"):
        return [function]
    found = []
    for cell in getattr(function, "__closure__", None) or ():
        value = cell.cell_contents
        if hasattr(value, "_list_all_concrete_functions"):
            found.append(value)
        elif callable(value) and getattr(value, "__closure__", None):
            found.extend(tf_functions(value))
    return found
