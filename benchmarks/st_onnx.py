"""sentence-transformers' ONNX backend for the benchmarks: the float32 export (`backend="onnx"`)
and its dynamic int8 export (`export_dynamic_quantized_onnx_model`), each as a model the
benchmark times like any other side.

Exports are made once, offline, from the shipped weights, and cached under
out/bench/onnx/<model>/ (a full sentence-transformers model folder with onnx/*.onnx beside the
weights). Both ONNX Runtime sessions get the same intra-op thread count as torch.

Needs optimum-onnx and onnxruntime, which only the benchmark venv has (`make bench-venv`).
Without them, `load` returns no sides and a reason, which the benchmark prints in its JSON.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "out" / "bench" / "onnx"
SIDES = ("st_onnx", "st_onnx_int8")


def quantization_config() -> str:
    """sentence-transformers' named int8 config for this CPU: the widest integer dot product it has."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    for name, flag in (("avx512_vnni", "avx512_vnni"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return name
    return "arm64" if "asimd" in flags else "avx2"


def missing() -> str | None:
    """Why the ONNX sides cannot run here, or None when they can."""
    try:
        import onnxruntime  # noqa: F401
        from optimum.onnxruntime import ORTModel  # noqa: F401
    except Exception as exc:  # an ImportError, or optimum failing against this transformers
        return f"not measured: {type(exc).__name__}: {exc} (build the benchmark venv: make bench-venv)"
    return None


def versions() -> dict[str, str | None]:
    """The stack a run measured: the benchmark venv pins other versions than .venv."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "sentence-transformers", "onnxruntime", "optimum-onnx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def _export(cls: type, source: str, target: Path, config: str, **kwargs: Any) -> str:
    """Export `source` to `target` once (float32 and int8 ONNX files); returns the int8 file name."""
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    int8 = f"model_qint8_{config}.onnx"
    if (target / "onnx" / "model.onnx").exists() and (target / "onnx" / int8).exists():
        return int8
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = cls(source, backend="onnx", model_kwargs={"export": True}, **kwargs)
    model.save_pretrained(str(partial))
    export_dynamic_quantized_onnx_model(model, config, str(partial))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # only a complete export is ever found in the cache
    return int8


def load(cls: type, source: str, name: str, threads: int, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ONNX sides as loaded sentence-transformers models ({} when they cannot run), and what
    to report about them: the reason they were not measured, or the int8 config and export folder.

    `cls` is SentenceTransformer or CrossEncoder; `kwargs` go to it (device, max_length)."""
    reason = missing()
    if reason is not None:
        return {}, {"onnx_sides": reason}
    config = quantization_config()
    target = CACHE / name
    int8 = _export(cls, source, target, config, **kwargs)
    models = {}
    for side, file_name in zip(SIDES, ("model.onnx", int8)):
        model_kwargs = {"file_name": file_name, "session_options": _session_options(threads)}
        models[side] = cls(str(target), backend="onnx", model_kwargs=model_kwargs, **kwargs)
    return models, {"onnx_sides": "measured", "onnx_int8_config": config, "onnx_export": str(target)}


def against_st(ours: float, speed: dict[str, float], quality: dict[str, float], minimum: float) -> dict[str, Any]:
    """raytrieve's best speed against sentence-transformers' sides, as the benchmarks' JSON keys.

    The best backend is the fastest sentence-transformers side whose quality against its float32
    passes raytrieve's own guard for the same model kind (an int8 speedup that loses quality is
    not a fair best); `st` (float32, the reference) always qualifies. The fastest side at any
    quality is reported beside it, so nothing is hidden by the guard."""
    failed = sorted(k for k, q in quality.items() if k != "st" and not q >= minimum)
    eligible = {k: v for k, v in speed.items() if k not in failed}
    best = max(eligible, key=lambda k: eligible[k])
    fastest = max(speed, key=lambda k: speed[k])
    return {
        "ratio_vs_st": round(ours / speed["st"], 3),
        "ratio_vs_st_best_backend": round(ours / speed[best], 3),
        "best_st_backend": best,
        "st_backends_failing_guard": failed,
        "quality_guard": minimum,
        "ratio_vs_st_fastest_backend": round(ours / speed[fastest], 3),
        "fastest_st_backend": fastest,
    }
