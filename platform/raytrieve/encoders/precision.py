"""The number format a model computes in at inference: ``auto | float32 | bfloat16 | float16 | int8``.

- ``float32``: today's exact results (what the sentence-transformers parity tests hold to).
- ``bfloat16`` / ``float16``: the transformer's matrix products run under ``torch.autocast``
  with float32 weights; pooling, normalisation, SPLADE's max-pooling and the similarity
  accumulate in float32 (the modules upcast what autocast hands them).
- ``int8``: dynamic int8 quantisation of every ``nn.Linear`` (weights int8, activations
  quantised per batch), CPU only, for inference only; it changes the model in place.
- ``auto``: bfloat16 where the device runs it fast (a CPU with AMX or AVX-512 BF16, a GPU with
  bf16), float16 on other GPUs, float32 elsewhere; and only if the model passes its quality
  guard in that format (``guard``): outputs on fixed probe texts are compared with float32,
  and a model that fails stays in float32.

Thresholds are the ones the quality tests hold the shipped models to on real data
(tests/test_precision.py): dense cosine >= 0.999 per text; sparse dot-product Spearman >= 0.99
and each text's top terms kept; cross-encoder score Spearman >= 0.99.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

import numpy as np
import torch

from raytrieve.config import Dtype
from raytrieve.errors import InputError

if TYPE_CHECKING:
    from raytrieve.encoders.base import Encoder

log = logging.getLogger(__name__)

DTYPES: tuple[str, ...] = get_args(Dtype)
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
HALF: tuple[str, ...] = tuple(_AUTOCAST)  # the formats that run under autocast

# Guard thresholds (see the module docstring).
DENSE_MIN_COSINE = 0.999
SPARSE_MIN_SPEARMAN = 0.99
CROSS_MIN_SPEARMAN = 0.99
SPARSE_TOP_TERMS = 5  # each text's top terms in the candidate format ...
SPARSE_TOP_WITHIN = 10  # ... are among its top terms in float32 (near-ties may swap places)

# Fixed probe texts for the guard: short and long, several topics, queries and passages.
PROBE_QUERIES = (
    "how do vaccines train the immune system",
    "python read a csv file into a dataframe",
    "what causes the seasons on earth",
    "best way to store olive oil",
    "symptoms of iron deficiency",
    "who wrote the theory of general relativity",
)
PROBE_DOCUMENTS = (
    "Vaccines expose the immune system to a harmless piece or form of a pathogen, so that memory "
    "cells recognise the real infection later and respond faster.",
    "pandas.read_csv reads a comma-separated values file into a DataFrame; pass sep for other "
    "delimiters and usecols to load only some columns.",
    "Earth's seasons come from the tilt of its rotation axis, about 23.4 degrees, which changes "
    "how directly sunlight strikes each hemisphere over the year.",
    "Keep olive oil in a dark, cool cupboard in a sealed glass or tin container; light, heat and "
    "air make it go rancid.",
    "Iron deficiency can cause fatigue, pale skin, shortness of breath, cold hands and brittle nails.",
    "Albert Einstein published the general theory of relativity in 1915.",
    "The stock market closed higher on Friday after the central bank left rates unchanged.",
    "A sourdough starter is a fermented mixture of flour and water that leavens bread.",
    "Use git rebase --interactive to squash, reorder or edit commits before pushing a branch.",
    "The Great Barrier Reef is the world's largest coral reef system, off the coast of Queensland.",
)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16)."""
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_half(device: torch.device) -> str:
    """The reduced-precision format ``auto`` tries on ``device`` ("float32": none pays off)."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def check_dtype(dtype: str, device: torch.device, where: str = "dtype") -> None:
    if dtype not in DTYPES:
        raise InputError(f"{where} {dtype!r} is not one of {list(DTYPES)}")
    if dtype == "int8" and device.type != "cpu":
        raise InputError(
            f"{where} int8 (dynamic quantisation) runs on CPU only; on {device.type} use bfloat16 or float16"
        )
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"{where} bfloat16: this GPU has no bfloat16; use float16")


@contextlib.contextmanager
def autocast(dtype: str, device: torch.device) -> Iterator[None]:
    """Matrix products in ``dtype`` for the block when it is a half format; otherwise nothing."""
    half = _AUTOCAST.get(dtype)
    if half is None:
        yield
        return
    with torch.autocast(device.type, dtype=half):
        yield


def quantize_int8(module: torch.nn.Module) -> None:
    """Replace every ``nn.Linear`` under ``module`` by its dynamic int8 version, in place."""
    import warnings

    # torch 2.13 marks torch.ao.quantization and quantized tensors as deprecated (moving to
    # torchao, not a dependency here); they still work, and the warnings would repeat per actor.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic
        from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

        # Per output channel: all-MiniLM-L6-v2's minimum cosine to float32 is 0.956 so, 0.868
        # with one scale per tensor (both below the guard: int8 is never chosen by auto).
        quantize_dynamic(module, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def float32_output(linear: torch.nn.Linear) -> Any:
    """Recompute ``linear``'s output in float32 under autocast (a forward hook; returns its handle).

    For a model's last projection, whose outputs are the scores themselves: a cross-encoder's
    logits rounded to bfloat16 (spacing 0.0625 near -11) reorder close candidates (score Spearman
    0.988 against float32 on real pairs; 0.9998 with the head in float32, at no measurable cost)."""
    return linear.register_forward_hook(_float32_linear)


def _float32_linear(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    # A function, not a closure: a model with the hook is pickled to a pool's worker processes.
    if not torch.is_autocast_enabled(args[0].device.type):
        return output
    with torch.autocast(args[0].device.type, enabled=False):
        weight, bias = cast("torch.Tensor", module.weight), cast("torch.Tensor | None", module.bias)
        return torch.nn.functional.linear(args[0].float(), weight.float(), bias)


# -- the quality guard -----------------------------------------------------------------------


@dataclass
class GuardResult:
    dtype: str
    passed: bool
    measure: str  # what was compared, e.g. "min cosine"
    value: float
    threshold: float

    def __str__(self) -> str:
        verdict = "passes" if self.passed else "fails"
        return f"{self.dtype} {verdict} its guard ({self.measure} {self.value:.5f}, needs {self.threshold})"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-d arrays (average ranks for ties)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom else 1.0


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # Ties share their mean rank.
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _non_finite(cand: Any, dtype: str, threshold: float) -> GuardResult | None:
    """A candidate with NaN or Inf (a float16 overflow) fails whatever its ranks say."""
    arrays = cand if isinstance(cand, tuple) else (cand,)
    if all(np.isfinite(a).all() for a in arrays):
        return None
    return GuardResult(dtype, False, "finite outputs (NaN or Inf found)", 0.0, threshold)


def compare_dense(ref: np.ndarray, cand: np.ndarray, dtype: str) -> GuardResult:
    if (bad := _non_finite(cand, dtype, DENSE_MIN_COSINE)) is not None:
        return bad
    num = (ref * cand).sum(1)
    cos = num / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    value = float(cos.min())
    return GuardResult(dtype, value >= DENSE_MIN_COSINE, "min cosine to float32", value, DENSE_MIN_COSINE)


def compare_sparse(
    ref_q: np.ndarray, ref_d: np.ndarray, cand_q: np.ndarray, cand_d: np.ndarray, dtype: str
) -> GuardResult:
    """Sparse vectors as dense [n, vocab] arrays: query-document dot products and top terms."""
    if (bad := _non_finite((cand_q, cand_d), dtype, SPARSE_MIN_SPEARMAN)) is not None:
        return bad
    rho = spearman((ref_q @ ref_d.T).ravel(), (cand_q @ cand_d.T).ravel())
    for ref, cand in ((ref_q, cand_q), (ref_d, cand_d)):
        for r, c in zip(ref, cand):
            if not set(np.argsort(-c)[:SPARSE_TOP_TERMS]) <= set(np.argsort(-r)[:SPARSE_TOP_WITHIN]):
                return GuardResult(dtype, False, "top terms kept (a text's top terms changed)", 0.0, 1.0)
    return GuardResult(dtype, rho >= SPARSE_MIN_SPEARMAN, "dot-product Spearman", rho, SPARSE_MIN_SPEARMAN)


def compare_scores(ref: np.ndarray, cand: np.ndarray, dtype: str) -> GuardResult:
    if (bad := _non_finite(cand, dtype, CROSS_MIN_SPEARMAN)) is not None:
        return bad
    rho = spearman(ref.ravel(), cand.ravel())
    return GuardResult(dtype, rho >= CROSS_MIN_SPEARMAN, "score Spearman", rho, CROSS_MIN_SPEARMAN)


def guard(encoder: Encoder, dtype: str) -> GuardResult:
    """Compare ``encoder``'s probe outputs in ``dtype`` with float32; the encoder is left as it
    was (int8, which quantises in place, is tried on a copy)."""
    if encoder.dtype == "int8":
        raise InputError("the guard compares with float32; this model is already quantised to int8")
    before = encoder.dtype
    try:
        encoder.set_dtype("float32")
        ref = encoder.probe_outputs()
        trial = copy.deepcopy(encoder) if dtype == "int8" else encoder
        trial.set_dtype(dtype)
        return encoder.compare_probe(ref, trial.probe_outputs(), dtype)
    finally:
        encoder.set_dtype(before)


def resolve_auto(encoder: Encoder) -> tuple[str, GuardResult | None]:
    """What ``auto`` runs ``encoder`` in on its device, and the guard result that decided it."""
    half = fast_half(encoder.device)
    if half == "float32":
        return "float32", None
    result = guard(encoder, half)
    return (half if result.passed else "float32"), result


def describe(dtype: str, result: GuardResult | None, device: torch.device) -> str:
    why = f"; {result}" if result is not None else ""
    return f"computes in {dtype} on {device.type}{why}"
