"""numpy, imported without its BLAS thread pool: moegrow does no linear algebra with numpy."""

from __future__ import annotations

import os
import sys
from types import ModuleType

_BLAS_THREADS = "OPENBLAS_NUM_THREADS"


def import_numpy() -> ModuleType:
    """numpy, imported with its OpenBLAS limited to one thread unless the user chose a number.

    numpy's OpenBLAS starts a thread per core when it loads, and each spins for about 0.1 s of CPU
    before it sleeps (measured: `import numpy` takes 0.20 s of user CPU, 0.08 s with one thread): on
    a 2-core machine, a core taken from the noise. The variable is removed again at once: OpenBLAS
    reads it when it loads, so a BLAS loaded later (torch's) keeps its own threads."""
    if "numpy" in sys.modules or _BLAS_THREADS in os.environ:
        import numpy

        return numpy
    os.environ[_BLAS_THREADS] = "1"
    try:
        import numpy
    finally:
        os.environ.pop(_BLAS_THREADS, None)
    return numpy
