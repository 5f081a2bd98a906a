"""The GPU parity tests, run without a GPU: NumPy stands in for CuPy, the kernels run on the host.

Every test of ``test_kernels_gpu`` runs here with ``cp`` a module that
forwards to NumPy (so every ``xp is not numpy`` branch is taken: the layers'
kernel classes, the copies to and from the device, the worker's compute and
the neurons model) and with the raw kernels built as host C++
(``kernel_host``). This checks the GPU tests themselves and all GPU code
except CuPy and the device, so that the first run on a GPU tests only those.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from downpour.kernels import filtering, lcn, pooling

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_host
import test_kernels_gpu as G

pytestmark = pytest.mark.skipif(kernel_host.compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")

STANDIN = types.ModuleType("numpy_as_cupy")
STANDIN.__getattr__ = lambda name: getattr(np, name)  # type: ignore[method-assign]  # a module-level __getattr__ (PEP 562) set from outside
STANDIN.asnumpy = np.asarray


@pytest.fixture(scope="module")
def launchers(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    return {np.dtype(dt).str: kernel_host.HostLauncher(kernel_host.build(d, dt), dt) for dt in (np.float32, np.float64)}


def _close(got, ref, dtype, tol_scale=1.0):
    assert isinstance(got, np.ndarray), type(got)
    g, r = got.astype(np.float64), np.asarray(ref, np.float64)
    assert g.shape == r.shape, (g.shape, r.shape)
    err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300)
    assert err <= G.TOL[dtype] * tol_scale, f"normwise relative error {err:.3g}"


@pytest.fixture(autouse=True)
def standin(monkeypatch, launchers):
    for m in (filtering, pooling, lcn):
        monkeypatch.setattr(m, "launcher_for", lambda xp, dt: launchers[np.dtype(dt).str])
    monkeypatch.setattr(G, "cp", STANDIN)
    monkeypatch.setattr(G, "close", _close)
    for la in launchers.values():
        la.calls.clear()
    yield


# The GPU module's tests, collected here under the stand-in (their globals are G's, patched above).
for _name, _fn in list(vars(G).items()):
    if _name.startswith("test_") and callable(_fn):
        globals()[_name] = _fn
del _name, _fn


def test_the_standin_runs_the_kernels(launchers):
    """The layers under the stand-in take the kernel path (not NumPy's own code)."""
    G.test_local_filter_parity(G.GEOMETRIES[1], np.float32)
    assert {"im2col", "col2im_add"} <= set(launchers[np.dtype(np.float32).str].calls)
