"""What every HTTP request goes through around the endpoints: the bearer token, a body read
whole and bounded, metrics, and errors in one JSON shape.

    api = FastAPI(default_response_class=SafeJSONResponse)
    install(api)   # the error handlers and the guard middleware

Errors are JSON ``{"error": {"type", "message", "field", "param", "code"}}`` (OpenAI's error
object, which its SDK reads) with a 4xx status that says what was wrong: 400 unreadable body,
401 missing token, 404 unknown model or path, 413 body too large (declared or chunked), 415 a
body that is not JSON, 422 a field out of its limits or of the wrong type. TEI's routes answer
in TEI's shape instead, ``{"error": message, "error_type": "Validation", "field"}``, which its
client (huggingface_hub) shows as the message. Endpoints raise ApiError for their own
refusals. Anything else is a bug, answered 500 in the same JSON shapes.
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
import json
import re
import sys
import time
import typing
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Scope

from raytrieve.serve.config import LimitsConfig
from raytrieve.serve.schemas import BODY_TAGS, SHARED_ROUTES_TEI_KEYS, TEI, is_tei_body

# Liveness probes answer without the bearer token.
PUBLIC_PATHS = ("/healthz", "/health")


class Guarded(Protocol):
    """What the middleware reads from the app's ``state.ingress`` (one per replica process)."""

    token: str | None
    limits: LimitsConfig
    requests: Any  # ray.serve.metrics Counter by (route, status)
    latency: Any  # ray.serve.metrics Histogram by route


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.kind = status, field, message, kind


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: a string that is not valid Unicode (a lone surrogate, which
    JSON escapes may carry in) comes back \\u-escaped instead of failing the answer with a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


_BODY = "raytrieve.body"  # the scope key the guard keeps the request's body under
_TEI_FORM = "raytrieve.tei_form"  # and the error shape, once a refusal has asked for it
_UNPARSED = object()


def error_response(
    status: int,
    kind: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    tei: bool = False,
) -> JSONResponse:
    if tei:  # TEI's ErrorResponse (its error_type: Overloaded, Backend or Validation), and the field
        error_type = "Overloaded" if status in (429, 503) else "Backend" if status >= 500 else "Validation"
        return SafeJSONResponse(
            {"error": message, "error_type": error_type, "field": field}, status_code=status, headers=headers
        )
    # param and code: the names OpenAI's error object gives them (its SDK reads them as e.param, e.code)
    error = {"type": kind, "message": message, "field": field, "param": field, "code": kind}
    return SafeJSONResponse({"error": error}, status_code=status, headers=headers)


def _tei_form(scope: Scope, parsed: Any = _UNPARSED) -> bool:
    """Whether the request's error goes in TEI's shape: a route tagged TEI alone, or one tagged
    TEI and another whose body (``parsed``, else the one the guard kept; none yet for a refusal
    before it is read) has TEI's keys. A body that does not parse is nobody's form: raytrieve's
    shape there. Decided once per request: the body may be 16 MiB."""
    form = scope.get(_TEI_FORM)
    if form is None:
        try:
            form = _decide_form(scope, parsed)
        except Exception:  # an error's shape must never fail its answer
            form = False
        scope[_TEI_FORM] = form
    return bool(form)


def _decide_form(scope: Scope, parsed: Any) -> bool:
    route = _route_of(scope)
    tags = _routes_of(scope["app"]).get(route, frozenset())
    if tags == {TEI}:
        return True
    keys = SHARED_ROUTES_TEI_KEYS.get(route) if TEI in tags else None
    if keys is None:
        return False
    if isinstance(parsed, (dict, list)):  # FastAPI parsed it already (RequestValidationError.body)
        return is_tei_body(parsed, keys)
    body = scope.get(_BODY) or b""
    # Without one of the keys in the bytes it is no TEI body, unless a key is \u-escaped or the
    # body is UTF-16 or UTF-32 (json.loads reads those too: a zero byte or a BOM at the start).
    wide = body[:1] in (b"\xff", b"\xfe", b"\xef") or b"\x00" in body[:4]
    if not wide and not any(f'"{k}"'.encode() in body for k in keys) and b"\\u" not in body:
        return False
    try:
        return is_tei_body(json.loads(body), keys)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, too many digits
        return False


