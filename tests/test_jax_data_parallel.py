"""Scale-out on JAX: two processes on 127.0.0.1 train a keras_wssi.Model through `fit` under `keras.distribution`.

Each case starts `tests/jax_data_parallel_check.py` twice as a two-process JAX cluster (`keras.distribution.initialize`,
CPU collectives over gloo; killed after 300 s), each process training every case in turn, and once as a one-process run on the same global batches. Under
`DataParallel` the step is one global program over the sharded batch, so both processes hold the same weights
(compared exactly) and they agree with the one-process run up to the order of the cross-device sums (tolerance
below; measured values ~3e-8). The random projections of `jacobian_frobenius` are drawn for the global batch by
a partitionable generator, so they match too. Runs in the JAX pass of the suite.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from _testing import BACKEND
from _testing import free_ports
from _testing import load_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BACKEND != "jax", reason="JAX backend only: keras.distribution scale-out (runs in the JAX pass)"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "jax_data_parallel_check.py")
TIMEOUT_S = 300
TOLERANCE = 1e-5


def _environment():
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


PENALTIES = ["weissi:0.05", "input_gradient:0.1", "jacobian_frobenius:0.05", "jacobian_spectral_norm:0.05"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-process cluster and one single process, each training every case in turn."""
    folder = tmp_path_factory.mktemp("data_parallel")
    cases = ",".join(PENALTIES)
    port = free_ports(1)[0]
    processes = [
        subprocess.Popen(
            [sys.executable, SCRIPT, str(folder / f"p{i}_"), cases, f"--process={i}", f"--port={port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"the two JAX processes did not finish within {TIMEOUT_S} s")
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    single = subprocess.run([sys.executable, SCRIPT, str(folder / "single_"), cases], capture_output=True,
                            text=True, env=_environment(), timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]
    return folder


@pytest.mark.parametrize("index", range(len(PENALTIES)), ids=PENALTIES)
def test_two_processes_match_each_other_and_one_process(runs, index):
    penalty = PENALTIES[index]
    (w0, s0, h0), (w1, s1, h1), (ws, ss, hs) = (load_run(runs / f"{n}_{index}.npz") for n in ("p0", "p1", "single"))
    for a, b in zip(w0 + s0, w1 + s1):
        np.testing.assert_array_equal(a, b)
    assert h0 == h1
    name = penalty.split(":")[0]
    assert name in h0 and np.isfinite(h0[name]).all()
    print(f"{penalty}: largest weight difference to one process {max(float(np.abs(a - b).max()) for a, b in zip(w0, ws)):.1e}")
    for a, b in zip(w0, ws):
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)
    for a, b in zip(s0, ss):
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(h0[name], hs[name], rtol=1e-5)
    # The weights moved: the comparison is not between two untrained models.
    assert max(float(np.abs(a - b).max()) for a, b in zip(w0, _initial_weights())) > 1e-3


def _initial_weights():
    from jax_data_parallel_check import build_model

    return [np.asarray(v.value) for v in build_model().trainable_variables]
