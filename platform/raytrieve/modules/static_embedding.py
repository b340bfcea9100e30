"""Inference-free sparse encoding: one learned weight per vocabulary token present in the text.

Used on the query side of asymmetric SPLADE models (Router): a query costs a tokenizer call
and a lookup, no transformer forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raytrieve._io import load_weights, read_json, save_weights, write_json
from raytrieve.errors import ModelLoadError
from raytrieve.modules.base import Features, Module
from raytrieve.modules.transformer import pad_ids


class SparseStaticEmbedding(Module):
    st_type = "sentence_transformers.sparse_encoder.models.SparseStaticEmbedding"
    st_aliases = ("sentence_transformers.sparse_encoder.modules.sparse_static_embedding.SparseStaticEmbedding",)
    has_weights = True

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, weight: torch.Tensor | None = None, frozen: bool = False
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        if weight is None:
            weight = torch.ones(len(tokenizer.get_vocab()))
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=not frozen)
        self.frozen = frozen
        self.num_dimensions = int(self.weight.shape[0])
        self.max_seq_length = min(int(tokenizer.model_max_length), 1_000_000)

    def tokenize_ids(self, texts: Sequence[str], prompt: str | None = None) -> dict[str, list[list[int]]]:
        if prompt:
            texts = [prompt + t for t in texts]
        if not texts:
            return {"input_ids": []}
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_seq_length,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"]}

    def collate(self, encoded: dict[str, list[list[int]]]) -> Features:
        # transformers types pad_token_id (a __getattr__ special token) as any id or token.
        return pad_ids(encoded, cast("int | None", self.tokenizer.pad_token_id) or 0)

    def tokenize(self, texts: Sequence[str], prompt: str | None = None, **kwargs: Any) -> Features:
        return self.collate(self.tokenize_ids(texts, prompt))

    def forward(self, features: Features, **kwargs: Any) -> Features:
        input_ids, mask = features["input_ids"], features["attention_mask"]
        presence = torch.zeros(input_ids.shape[0], self.num_dimensions, device=input_ids.device, dtype=torch.int64)
        presence.scatter_(1, input_ids, mask.to(torch.int64))
        emb = presence * self.weight
        if "sentence_embedding" in features:
            emb = emb * features["sentence_embedding"]
        features["sentence_embedding"] = emb
        return features

    def get_embedding_dimension(self) -> int:
        return self.num_dimensions

    def config_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        save_weights(self, directory)
        write_json(directory / self.config_file, self.config_dict())

    @classmethod
    def load(cls, directory: Path, trust_remote_code: bool = False, **kwargs: Any) -> SparseStaticEmbedding:
        directory = Path(directory)
        config = read_json(directory / cls.config_file) if (directory / cls.config_file).exists() else {}
        if "path" in config:
            raise ModelLoadError(f"{directory}: SparseStaticEmbedding from an idf.json path is not supported")
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{directory}: SparseStaticEmbedding needs its tokenizer files ({e})") from e
        module = cls(tokenizer, frozen=bool(config.get("frozen", False)))
        load_weights(module, directory)
        return module
