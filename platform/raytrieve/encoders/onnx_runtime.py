"""ONNX Runtime as an inference backend on CPU (``backend: onnx``; ``torch`` is the default).

Why: one short query costs a 6-layer MiniLM ~28 ms in torch on a 2-core AVX2 CPU, ~80% of it
in small float32 matrix products (torch's MKL runs them at about half the rate ONNX Runtime's
kernels do there), and ~12 ms in ONNX Runtime, with the same outputs (float32, within 1e-5).
Large batches gain little (the products are then big enough for either), so this is for query
encoders and other small requests. It computes in float32 only.

What runs in ONNX Runtime is each ``Transformer`` module's Hugging Face model (token embeddings,
MLM logits or classifier logits); tokenization, pooling, SPLADE's activation, routers and
normalization stay the torch modules they are. Training, adaptive-layer features and any
module in train mode use torch as before.

The export (``torch.onnx.export``, dynamic batch and sequence) takes seconds to tens of
seconds, so it is cached on each machine by the model's content: ``$RAYTRIEVE_CACHE/onnx/<key>``
(default ``~/.cache/raytrieve``), key = hash of the weights, the config (not the folder it was
loaded from), task, inputs and the torch and exporter versions. Every load checks the export
against torch on fixed probe texts; a cached export that fails to load or disagrees is exported
again once, and a model whose fresh export disagrees is refused, naming the difference.
Weights changed after the export (an optimizer step, an in-place edit) are noticed: the module
then computes in torch again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch

from raytrieve._io import mark_used
from raytrieve.config import Backend
from raytrieve.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from raytrieve.modules.transformer import Transformer

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = get_args(Backend)
EXPORT_VERSION = 1  # bump when the export below changes what it writes
OPSET = 18
FILE = "model.onnx"
# The export must reproduce torch float32 on the probe texts within this (max abs difference
# over real tokens, relative to the largest output): a few 1e-6 is what a faithful export gives.
MAX_RELATIVE_DIFFERENCE = 1e-4


def cache_root() -> Path:
    from raytrieve.assets import cache_dir

    return cache_dir() / "onnx"


def check_backend(backend: str, dtype: str, device: torch.device | str, where: str = "backend") -> None:
    """Refuse what ONNX Runtime here cannot do, before loading anything."""
    if backend not in BACKENDS:
        raise ConfigError(f"{where}: unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if backend == "onnx":
        if dtype not in ("float32", "auto"):
            raise ConfigError(
                f"{where}: onnx computes in float32; set dtype: float32 (or auto), or backend: torch for {dtype}"
                + (" (an int8 model was quantised in place: load it again)" if dtype == "int8" else "")
            )
        if torch.device(device).type != "cpu":
            raise ConfigError(
                f"{where}: onnx runs on CPU here; load the model with device='cpu', or use backend: torch on {device}"
            )


def _input_names(module: Transformer) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if module.accepts_token_types else [])


def cache_key(module: Transformer) -> str:
    """The model's content (weights, config, task, inputs) and the exporter's versions."""
    import onnxscript

    h = hashlib.blake2b(digest_size=16)
    config = module.auto_model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from: the same weights elsewhere share an export
    meta = {
        "task": module.task,
        "output": module.output_name,
        "inputs": _input_names(module),
        "config": config,
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
        "opset": OPSET,
        "export": EXPORT_VERSION,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.auto_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Graph(torch.nn.Module):
    """The module's ``compute`` with named tensor inputs and its one output (what ONNX holds):
    the Hugging Face model's output, or a SPLADE model's decoder input (MLMTransformer.defer_decoder)."""

    def __init__(self, module: Transformer) -> None:
        super().__init__()
        self.model, self.compute, self.names = module.auto_model, module.compute, _input_names(module)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.compute(inputs)


def _probe(module: Transformer) -> dict[str, torch.Tensor]:
    """Fixed texts of different lengths (padding inside the batch), as the module tokenizes them."""
    from raytrieve.encoders.precision import PROBE_DOCUMENTS, PROBE_QUERIES

    texts: list[Any] = list(PROBE_QUERIES[:3]) + list(PROBE_DOCUMENTS[:2])
    if module.task == "sequence-classification":
        texts = [(q, d) for q in PROBE_QUERIES[:3] for d in PROBE_DOCUMENTS[:2]]
    features = module.collate(module.tokenize_ids(texts))
    return {k: features[k] for k in _input_names(module)}


def export(module: Transformer, target: Path) -> None:
    """Write ``module``'s model as ONNX under ``target`` (a new folder, written whole or not at all)."""
    from raytrieve._io import atomic_directory

    probe = _probe(module)
    names = _input_names(module)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    was_training = module.auto_model.training
    module.auto_model.eval()
    # The exporter's registry logs a warning per torchvision operator it skips (torchvision, not
    # used by these models, is not a dependency): a dozen lines in every replica that exports.
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        # overwrite=False: another process on this machine may finish the same export first
        # (FileExistsError, which the caller takes as done); a folder in use is never swapped.
        # warnings: the exporter notes that inputs share their batch and sequence axes (as meant).
        with atomic_directory(target, overwrite=False) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Graph(module),
                tuple(probe[n] for n in names),
                str(tmp / FILE),
                input_names=names,
                output_names=["output"],
                dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
                opset_version=OPSET,
                dynamo=True,
                external_data=True,
                verbose=False,
            )
    except FileExistsError:
        raise
    except Exception as e:  # the exporter's errors are many and untyped
        name = module.auto_model.name_or_path
        raise ModelLoadError(f"{name}: cannot export to ONNX ({type(e).__name__}: {e}); use backend: torch") from e
    finally:
        module.auto_model.train(was_training)
        registry.setLevel(level)


