"""Request bodies of the HTTP API (pydantic). Type errors are caught here; limits that come
from the config (sizes, lengths) are checked by the ingress, which names the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Recall(Strict):
    dense: StrictInt = Field(100, ge=0)  # candidates from the dense index (0: off)
    sparse: StrictInt = Field(100, ge=0)


class Fusion(Strict):
    method: Literal["rrf", "convex"] = "rrf"
    k: StrictInt | StrictFloat = Field(60, ge=0)  # rrf
    dense_weight: StrictInt | StrictFloat = Field(0.5, ge=0)  # convex
    sparse_weight: StrictInt | StrictFloat = Field(0.5, ge=0)
    normalization: Literal["minmax", "zscore", "none"] = "minmax"


class SearchRequest(Strict):
    query: StrictStr
    top_k: StrictInt = Field(10, ge=1)
    recall: Recall = Field(default_factory=Recall)
    fusion: Fusion = Field(default_factory=Fusion)
    rerank: StrictBool = False
    rerank_depth: StrictInt = Field(50, ge=1)
    return_text: StrictBool = True
    # Also return each stage's full candidate list (dense, sparse, fused; ids and scores), for
    # evaluating every stage of the pipeline from one request.
    return_stages: StrictBool = False


class EmbeddingsRequest(Strict):
    """OpenAI's /v1/embeddings shape, plus ``input_type`` (query/document prompt and route) and
    int8 / binary output formats."""

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    dimensions: StrictInt | None = None
    encoding_format: Literal["float", "base64", "int8", "binary"] = "float"
    input_type: Literal["query", "document"] | None = None
    user: StrictStr | None = None  # accepted for compatibility, unused


class SparseRequest(Strict):
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    input_type: Literal["query", "document"] | None = None
    return_tokens: StrictBool = False
    top_k: StrictInt | None = Field(None, ge=1)  # keep the largest weights only


class RerankRequest(Strict):
    """The shape of Cohere's and TEI's rerank: query + documents -> index, relevance_score."""

    query: StrictStr
    documents: list[StrictStr]
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False
