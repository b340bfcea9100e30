"""Request bodies of the HTTP API (pydantic). Type errors are caught here; limits that come
from the config (sizes, lengths) are checked by the ingress, which names the field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    model_validator,
)

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


class ClientBody(Strict):
    """A body other servers' clients send (OpenAI, TEI, Cohere): their SDKs send an argument
    left at None as JSON null (LangChain's CohereRerank: ``max_tokens_per_doc: null`` on every
    call; the cohere SDK: ``return_documents: null``), which those servers read as the field
    left out. So here: a null field is the field's default; unknown fields stay refused."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# Fusion parameters are relative (RRF's k against ranks, weights against each other): the upper
# bounds only keep products of weights and scores far from float overflow.
MAX_FUSION_PARAMETER = 1e6


class Recall(Strict):
    # default= by keyword: pyright reads a field's default only from it (Recall() in default_factory).
    dense: StrictInt = Field(default=100, ge=0, description="candidates from the dense index (0: off)")
    sparse: StrictInt = Field(default=100, ge=0, description="candidates from the sparse index (0: off)")


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

    method: FusionMethod = Field(
        default="rrf",
        description="rrf: reciprocal rank fusion (k); convex: a weighted sum of normalized scores (dense_weight, "
        "sparse_weight, normalization)",
    )
    k: StrictFloat = Field(
        default=60, ge=0, le=MAX_FUSION_PARAMETER, description="rrf: each list adds 1 / (k + rank), rank from 1"
    )
    dense_weight: StrictFloat = Field(
        default=0.5, ge=0, le=MAX_FUSION_PARAMETER, description="convex: the weight of the dense list's scores"
    )
    sparse_weight: StrictFloat = Field(
        default=0.5, ge=0, le=MAX_FUSION_PARAMETER, description="convex: the weight of the sparse list's scores"
    )
    normalization: Normalization = Field(
        default="minmax",
        description="convex: each list's scores before weighting: minmax (to [0, 1]), zscore, or none (as the "
        "retriever gave them)",
    )


class SearchRequest(Strict):
    query: Text
    top_k: StrictInt = Field(10, ge=1)
    recall: Recall = Field(default_factory=Recall)
    fusion: Fusion = Field(default_factory=Fusion)
    rerank: StrictBool = False
    rerank_depth: StrictInt = Field(50, ge=1)
    # The reranked head's order: this share of the cross-encoder's score, the rest the fused
    # (or single list's) score, each z-scored over the head (serve/fusion.py interpolate);
    # 1: the cross-encoder's order alone.
    rerank_weight: StrictFloat = Field(1.0, gt=0, le=1)
    return_text: StrictBool = True
    # Also return each stage's full candidate list (dense, sparse, fused; ids and scores), for
    # evaluating every stage of the pipeline from one request.
    return_stages: StrictBool = False
    # Which served model runs each stage (its name in /v1/models); unset: the kind's default.
    # A dense or sparse model searches its own index.
    dense_model: Text | None = None
    sparse_model: Text | None = None
    reranker_model: Text | None = None


class EmbeddingsRequest(ClientBody):
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
    """raytrieve's /rerank: query + documents -> index, relevance_score (the model's own score)."""

    query: Text
    documents: list[Text]
    model: Text | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False


# -- Other servers' request bodies -------------------------------------------------------------
# Field names, types and defaults as those servers define them (TEI: router/src/http/types.rs;
# Cohere: the cohere SDK's rerank calls; Jina: its /v1/rerank), so their clients work unchanged.
# What we cannot do is refused by name (422) instead of silently ignored. TEI's bodies also take
# an optional "model" here, as this app may serve several models of a kind.


class TeiTruncation(ClientBody):
    """TEI's truncation fields. Texts are always cut at the model's max_seq_length (/info says
    auto_truncate: true), so truncate only accepts what happens anyway."""

    truncate: StrictBool | None = None
    # TEI accepts both spellings; only the right side is cut here.
    truncation_direction: Literal["right", "Right"] = "right"


class TeiEmbedRequest(TeiTruncation):
    """TEI's POST /embed."""

    inputs: Text | list[Text]
    normalize: StrictBool = True
    prompt_name: Text | None = None
    dimensions: StrictInt | None = None
    model: Text | None = None  # not TEI's (one model a server): which served model


class TeiSparseRequest(TeiTruncation):
    """TEI's POST /embed_sparse (told from raytrieve's by its "inputs" key)."""

    inputs: Text | list[Text]
    prompt_name: Text | None = None
    model: Text | None = None  # not TEI's (one model a server): which served model


class TeiRerankRequest(TeiTruncation):
    """TEI's POST /rerank (told from raytrieve's by its "texts" key)."""

    query: Text
    texts: list[Text]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    model: Text | None = None  # not TEI's (one model a server): which served model


class TeiSimilarityInput(ClientBody):
    source_sentence: Text
    sentences: list[Text]


class TeiSimilarityParameters(TeiTruncation):
    prompt_name: Text | None = None