class OnnxModel:
    """An ONNX Runtime session standing in for a ``Transformer``'s model at inference."""

    def __init__(self, folder: Path, names: list[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads would otherwise spin between requests, taking cores from the
        # replicas beside this one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No memory arena: a large batch's buffers (a SPLADE batch's logits run to a GB) are
        # freed after it, as torch frees them, instead of held for the process's life. One
        # query's latency did not change measurably (14-17 ms either way for MiniLM, 1 thread).
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        self.folder, self.names, self.threads = folder, names, threads
        self.weights_version = -1  # attach sets it: the weights' in-place version count when exported
        try:
            self.session = ort.InferenceSession(str(folder / FILE), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types
            raise ModelLoadError(f"{folder}: ONNX Runtime cannot load this export ({type(e).__name__}: {e})") from e

    def __reduce__(self) -> Any:
        """A copy (deepcopy, pickle) opens the same export in a session of its own."""
        return _reopen, (self.folder, self.names, self.threads, self.weights_version)

    def current(self, model: torch.nn.Module) -> bool:
        """Whether ``model``'s weights are still those this export was made from (an optimizer
        step or an in-place edit bumps a parameter's version)."""
        return weights_version(model) == self.weights_version

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = inputs["input_ids"]
        # torch's model takes absent token types as zeros; the graph needs them given.
        feed = {
            n: (inputs[n] if n in inputs else torch.zeros_like(ids)).detach().to("cpu", torch.int64).numpy()
            for n in self.names
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


def _reopen(folder: Path, names: list[str], threads: int, version: int) -> OnnxModel:
    model = OnnxModel(folder, names, threads)
    model.weights_version = version
    return model


def weights_version(model: torch.nn.Module) -> int:
    return sum(p._version for p in model.parameters())


def _check(module: Transformer, model: OnnxModel) -> float:
    """The largest difference to torch float32 over the probe's real tokens, relative to the largest output."""
    probe = _probe(module)
    with torch.inference_mode():
        was_training = module.auto_model.training
        module.auto_model.eval()
        try:
            reference = _Graph(module)(*(probe[n] for n in model.names)).float()
        finally:
            module.auto_model.train(was_training)
    candidate = model(probe)
    difference = (candidate - reference).abs()
    if difference.dim() == 3:  # per token: only positions the attention mask keeps
        difference = difference[probe["attention_mask"].bool()]
    return float(difference.max() / reference.abs().max().clamp_min(1e-6))


def attach(module: Transformer, threads: int | None = None) -> OnnxModel:
    """Export ``module``'s model (or reuse this machine's cached export) and have its forward use
    it at inference; returns the session holder (also ``module.onnx_model``)."""
    name = module.auto_model.name_or_path
    wide = sorted({str(p.dtype) for p in module.auto_model.parameters() if p.dtype != torch.float32})
    if wide:
        raise ModelLoadError(
            f"{name}: backend onnx exports float32 weights, this model holds {wide}; load it in float32"
        )
    threads = threads or torch.get_num_threads()
    folder = cache_root() / cache_key(module)
    model: OnnxModel | None = None
    difference = float("inf")
    for attempt in ("cached", "fresh"):
        if not (folder / FILE).exists():
            attempt = "fresh"
            log.info("exporting %s to ONNX (%s)", name, folder)
            try:
                export(module, folder)
            except FileExistsError:
                pass  # another process on this machine wrote the same export first
        try:
            model = OnnxModel(folder, _input_names(module), threads)
            difference = _check(module, model)
        except ModelLoadError:
            if attempt == "fresh":
                raise
            difference = float("inf")
        if difference <= MAX_RELATIVE_DIFFERENCE or attempt == "fresh":
            break
        log.warning("%s: the cached ONNX export %s is damaged or stale; exporting again", name, folder)
        shutil.rmtree(folder, ignore_errors=True)
    if not difference <= MAX_RELATIVE_DIFFERENCE:
        raise ModelLoadError(
            f"{module.auto_model.name_or_path}: its ONNX export ({folder}) differs from torch float32 by "
            f"{difference:.2e} of the largest output on the probe texts (allowed {MAX_RELATIVE_DIFFERENCE:.0e}); "
            "use backend: torch for this model"
        )
    assert model is not None, "a difference within bounds comes from a loaded export"
    mark_used(folder)
    model.weights_version = weights_version(module.auto_model)
    module.onnx_model = model
    return model


def detach(module: Transformer) -> None:
    module.onnx_model = None


__all__ = ["BACKENDS", "OnnxModel", "attach", "cache_key", "cache_root", "check_backend", "detach", "export"]