def _refuse(
    scope: Scope,
    status: int,
    kind: str,
    message: str,
    field: str | None,
    headers: dict[str, str] | None = None,
    parsed: Any = _UNPARSED,
) -> JSONResponse:
    """The error answer, in the shape of the request's client (``_tei_form``)."""
    return error_response(status, kind, message, field, headers, tei=_tei_form(scope, parsed))


def _answer(request: Request, status: int, kind: str, message: str, field: str | None) -> JSONResponse:
    return _refuse(request.scope, status, kind, message, field)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _answer(request, e.status, e.kind, e.message, e.field)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# pydantic names the member of a union it tried ("input.list[str].0", "input.function-after[...]",
# "documents.0.RerankDocument.text"), and a tagged body union its tag ("body.tei.inputs"): clients
# want the field, so those parts are dropped from the location. Fields are snake_case, so a
# CamelCase part is always a model's name.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-[a-z-]+\[.*\]|[A-Z][A-Za-z0-9]*)$")


def _field_of(loc: tuple[Any, ...]) -> tuple[str, int]:
    """("body", "input", "list[str]", 1) -> ("input[1]", 3): the field and how deep it lies."""
    parts: list[str] = []
    for i, x in enumerate(loc):
        if isinstance(x, int) and parts:
            parts[-1] += f"[{x}]"
        elif (i == 0 and x == "body") or (i == 1 and x in BODY_TAGS) or (i > 0 and _UNION_MEMBER.match(str(x))):
            continue
        else:
            parts.append(str(x))
    return ".".join(parts), len(loc)


# Fields other servers' clients may send that raytrieve refuses on purpose, and why (a bare
# "Extra inputs are not permitted" gives no fix).
WHY_REFUSED = {
    "max_chunks_per_doc": "documents are cut at the served model's max_seq_length (GET /info), not split into "
    "chunks; leave max_chunks_per_doc out",
    "relevant_spans": "the rerankers score whole documents; leave relevant_spans out or set its mode to disabled",
    "truncation_direction": "only the end of a text is cut (right); send right or leave it out",
}
_TOKEN_IDS = (
    "token ids are not accepted: they belong to one tokenizer (OpenAI's clients send tiktoken's), not the "
    "served model's; send the texts (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)"
)


def _token_ids(body: Any, field: str) -> bool:
    """Whether the text field (input / inputs) ``field`` names holds token ids: a list of ints
    or of lists of ints, as OpenAI's embeddings API accepts."""
    name = field.split("[")[0]
    value = body.get(name) if isinstance(body, dict) and name in ("input", "inputs") else None
    if not isinstance(value, list) or not value:
        return False
    rows = value if isinstance(value[0], list) else [value]
    return all(
        isinstance(row, list) and row and all(isinstance(t, int) and not isinstance(t, bool) for t in row)
        for row in rows
    )


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    _tei_form(request.scope, e.body)  # the body FastAPI parsed tells the error's shape
    errors = e.errors() or [{}]
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if first.get("type") == "json_invalid" or (len(loc) <= 2 and "JSON" in str(first.get("msg", ""))):
        return _answer(request, 400, "invalid_json", f"the body is not valid JSON: {first.get('msg', '')}", "body")
    if _field_of(tuple(loc))[0] == "" and not _is_json(request.headers.get("content-type")):
        # FastAPI leaves a body of another media type unparsed; say what to send rather than
        # "Input should be a valid dictionary".
        return _answer(
            request,
            415,
            "unsupported_media_type",
            f"the body must be JSON sent with Content-Type: application/json, "
            f"got {request.headers.get('content-type') or 'no Content-Type'}",
            "content-type",
        )
    if first.get("type") == "missing" and loc == ["body"]:  # no bytes at all: not JSON, as a broken body
        return _answer(request, 400, "invalid_json", "the body is empty; send a JSON object", "body")
    # The error that got deepest into the value says most ("input[0]: should be a string" for
    # a list of numbers), and a refused value more than a union member of another type; a value
    # no member of a union accepts lists what each wanted.
    located = [(*_field_of(tuple(err.get("loc", ()))), str(err.get("type", "")), _message(err)) for err in errors]
    depth = max(d for _, d, _, _ in located)
    field = next(f for f, d, _, _ in located if d == depth)
    here = [(t, m) for f, d, t, m in located if f == field and d == depth]
    refused = [(t, m) for t, m in here if not t.endswith("_type")]
    messages = list(dict.fromkeys(m for _, m in refused or here))
    unknown = [
        e["loc"] for e in errors if e.get("type") == "extra_forbidden" and _field_of(tuple(e["loc"]))[0] == field
    ]
    # The refused field itself (parameters.truncation_direction), or the one a refused value is
    # under (relevant_spans.mode): named by its path up to that part.
    parts = field.split(".")
    at = next((i for i, part in enumerate(parts) if part in WHY_REFUSED), len(parts) - 1)
    name, shown = parts[at], ".".join(parts[: at + 1])
    if name in WHY_REFUSED and any(t in ("extra_forbidden", "literal_error") for t, _ in here):
        return _answer(request, 422, "invalid_request", f"{shown}: {WHY_REFUSED[name]}", shown)
    if _token_ids(e.body, field):
        top = field.split("[")[0]
        return _answer(request, 422, "invalid_request", f"{top}: {_TOKEN_IDS}", top)
    hint = _did_you_mean(request, unknown[0]) if unknown else ""
    return _answer(
        request, 422, "invalid_request", f"{field or 'body'}: {', or '.join(messages)}{hint}", field or "body"
    )


