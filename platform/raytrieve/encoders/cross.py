"""CrossEncoder: score (query, document) pairs with one transformer pass per pair (reranker),
the sentence-transformers ``CrossEncoder`` counterpart.

    model = CrossEncoder("ms-marco-minilm-l12-v2")
    model.predict([("how many people live in berlin", "Berlin has 3.5 million people")])
    model.rank("how many people live in berlin", documents, top_k=3, return_documents=True)
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from raytrieve._io import read_json, write_json
from raytrieve.encoders import precision
from raytrieve.encoders.base import Encoder, Pretokenized, texts_argument
from raytrieve.errors import InputError
from raytrieve.modules import Module, Transformer
from raytrieve.modules.activations import activation_from_name, activation_name


def _scores(features: dict[str, Any], activation: nn.Module, apply_softmax: bool, on_device: bool) -> Tensor:
    """A batch's scores as ``predict`` returns them (a function: a pool's workers get it pickled)."""
    logits = activation(features["scores"].float())  # float32 whatever the compute dtype
    if apply_softmax and logits.shape[1] > 1:
        logits = torch.softmax(logits, dim=1)
    if logits.shape[1] == 1:
        logits = logits[:, 0]
    return logits if on_device else logits.cpu()


class CrossEncoder(Encoder):
    model_type = "CrossEncoder"
    # Set with object.__setattr__ in __init__ (a plain attribute, not a submodule).
    activation_fn: nn.Module

    def __init__(
        self,
        model: Any,
        *,
        activation_fn: nn.Module | None = None,
        max_length: int | None = None,
        dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        """``max_length``: truncate pairs to that many tokens (sentence-transformers' argument;
        the same as setting ``max_seq_length``)."""
        self._saved_activation: nn.Module | None = None
        super().__init__(model, **kwargs)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise InputError(f"max_length must be a positive number of tokens, got {max_length!r}")
            self.max_seq_length = max_length
        # Not registered as a submodule: it holds no weights and must not enter state_dict.
        object.__setattr__(self, "activation_fn", activation_fn or self._saved_activation or self._default_activation())
        self.set_dtype(dtype)

    def _check_stack(self, saved_type: str | None) -> None:
        head = self.stack[0]
        if not (isinstance(head, Transformer) and head.task == "sequence-classification") or len(self.stack) != 1:
            raise InputError(
                "CrossEncoder needs exactly one Transformer module with task='sequence-classification'; "
                f"got {[type(m).__name__ for m in self.stack]}"
                + (f" ({self.name_or_path} is a {saved_type} model)" if saved_type and self.name_or_path else "")
            )

    @classmethod
    def default_modules(cls, path: Path, trust_remote_code: bool = False) -> list[Module]:
        return [Transformer.from_pretrained(path, task="sequence-classification", trust_remote_code=trust_remote_code)]

    def _read_extra_config(self, path: Path | None, saved: dict[str, Any], trust_remote_code: bool) -> None:
        name = saved.get("activation_fn")
        if name is None and path is not None and (path / "config.json").exists():
            # sentence-transformers < 6 kept it in the transformers config.
            hf = read_json(path / "config.json")
            name = (hf.get("sentence_transformers") or {}).get("activation_fn") or hf.get(
                "sbert_ce_default_activation_function"
            )
        if name:
            # A plain attribute, not a submodule: it holds no weights.
            object.__setattr__(
                self,
                "_saved_activation",
                activation_from_name(name, trust_remote_code=trust_remote_code, where=str(path or "config")),
            )

    @property
    def max_length(self) -> int:
        """sentence-transformers' CrossEncoder name of ``max_seq_length``."""
        return self.max_seq_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        self.max_seq_length = value

    def _default_activation(self) -> nn.Module:
        return nn.Sigmoid() if self.num_labels == 1 else nn.Identity()

    def _extra_config(self) -> dict[str, Any]:
        return {"activation_fn": activation_name(self.activation_fn)}

    def save(self, path: Any) -> Path:
        out = super().save(path)
        # Also record the activation where sentence-transformers 5 looks for it.
        cfg_path = out / "config.json"
        cfg = read_json(cfg_path)
        cfg["sentence_transformers"] = {"activation_fn": activation_name(self.activation_fn)}
        write_json(cfg_path, cfg)
        return out

    @property
    def num_labels(self) -> int:
        # __init__ checked that the stack is one sequence-classification Transformer, whose
        # embedding dimension is its config's num_labels.
        return cast(Transformer, self.stack[0]).get_embedding_dimension()

    @staticmethod
    def _as_pairs(pairs: Any) -> tuple[list[tuple[str, str]], bool]:
        if isinstance(pairs, Pretokenized):
            return pairs, False  # type: ignore[return-value]
        if isinstance(pairs, (str, Mapping, set, frozenset)):
            raise InputError(
                f"sentences must be a (query, document) pair or a list of such pairs, got {type(pairs).__name__}"
            )
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
            return [pairs], True
        if isinstance(pairs, list) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
            return [tuple(pairs)], True
        out = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise InputError(f"pairs[{i}] must be a (query, document) pair of two strings, got {pair!r}")
            out.append((pair[0], pair[1]))
        return out, False

    def predict(
        self,
        sentences: Sequence[tuple[str, str]] | tuple[str, str] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: nn.Module | None = None,
        apply_softmax: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | list[str] | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        token_budget: int | None = None,
        pool: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        *,
        inputs: Any = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Scores for (query, document) pairs in input order: [n] for one label, [n, labels] else.
        ``sentences`` may be ``Pretokenized`` pairs (prompt included).

        Pairs run sorted by token length (after truncation to max_seq_length). ``token_budget``
        caps a batch's padded tokens (rows x longest pair) instead of a fixed row count, as in
        ``DenseEncoder.encode``; ``batch_size`` then only caps the rows. ``pool`` (or a list of
        ``device`` s) and ``chunk_size``: worker processes, as in ``DenseEncoder.encode``.

        The activation (sigmoid for one label by default) is applied to the logits;
        ``apply_softmax`` normalizes multi-label scores.
        """
        sentences = texts_argument(sentences, inputs, "predict")
        pairs, single = self._as_pairs(sentences)
        act = activation_fn if activation_fn is not None else self.activation_fn
        prompt = self.resolve_prompt(prompt, prompt_name)

        collect = partial(_scores, activation=act, apply_softmax=apply_softmax, on_device=convert_to_tensor)
        scores = self._batched(
            pairs,
            batch_size=batch_size,
            task=None,
            prompt=prompt,
            device=device,
            show_progress_bar=show_progress_bar,
            collect=collect,
            token_budget=token_budget,
            empty=torch.empty(0) if self.num_labels == 1 else torch.empty(0, self.num_labels),
            pool=pool,
            chunk_size=chunk_size,
        )
        if not convert_to_tensor:
            # convert_to_numpy=False without a tensor: a list of one tensor per pair, as there
            scores = scores.float().numpy() if convert_to_numpy else list(scores)
        return scores[0] if single else scores

    def set_dtype(self, dtype: str) -> str:
        """As ``Encoder.set_dtype``; under bfloat16/float16 the last linear layer (the scores) still
        computes in float32 (``precision.float32_output``)."""
        # Off before the change: int8's layer swap would carry the hook over to the new layer.
        hook = self.__dict__.pop("_head_hook", None)
        if hook is not None:
            hook.remove()
        try:
            return super().set_dtype(dtype)
        finally:  # on again for a half format, the new one or (refused) the one kept
            nested = self.__dict__.pop("_head_hook", None)  # "auto"'s guard sets formats in between
            if nested is not None:
                nested.remove()
            linears = [m for m in self.stack.modules() if isinstance(m, nn.Linear)]
            if self.dtype in precision.HALF and linears:
                # Not an attribute nn.Module tracks: a hook handle holds no weights.
                self.__dict__["_head_hook"] = precision.float32_output(linears[-1])

    def probe_outputs(self) -> Any:
        pairs = [(q, d) for q in precision.PROBE_QUERIES for d in precision.PROBE_DOCUMENTS]
        return np.asarray(self.predict(pairs, convert_to_numpy=True), dtype=np.float32)

    def compare_probe(self, reference: Any, candidate: Any, dtype: str) -> Any:
        return precision.compare_scores(reference, candidate, dtype)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        token_budget: int | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Documents sorted by score: [{"corpus_id", "score", ("text")}], best first; the first
        ``top_k`` (None: all). ``token_budget`` and the other keywords are ``predict``'s."""
        if not isinstance(query, str):
            raise InputError(f"query must be a string, got {type(query).__name__}")
        # A negative top_k would slice from the end (-1: every document but the worst, silently).
        if top_k is not None:
            try:
                k = operator.index(top_k)  # an int or a numpy integer
            except TypeError:
                k = 0
            if isinstance(top_k, bool) or k < 1:
                raise InputError(f"top_k must be a positive integer, or None for every document; got {top_k!r}")
        if isinstance(documents, str):  # one document would be read as its characters
            raise InputError("documents must be a list of strings, got one string; pass [document]")
        docs, _ = self._as_list(documents, "documents")
        if self.num_labels != 1:
            raise InputError(f"rank needs a single-label model; this one has {self.num_labels} labels")
        pairs = [(query, d) for d in docs]
        scores = self.predict(pairs, batch_size=batch_size, token_budget=token_budget, **kwargs)
        order = np.argsort(-np.asarray(scores), kind="stable")
        if top_k is not None:
            order = order[:top_k]
        results = []
        for i in order:
            hit: dict[str, Any] = {"corpus_id": int(i), "score": float(scores[i])}
            if return_documents:
                hit["text"] = docs[i]
            results.append(hit)
        return results
