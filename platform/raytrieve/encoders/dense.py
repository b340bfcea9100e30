"""DenseEncoder: texts to dense vectors (bi-encoder), the sentence-transformers
``SentenceTransformer`` counterpart.

    model = DenseEncoder("all-minilm-l6-v2")            # a shipped variant or a local folder
    q = model.encode_query(["how do I sort a list"])
    d = model.encode_document(["sorted(xs) returns a new sorted list"])
    model.similarity(q, d)
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raytrieve.encoders import precision
from raytrieve.encoders import similarity as sim
from raytrieve.encoders.base import EmbeddingEncoder, texts_argument
from raytrieve.errors import InputError
from raytrieve.modules import Module, Pooling, Transformer
from raytrieve.quantization import PRECISIONS, quantize_embeddings

OutputValue = Literal["sentence_embedding", "token_embeddings"] | None


def _sentence_rows(features: dict[str, Any], truncate_dim: int | None, normalize: bool, on_device: bool) -> Tensor:
    """A batch's sentence embeddings as ``encode`` returns them (a function, not a closure: a
    pool's workers get it pickled)."""
    emb = features["sentence_embedding"].float()  # float32 whatever the compute dtype
    if truncate_dim is not None:
        emb = emb[:, :truncate_dim]
    if normalize:
        emb = F.normalize(emb, p=2, dim=1)
    return emb if on_device else emb.cpu()


class DenseEncoder(EmbeddingEncoder):
    default_prompt_names = ("query", "document")
    model_type = "SentenceTransformer"
    default_similarity = "cosine"

    def __init__(self, model: Any, *, truncate_dim: int | None = None, dtype: str = "float32", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.similarity_fn_name = sim.canonical_name(self.similarity_fn_name)
        self.truncate_dim = truncate_dim
        self.set_dtype(dtype)

    @classmethod
    def default_modules(cls, path: Path, trust_remote_code: bool = False) -> list[Module]:
        transformer = Transformer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]

    def encode(
        self,
        sentences: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: OutputValue = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | list[str] | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        task: str | None = None,
        token_budget: int | None = None,
        ranges: np.ndarray | None = None,
        calibration_embeddings: np.ndarray | None = None,
        pool: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        *,
        inputs: Any = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Embed ``sentences``; rows come back in input order, a single string gives one vector.

        ``precision`` int8 / uint8 / binary / ubinary quantizes the result (int8 buckets from
        ``ranges`` or ``calibration_embeddings`` when given, else from this batch);
        ``truncate_dim`` keeps the first dimensions (Matryoshka), before normalization.
        ``token_budget`` caps a batch's padded tokens (rows x longest row) instead of a fixed row
        count; ``batch_size`` then only caps the rows. ``sentences`` may be ``Pretokenized``.
        ``pool`` (``start_multi_process_pool``) or a list of ``device`` s runs chunks of
        ``chunk_size`` texts in worker processes (encoders/pool.py); token outputs
        (``output_value``) run in this process.
        """
        sentences = texts_argument(sentences, inputs, "encode")
        texts, single = self._as_list(sentences, "sentences")
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is not supported; choose from {list(PRECISIONS)}")
        if output_value not in ("sentence_embedding", "token_embeddings", None):
            raise InputError("output_value must be 'sentence_embedding', 'token_embeddings' or None (every output)")
        truncate_dim = truncate_dim if truncate_dim is not None else self.truncate_dim
        full_dim = self.get_embedding_dimension()
        if truncate_dim is not None and not (0 < truncate_dim <= (full_dim or truncate_dim)):
            raise InputError(f"truncate_dim={truncate_dim} must be between 1 and the embedding size {full_dim}")
        prompt = self.resolve_prompt(prompt, prompt_name)
        if output_value != "sentence_embedding":
            every = output_value is None
            here = None if isinstance(device, (list, tuple)) else device
            return self._token_embeddings(texts, single, prompt, batch_size, task, here, show_progress_bar, every)

        collect = partial(
            _sentence_rows,
            truncate_dim=truncate_dim,
            normalize=normalize_embeddings,
            on_device=convert_to_tensor and precision == "float32",
        )
        emb = self._batched(
            texts,
            batch_size=batch_size,
            task=task,
            prompt=prompt,
            device=device,
            show_progress_bar=show_progress_bar,
            collect=collect,
            token_budget=token_budget,
            empty=torch.empty(0, truncate_dim or full_dim or 0),
            pool=pool,
            chunk_size=chunk_size,
        )
        if precision != "float32":
            array = quantize_embeddings(
                emb.float().numpy(), precision, ranges=ranges, calibration_embeddings=calibration_embeddings
            )
            result: Any = torch.from_numpy(array) if convert_to_tensor else array
        elif convert_to_tensor:
            result = emb
        elif convert_to_numpy:
            result = emb.float().numpy() if emb.dtype == torch.bfloat16 else emb.numpy()
        else:
            result = list(emb)
        return result[0] if single else result

    def encode_multi_process(
        self, sentences: Sequence[str], pool: dict[str, Any], chunk_size: int | None = None, **kwargs: Any
    ) -> np.ndarray:
        """sentence-transformers' older spelling of ``encode(sentences, pool=pool)`` (numpy rows)."""
        rows = self.encode(sentences, pool=pool, chunk_size=chunk_size, convert_to_numpy=True, **kwargs)
        return np.asarray(rows)

    def _token_embeddings(self, texts, single, prompt, batch_size, task, device, show_progress_bar, every=False):
        # Per-text [n_tokens, hidden] tensors: padded rows are cut off, so batches can't be stacked.
        # ``every`` (output_value=None, as sentence-transformers): a dict per text of each
        # per-token output (cut the same way) and the sentence embedding, unnormalized.
        per_text: list[Any] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            features = self.tokenize(chunk, task=task, prompt=prompt)
            features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
            with self.inference():
                out = self.forward(features, task=task)
            masks = out["attention_mask"].bool()
            for i, mask in enumerate(masks):
                if not every:
                    per_text.append(out["token_embeddings"][i][mask].cpu())
                    continue
                row: dict[str, Any] = {}
                for name, value in out.items():
                    if not isinstance(value, Tensor) or value.shape[0] != len(chunk):
                        row[name] = value  # not one row per text: as it is (sentence-transformers too)
                        continue
                    # Per-token outputs ([batch, tokens, ...]) lose the batch's padding; the rest
                    # (the sentence embedding, whatever its width) is the text's row.
                    per_token = name != "sentence_embedding" and tuple(value.shape[:2]) == tuple(masks.shape)
                    cut = value[i][mask] if per_token else value[i]
                    row[name] = cut.float().cpu() if cut.is_floating_point() else cut.cpu()
                per_text.append(row)
        return per_text[0] if single else per_text

    def probe_outputs(self) -> Any:
        # By route and prompt, as the model is used (a Router model may have no default route).
        queries = self.encode_query(list(precision.PROBE_QUERIES), convert_to_numpy=True)
        documents = self.encode_document(list(precision.PROBE_DOCUMENTS), convert_to_numpy=True)
        return np.concatenate([queries, documents])

    def compare_probe(self, reference: Any, candidate: Any, dtype: str) -> Any:
        return precision.compare_dense(reference, candidate, dtype)