class TeiSimilarityRequest(ClientBody):
    """TEI's POST /similarity (huggingface_hub's InferenceClient.sentence_similarity posts it to
    the server's root): the cosine of the source sentence with each sentence."""

    inputs: TeiSimilarityInput
    parameters: TeiSimilarityParameters = Field(default_factory=TeiSimilarityParameters)
    model: Text | None = None  # not TEI's (one model a server): which served model


class TokenizeRequest(ClientBody):
    """TEI's POST /tokenize."""

    inputs: Text | list[Text]
    add_special_tokens: StrictBool = True
    prompt_name: Text | None = None
    model: Text | None = None  # not TEI's (one model a server): which served model


class RerankDocument(BaseModel):
    """A Cohere v1 / Jina document object: ``text`` is ranked; Cohere keeps the other (string)
    fields and echoes them back with the document."""

    model_config = ConfigDict(extra="allow")
    # pydantic's documented way to type (and so validate) the extra fields' values.
    __pydantic_extra__: dict[str, Text] = Field(init=False)  # pyright: ignore[reportIncompatibleVariableOverride]
    text: Text


class CohereRerankV1Request(ClientBody):
    """Cohere's POST /v1/rerank (cohere.Client().rerank), which is also Jina's /v1/rerank."""

    query: Text
    documents: list[Text | RerankDocument]
    model: Text | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False
    rank_fields: list[Text] | None = None
    # Not here: max_chunks_per_doc. Documents are truncated at max_seq_length, not chunked, so
    # it is refused by name rather than ignored.


class RelevantSpansOff(ClientBody):
    """Cohere's relevant_spans with ``mode: disabled``: spans are not asked for."""

    mode: Literal["disabled"]
    threshold: StrictFloat | StrictInt | None = None
    max_spans: StrictInt | None = None


class CohereRerankV2Request(ClientBody):
    """Cohere's POST /v2/rerank (cohere.ClientV2().rerank)."""

    query: Text
    documents: list[Text]
    model: Text | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    priority: StrictInt | None = Field(None, ge=0)  # a scheduling hint: accepted, no effect
    # Cohere cuts each document at this many tokens (its default 4096). A pair is cut at the served
    # model's max_seq_length anyway, so a value at least that changes nothing and is accepted; a
    # smaller one is refused by the endpoint, naming that length.
    max_tokens_per_doc: StrictInt | None = Field(None, ge=1)
    # Asking for none is fine; "enabled" is refused (http_guard.WHY_REFUSED names why).
    relevant_spans: RelevantSpansOff | None = None


# The OpenAPI tags of the routes (app.py): whose API a route speaks. /docs groups routes by
# them, and the error shape follows them: a route tagged TEI alone answers errors in TEI's shape;
# a route tagged TEI and raytrieve takes either's body (its TEI keys below) and answers in the
# shape of the body it was sent.
RAYTRIEVE, OPENAI, COHERE, TEI = "raytrieve", "OpenAI", "Cohere and Jina", "TEI"
# The routes that take raytrieve's body or TEI's, and the keys only TEI's has.
SHARED_ROUTES_TEI_KEYS = {"/embed_sparse": ("inputs",), "/rerank": ("texts",)}


def is_tei_body(body: Any, tei_keys: tuple[str, ...]) -> bool:
    """Whether a shared route's body is TEI's: it has one of TEI's own keys (not for a body
    that is no object, so its error is raytrieve's "should be an object")."""
    # A key sent as null is left out (ClientBody), so it tells nothing either.
    return isinstance(body, dict) and any(body.get(k) is not None for k in tei_keys)


def _body_kind(route: str) -> Any:
    return Discriminator(lambda body: "tei" if is_tei_body(body, SHARED_ROUTES_TEI_KEYS[route]) else "raytrieve")


def _root_kind(body: Any) -> str:
    """TEI's root routes take its one model's body; here the keys tell which (texts or query: a
    rerank; inputs that are an object: a similarity; else an embedding)."""
    if isinstance(body, dict) and (body.get("texts") is not None or body.get("query") is not None):
        return "tei-rerank"
    if isinstance(body, dict) and isinstance(body.get("inputs"), dict):
        return "tei-similarity"
    return "tei-embed"


# The tags appear in validation errors' locations; http_guard leaves them out of the field name.
# (Never a field's name: a /search field named rerank must stay in its error's location.)
BODY_TAGS = ("tei", "raytrieve", "tei-embed", "tei-rerank", "tei-similarity")
SparseBody = Annotated[
    Union[Annotated[SparseRequest, Tag("raytrieve")], Annotated[TeiSparseRequest, Tag("tei")]],  # noqa: UP007
    _body_kind("/embed_sparse"),
]
RerankBody = Annotated[
    Union[Annotated[RerankRequest, Tag("raytrieve")], Annotated[TeiRerankRequest, Tag("tei")]],  # noqa: UP007
    _body_kind("/rerank"),
]
TeiRootBody = Annotated[
    Union[  # noqa: UP007
        Annotated[TeiEmbedRequest, Tag("tei-embed")],
        Annotated[TeiRerankRequest, Tag("tei-rerank")],
        Annotated[TeiSimilarityRequest, Tag("tei-similarity")],
    ],
    Discriminator(_root_kind),
]
