"""Suite-wide settings, applied before anything imports numpy."""

import os

# One BLAS thread per process: on 2 shared cores, OpenBLAS's thread pool makes small matrix
# products ~100x slower under contention (measured: a 16-token prefill 169 ms vs 1.5 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
