"""Request bodies of the HTTP API (pydantic). Type errors are caught here; limits that come
from the config (sizes, lengths) are checked by the ingress, which names the field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from raytrieve.serve import fusion


def _valid_unicode(text: str) -> str:
    # JSON's \ud800-\udfff escapes can carry lone surrogates: the tokenizers refuse them, and an
    # answer that echoes them cannot be encoded as UTF-8.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode (a lone surrogate at character {e.start}); send UTF-8 text") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]


class Strict(BaseModel):
    # NaN and Infinity (JSON literals Python accepts, or 1e400) would turn fusion scores into
    # values JSON cannot carry back.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Fusion parameters are relative (RRF's k against ranks, weights against each other): the upper
# bounds only keep products of weights and scores far from float overflow.
MAX_FUSION_PARAMETER = 1e6


class Recall(Strict):
    # default= by keyword: pyright reads a field's default only from it (Recall() in default_factory).
    dense: StrictInt = Field(default=100, ge=0)  # candidates from the dense index (0: off)
    sparse: StrictInt = Field(default=100, ge=0)


# The allowed values come from the fusion module's tables, so a new method or normalization is
# added there only. Type checkers see plain strings; pydantic (and the OpenAPI schema) the enums.
if TYPE_CHECKING:
    FusionMethod = str
    Normalization = str
else:
    FusionMethod = Literal[tuple(fusion.METHODS)]
    Normalization = Literal[fusion.NORMALIZATIONS]


class Fusion(Strict):
    """``/search``'s fusion parameters; each method reads the ones it needs (serve/fusion.py)."""

    method: FusionMethod = "rrf"
    k: StrictFloat = Field(default=60, ge=0, le=MAX_FUSION_PARAMETER)  # rrf
    dense_weight: StrictFloat = Field(default=0.5, ge=0, le=MAX_FUSION_PARAMETER)  # convex
    sparse_weight: StrictFloat = Field(default=0.5, ge=0, le=MAX_FUSION_PARAMETER)
    normalization: Normalization = "minmax"


class SearchRequest(Strict):
    query: Text
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

    input: Text | list[Text]
    model: Text | None = None
    dimensions: StrictInt | None = None
    encoding_format: Literal["float", "base64", "int8", "binary"] = "float"
    input_type: Literal["query", "document"] | None = None
    user: Text | None = None  # accepted for compatibility, unused


class SparseRequest(Strict):
    input: Text | list[Text]
    model: Text | None = None
    input_type: Literal["query", "document"] | None = None
    return_tokens: StrictBool = False
    top_k: StrictInt | None = Field(None, ge=1)  # keep the largest weights only


class RerankRequest(Strict):
    """The shape of Cohere's and TEI's rerank: query + documents -> index, relevance_score."""

    query: Text
    documents: list[Text]
    model: Text | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False
