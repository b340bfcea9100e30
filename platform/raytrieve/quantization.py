"""Embedding quantization: int8 / uint8 scalar buckets and (u)binary sign bits.

int8 and uint8 map each dimension's [min, max] (from ``ranges``, calibration embeddings or
the embeddings themselves) onto 256 buckets; binary packs the sign bits, 8 dimensions a
byte (``binary`` shifted into int8, ``ubinary`` as uint8).
"""

from __future__ import annotations

import numpy as np

from raytrieve.errors import InputError

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def quantization_ranges(calibration: np.ndarray) -> np.ndarray:
    """[2, dim]: per-dimension min and max."""
    if calibration.ndim != 2 or calibration.shape[0] < 2:
        raise InputError(
            "int8/uint8 quantization needs ranges from at least 2 embeddings; pass ranges= or "
            "calibration_embeddings= from a representative sample"
        )
    return np.vstack((calibration.min(axis=0), calibration.max(axis=0)))


def quantize_embeddings(
    embeddings: np.ndarray,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; choose from {list(PRECISIONS)}")
    embeddings = np.asarray(embeddings)
    if embeddings.dtype in (np.int8, np.uint8):
        raise InputError("embeddings to quantize must be floating point, not already int8/uint8")
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision in ("int8", "uint8"):
        if embeddings.ndim == 2 and embeddings.shape[0] == 0:
            return np.zeros(embeddings.shape, dtype=np.int8 if precision == "int8" else np.uint8)
        if ranges is None:
            ranges = quantization_ranges(calibration_embeddings if calibration_embeddings is not None else embeddings)
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    packed = np.packbits(embeddings > 0, axis=-1)
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
