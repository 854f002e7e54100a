"""A :class:`KvSink` that copies rows into one preallocated ``[layers, rows, *row_shape]`` array.

Handy where the KV of a request is wanted as plain arrays (tests, benchmarks, a simple engine);
a paged engine writes into its own block pool instead.
"""

from __future__ import annotations

import numpy as np


class ArraySink:
    def __init__(self, num_layers: int, rows_per_layer: int, row_shape: tuple[int, ...], dtype: str) -> None:
        self.layers = np.empty((num_layers, rows_per_layer, *row_shape), dtype=dtype)
        self.bytes_written = 0

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        self.layers[layer, row_offset : row_offset + rows.shape[0]] = rows
        self.bytes_written += rows.nbytes