def _message(err: dict[str, Any]) -> str:
    """pydantic's message, less the "Value error, " (or "Assertion failed, ") it puts before a
    validator's own words."""
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    """The pydantic models an annotation can hold (through unions, Annotated, lists, Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {m for arg in typing.get_args(annotation) for m in _models_in(arg)}


def _did_you_mean(request: Request, loc: Any) -> str:
    """ "; did you mean reranker_model?" for an unknown field close to one the body's model (at
    the same depth) has; "" when none is close."""
    body = getattr(request.scope.get("route"), "body_field", None)
    if body is None or not loc:
        return ""
    models = _models_in(body.field_info.annotation)
    for part in loc[:-1]:
        if isinstance(part, str) and any(part in m.model_fields for m in models):
            models = {n for m in models if part in m.model_fields for n in _models_in(m.model_fields[part].annotation)}
    known = sorted({name for m in models for name in m.model_fields})
    if loc[-1] in known:  # e.g. /rerank with documents (raytrieve, Cohere) and texts (TEI) together
        return "; it belongs to another client's form of this body, and a body is one form: send only its fields"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else ""


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Routing and body errors raised by FastAPI itself, in our error shape."""
    if e.status_code == 404:
        return _answer(request, 404, "not_found", f"no endpoint {request.url.path}", "path")
    if e.status_code == 405:  # with Starlette's Allow header: the methods the path takes (RFC 9110 15.5.6)
        message = f"{request.method} is not allowed on {request.url.path}"
        return _refuse(request.scope, 405, "method_not_allowed", message, "method", headers=dict(e.headers or {}))
    if e.status_code == 400:
        # FastAPI hides why json.loads failed (nesting too deep, an integer of too many digits,
        # bytes that are not UTF-8); the cause is what the client needs to fix.
        why = _unreadable_body(e.__cause__) if e.__cause__ is not None else e.detail
        return _answer(request, 400, "invalid_json", f"the body could not be read: {why}", "body")
    return _answer(request, e.status_code, "http_error", str(e.detail), None)


def _unreadable_body(cause: BaseException) -> str:
    """Why json.loads refused the body, in the client's terms (Python's own messages name the
    server's remedies: sys.set_int_max_str_digits, the recursion limit)."""
    if isinstance(cause, RecursionError):
        return "arrays or objects are nested too deeply; send a flatter body"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"an integer has more than {sys.get_int_max_str_digits()} digits; send fewer digits"
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 ({cause.reason} at byte {cause.start})"
    return f"{type(cause).__name__}: {str(cause)[:200]}"


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    """A bug or a failed replica is still a 500, but in the error shape clients parse."""
    return _answer(
        request,
        500,
        "internal_error",
        f"{type(e).__name__} while serving {request.url.path}; see the ingress log",
        None,
    )


