"""Two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy train a keras_wssi.Model through fit.

Each case starts `tests/multi_worker_check.py` twice as a two-worker cluster on free localhost ports (bounded:
the workers are killed after 120 s) and once as a one-process run with the same global batch. Both workers
must end with identical weights (the strategy keeps one set of variables), and agree with the one-process run
within the tolerance below (weights: the trainable variables; the other state the model tracks is compared
apart): the global batch is split in two and the halves' gradients summed by a collective,
so only the summation order differs (measured ~1e-8), except where a penalty's state follows the first
replica's half batch by design (the spectral norm's warm start, as under MirroredStrategy).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from _testing import free_ports
from _testing import load_run
from _testing import tensorflow_only

pytestmark = tensorflow_only("MultiWorkerMirroredStrategy; JAX scale-out is tested in tests/test_jax_data_parallel.py")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "multi_worker_check.py")
TIMEOUT_S = 120

# Largest weight difference allowed between the two-worker run and the one-process run after 8 SGD steps.
TOLERANCE = {"weissi:0.05": 1e-6, "jacobian_spectral_norm:0.05": 1e-4}
# Penalties whose state (variables aggregated only_first_replica) is kept per worker (see the test).
PER_WORKER_STATE = {"jacobian_spectral_norm:0.05"}


def _environment():
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    environment.pop("TF_CONFIG", None)
    return environment


def _two_workers(tmp_path, penalty, backup_dir, *extra):
    """Runs the two workers to completion (killed after TIMEOUT_S); returns their stderr."""
    ports = ",".join(map(str, free_ports(2)))
    workers = [
        subprocess.Popen(
            [sys.executable, SCRIPT, str(tmp_path / f"worker{i}.npz"), penalty, f"--worker={i}", f"--ports={ports}",
             f"--backup_dir={backup_dir}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail(f"the two workers did not finish within {TIMEOUT_S} s")
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    return [stderr for _, stderr in outputs]


def _single(tmp_path, penalty, *extra):
    single = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "single.npz"), penalty, *extra], capture_output=True, text=True,
        env=_environment(), timeout=TIMEOUT_S,
    )
    assert single.returncode == 0, single.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("penalty", list(TOLERANCE), ids=["stateless_weissi", "stateful_spectral_norm"])
def test_two_workers_on_localhost_train_identically_and_match_one_process(penalty, tmp_path):
    backup_dir = str(tmp_path / "backup")
    _two_workers(tmp_path, penalty, backup_dir)
    _single(tmp_path, penalty)

    (w0, s0, h0), (w1, s1, h1), (ws, _, hs) = (load_run(tmp_path / n) for n in ("worker0.npz", "worker1.npz", "single.npz"))
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert h0 == h1
    assert all(np.isfinite(s).all() for s in s0 + s1)
    if penalty in PER_WORKER_STATE:
        # `only_first_replica` state is the first replica's *per worker* under MultiWorkerMirroredStrategy: each
        # worker's warm-start vectors follow its own half batch (the weights stay identical: gradients are summed).
        state_difference = max((float(np.max(np.abs(a - b))) for a, b in zip(s0, s1)), default=0.0)
        print(f"\n{penalty}: penalty state differs between workers by up to {state_difference:.2e} (per worker)")
    else:
        for a, b in zip(s0, s1):
            np.testing.assert_array_equal(a, b)
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(w0, ws))
    print(f"\n{penalty}: largest weight difference two workers vs one process {difference:.2e}")
    assert difference < TOLERANCE[penalty], difference
    assert all(np.isfinite(w).all() for w in w0)
    assert np.allclose(h0["loss"], hs["loss"], rtol=1e-4), (h0, hs)
    # Only the chief (worker 0) wrote backups, one per epoch, into the shared folder.
    assert sorted(n for n in os.listdir(backup_dir) if n.endswith(".index")) == ["ckpt-1.index", "ckpt-2.index"]
    assert not [n for n in os.listdir(backup_dir) if n.startswith("_worker")]


@pytest.mark.slow
def test_two_workers_resume_from_the_chiefs_backup(tmp_path):
    """Two epochs, then the same cluster asked for three: both workers restore the chief's epoch-2 backup."""
    penalty = "weissi:0.05"
    backup_dir = str(tmp_path / "backup")
    _two_workers(tmp_path, penalty, backup_dir)
    stderr = _two_workers(tmp_path, penalty, backup_dir, "--epochs=3")
    assert all("resumed from" in e and "ckpt-2 after epoch 2" in e for e in stderr), stderr
    _single(tmp_path, penalty, "--epochs=3")
    (w0, _, h0), (w1, _, h1), (ws, _, _) = (load_run(tmp_path / n) for n in ("worker0.npz", "worker1.npz", "single.npz"))
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert len(h0["loss"]) == 1, "only epoch 3 was trained"
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w0, ws)) < TOLERANCE[penalty]
    assert sorted(n for n in os.listdir(backup_dir) if n.endswith(".index")) == ["ckpt-2.index", "ckpt-3.index"]