class _Guard:
    """Before the app sees a request: the bearer token, then the body, read whole and bounded
    (a declared Content-Length is checked before reading; a chunked body has none, so its bytes
    are counted as they arrive). After: metrics. Pure ASGI rather than @app.middleware, so the
    body can be bounded while it streams in."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        ingress = getattr(scope["app"].state, "ingress", None) if scope["type"] == "http" else None
        if ingress is None:
            await self.app(scope, receive, send)
            return
        started, status, answered = time.perf_counter(), [500], [False]
        # HEAD is a GET without the body (RFC 9110 9.3.2: general-purpose servers must take it);
        # FastAPI's GET routes take no HEAD, so load balancers' and monitors' probes got 405.
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0], answered[0] = message["status"], True
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            refusal, body = _check_headers(ingress, scope), b""
            if refusal is None:
                refusal, body = await _read_body(scope, receive, ingress.limits.max_body_bytes)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            elif body is not None:
                scope[_BODY] = body  # for an error's shape (_tei_form): TEI's body or raytrieve's
                await self.app(scope, _replay(body, receive), send_counted)
            else:  # the client went away mid-body: nobody to answer, and not a server error
                status[0] = 499
        except asyncio.CancelledError:
            # The client went away while the app worked on its request (a timeout, a closed
            # connection): Serve cancels the call. Not a server error either, unless it had answered.
            if not answered[0]:
                status[0] = 499
            raise
        finally:
            route = _route_of(scope)
            ingress.requests.inc(tags={"route": route, "status": str(status[0])})
            ingress.latency.observe(time.perf_counter() - started, tags={"route": route})


def _route_of(scope: Scope) -> str:
    """The endpoint's path for the metrics' ``route`` tag: the route FastAPI matched, or for a
    request refused before routing (401, 413, 400) the route its path would have matched. Known
    routes only: fuzzed paths must not grow the metrics registry."""
    route = getattr(scope.get("route"), "path", None)
    if route is not None:
        return str(route)
    # Asking the routes (``route.matches``) does not do: Serve's ingress includes the app's
    # routes as one router, which matches without naming the route. Every route taking a body
    # has a fixed path, so the path itself (under the app's root path) names it; a refused GET
    # of /v1/models/{model_id} counts as "other".
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path != root:
        path = path[len(root) :]
    return path if path in _routes_of(scope["app"]) else "other"


def _routes_of(app: FastAPI) -> dict[str, frozenset[str]]:
    """Each endpoint's path and its OpenAPI tags (from the app's schema), worked out once per app."""
    routes = getattr(app.state, "raytrieve_routes", None)
    if routes is None:
        routes = {
            path: frozenset(tag for op in ops.values() if isinstance(op, dict) for tag in op.get("tags", ()))
            for path, ops in app.openapi().get("paths", {}).items()
        }
        app.state.raytrieve_routes = routes
    return routes


def _check_headers(ingress: Guarded, scope: dict[str, Any]) -> JSONResponse | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if ingress.token is not None and not scope["path"].rstrip("/").endswith(PUBLIC_PATHS):
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110 11.1: "bearer" is "Bearer"); the token is not.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1"), ingress.token.encode()
        ):
            return _refuse(
                scope,
                401,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer ...)",
                "authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )
    encoding = headers.get("content-encoding", "").strip().lower() or "identity"
    if encoding != "identity":  # RFC 9110 15.5.16: an encoding the server does not decode is a 415
        return _refuse(
            scope,
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding} is not read; send the body uncompressed",
            "content-encoding",
        )
    length = headers.get("content-length")
    if length is not None:
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
        if not (length.isascii() and length.isdigit()):
            return _refuse(scope, 400, "invalid_request", "Content-Length is not a number", "content-length")
        if int(length) > ingress.limits.max_body_bytes:
            why = f"body of {length} bytes, at most {ingress.limits.max_body_bytes}"
            return _refuse(scope, 413, "too_large", why, "body")
    return None


async def _read_body(scope: dict[str, Any], receive: Any, limit: int) -> tuple[JSONResponse | None, bytes | None]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            why = f"body over {limit} bytes (sent without Content-Length)"
            return _refuse(scope, 413, "too_large", why, "body"), b""
        chunks.append(chunk)
        if not message.get("more_body", False):
            return None, b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """The body already read, as one message; later calls wait on the client (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install(api: FastAPI) -> None:
    """The error handlers, then the guard; the guard is active once ``api.state.ingress`` is set."""
    # The decorator form: add_exception_handler's type wants handlers of any Exception.
    api.exception_handler(ApiError)(_api_error)
    api.exception_handler(RequestValidationError)(_validation_error)
    api.exception_handler(StarletteHTTPException)(_http_error)
    api.exception_handler(Exception)(_unexpected)
    api.add_middleware(_Guard)
