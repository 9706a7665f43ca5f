"""The HTTP publish API: backend services publish to channels through ingest.

`POST /api/publish` publishes one message, `POST /api/publish/batch` up to `max_batch` in
order; both answer with the offsets and epoch the publish script assigned. Every request is
checked whole before anything is sent (authentication, content type, body size, JSON, the
shape of every message, every channel and key), so bad input is a 4xx and publishes
nothing. A Redis failure is a 503 whose outcome is unknown: a retry with the same message
ids is exact, because the publish script answers a known id with its first offset
(`duplicate: true`). docs/http-api.md is the user's guide; `GET /api/openapi.json` the
schema.

No exception text from inside the server reaches a client, and API keys never reach a log
line: a request is logged with the 1-based index of the key it used (``key=2``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common import strictjson
from common.broker import BrokerUnavailable
from common.channels import (
    MAX_CHANNEL_LENGTH,
    MAX_KEY_LENGTH,
    MAX_MESSAGE_ID_LENGTH,
    active_namespaces,
    parse_channel,
    validate_key,
)
from common.errors import BadChannel
from common.namespaces import DEFAULT as DEFAULT_NAMESPACES
from ingest.publisher import InvalidMessage, PublishResult
from ingest.upstream import UpstreamMessage

DEFAULT_MAX_BODY = 1 << 20  # bytes of one request body
DEFAULT_MAX_BATCH = 1_000  # messages of one batch request
DEFAULT_PUBLISH_TIMEOUT = 10.0  # s for the Redis round trip before answering 503
RETRY_AFTER = "1"  # s, on a 503

MESSAGE_FIELDS = frozenset({"channel", "data", "key", "id", "delete", "if_changed"})

Handler = Callable[[Request], Awaitable[Response]]


class BatchPublisher(Protocol):
    """What the API publishes through: `ingest.publisher.Publisher`, or a wrapper of it
    (one that adds a fencing token, say). Must raise `InvalidMessage` before sending
    anything for bad input, and `BrokerUnavailable`/`OSError`/`TimeoutError` when the broker
    fails."""

    async def publish_batch(
        self, messages: Sequence[UpstreamMessage]
    ) -> list[PublishResult]: ...


class ApiError(Exception):
    """A request that fails with `status` and a stable `code`; `message` goes to the client."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        index: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.index = index
        self.headers = headers

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.index is not None:
            error["index"] = self.index
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def _bad(code: str, message: str, index: int | None = None) -> NoReturn:
    raise ApiError(400, code, message, index=index)


class KeyRing:
    """The accepted API keys. Compares SHA-256 digests with `hmac.compare_digest`, against
    every key without stopping at a match, so that timing reveals neither a key's bytes
    nor its length nor which key matched."""

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str):
            raise TypeError("api_keys must be a sequence of keys, not one string")
        keys = list(keys)
        if not keys:
            raise ValueError("the HTTP publish API needs at least one API key")
        for number, key in enumerate(keys, 1):
            if not key or key != key.strip():
                raise ValueError(
                    f"API key #{number} is empty or has surrounding whitespace"
                )
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._digests)} keys)"

    def match(self, presented: str) -> int | None:
        """The 1-based index of the key `presented` is, or None."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = 0
        for number, known in enumerate(self._digests, 1):
            if hmac.compare_digest(digest, known):
                found = number
        return found or None


def presented_key(request: Request) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    api_key = request.headers.get("x-api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


def _check_content_type(request: Request) -> None:
    value = request.headers.get("content-type", "")
    media_type, *params = (part.strip() for part in value.split(";"))
    ok = media_type.lower() == "application/json"
    for param in params:
        name, _, arg = param.partition("=")
        if name.strip().lower() == "charset" and arg.strip().strip('"').lower() not in (
            "utf-8", "utf8",
        ):
            ok = False
    if not ok:
        raise ApiError(
            415, "unsupported_media_type",
            "the body must be JSON: send Content-Type: application/json (UTF-8)",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes: a declared Content-Length over it is refused
    before reading, and the stream is cut off as soon as it passes it (a client may send
    more than it declared, or declare nothing with chunked encoding)."""
    too_large = ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            _bad("bad_request", "Content-Length is not a number")
        if length > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Strict JSON (common/strictjson.py): UTF-8, no NaN/Infinity (the publisher could not
    store them), no unpaired surrogates (Redis could not take them)."""
    try:
        return strictjson.loads(body)
    except UnicodeDecodeError:
        _bad("malformed_json", "the body is not UTF-8")
    except RecursionError:
        _bad("malformed_json", "the body is nested too deeply")
    except ValueError as exc:  # json.JSONDecodeError is one
        _bad("malformed_json", f"the body is not valid JSON: {exc}")


def parse_message(item: object, index: int | None = None) -> UpstreamMessage:
    """One message object, checked field by field (the channel and key as the publisher
    will check them), so that a batch fails before any of it is sent."""
    where = "" if index is None else f"messages[{index}]: "
    if not isinstance(item, dict):
        _bad("bad_request", f"{where}a message must be a JSON object", index)
    unknown = sorted(set(item) - MESSAGE_FIELDS)
    if unknown:
        _bad(
            "bad_request",
            f"{where}unknown field(s) {', '.join(map(repr, unknown))}: expected "
            "channel, data, key, id, delete, if_changed",
            index,
        )
    if "channel" not in item:
        _bad("bad_request", f"{where}'channel' is required", index)
    if "data" not in item:
        _bad("bad_request", f"{where}'data' is required (any JSON value)", index)
    channel = item["channel"]
    try:
        parse_channel(channel)
    except BadChannel as exc:
        _bad("bad_channel", f"{where}{exc.message}", index)
    key = item.get("key", "")
    try:
        validate_key(key)
    except ValueError as exc:
        _bad("bad_key", f"{where}{exc}", index)
    msg_id = item.get("id", "")
    if not isinstance(msg_id, str) or len(msg_id) > MAX_MESSAGE_ID_LENGTH:
        _bad(
            "bad_request",
            f"{where}'id' must be a string of at most {MAX_MESSAGE_ID_LENGTH} characters",
            index,
        )
    delete = item.get("delete", False)
    if not isinstance(delete, bool):
        _bad("bad_request", f"{where}'delete' must be true or false", index)
    if_changed = item.get("if_changed", False)
    if not isinstance(if_changed, bool):
        _bad("bad_request", f"{where}'if_changed' must be true or false", index)
    return UpstreamMessage(channel, item["data"], key, msg_id, delete, if_changed)


def parse_batch(body: object, max_batch: int) -> list[UpstreamMessage]:
    if not isinstance(body, dict):
        _bad("bad_request", 'the body must be a JSON object: {"messages": [...]}')
    unknown = sorted(set(body) - {"messages"})
    if unknown:
        _bad("bad_request", f"unknown field(s) {', '.join(map(repr, unknown))}: expected messages")
    items = body.get("messages")
    if not isinstance(items, list):
        _bad("bad_request", "'messages' must be an array of message objects")
    if not items:
        _bad("bad_request", "'messages' must not be empty")
    if len(items) > max_batch:
        _bad("too_many_messages", f"a batch holds at most {max_batch} messages, got {len(items)}")
    return [parse_message(item, index) for index, item in enumerate(items)]


def result_dict(result: PublishResult) -> dict[str, Any]:
    return {
        "channel": result.channel,
        "offset": result.offset,
        "epoch": result.epoch,
        "duplicate": result.duplicate,
        "unchanged": result.unchanged,
    }


@dataclass
class PublishApi:
    """The endpoints; `create_api_app` routes to them."""

    publisher: BatchPublisher
    keys: KeyRing
    max_body: int
    max_batch: int
    publish_timeout: float
    log: logging.Logger

    def __post_init__(self) -> None:
        self.openapi = openapi_document(self.max_body, self.max_batch)

    async def publish_one(self, request: Request) -> Response:
        messages, key_number = await self._read_request(request, batch=False)
        results = await self._publish(request, messages, key_number)
        return JSONResponse(result_dict(results[0]))

    async def publish_batch(self, request: Request) -> Response:
        messages, key_number = await self._read_request(request, batch=True)
        results = await self._publish(request, messages, key_number)
        return JSONResponse({"results": [result_dict(r) for r in results]})

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _read_request(
        self, request: Request, *, batch: bool
    ) -> tuple[list[UpstreamMessage], int]:
        """Every check, cheapest and least revealing first: the key before anything else."""
        presented = presented_key(request)
        if presented is None:
            raise ApiError(
                401, "unauthorized",
                "an API key is required: Authorization: Bearer <key>, or X-API-Key: <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key_number = self.keys.match(presented)
        if key_number is None:
            raise ApiError(
                401, "unauthorized", "the API key is not valid",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        _check_content_type(request)
        body = parse_json(await read_body(request, self.max_body))
        if batch:
            return parse_batch(body, self.max_batch), key_number
        return [parse_message(body)], key_number

    async def _publish(
        self, request: Request, messages: list[UpstreamMessage], key_number: int
    ) -> list[PublishResult]:
        try:
            async with asyncio.timeout(self.publish_timeout):
                results = await self.publisher.publish_batch(messages)
        except InvalidMessage as exc:  # parse_message checks what the publisher does
            raise ApiError(400, "bad_request", str(exc)) from None
        except (BrokerUnavailable, OSError, TimeoutError) as exc:
            self.log.warning(
                "api publish failed path=%s key=%d messages=%d error=%r",
                request.url.path, key_number, len(messages), exc,
            )
            raise ApiError(
                503, "unavailable",
                "the message store is unavailable; the outcome is unknown: retry later with "
                "the same message ids",
                headers={"Retry-After": RETRY_AFTER},
            ) from None
        duplicates = sum(r.duplicate for r in results)
        unchanged = sum(r.unchanged for r in results)
        self.log.debug(
            "api published path=%s key=%d messages=%d duplicates=%d unchanged=%d",
            request.url.path, key_number, len(results), duplicates, unchanged,
        )
        return results


def _guarded(api: PublishApi, handler: Handler) -> Handler:
    """Turn every failure into a JSON error: ApiError as it says, anything else a bare 500
    (its stack trace goes to the log only)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            client = request.client.host if request.client else "-"
            level = logging.WARNING if exc.status == 401 else logging.INFO
            api.log.log(
                level, "api request rejected path=%s status=%d code=%s client=%s",
                request.url.path, exc.status, exc.code, client,
            )
            return exc.response()
        except Exception:
            api.log.exception("api request failed path=%s", request.url.path)
            return ApiError(500, "internal", "internal server error").response()

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 as JSON errors too, like everything else the API answers."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers).response()


def create_api_app(
    publisher: BatchPublisher,
    api_keys: Sequence[str],
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
    logger: logging.Logger,
) -> Starlette:
    """The publish API as an ASGI app. It owns neither the publisher nor its Redis client:
    whoever serves it starts and closes those. Raises ValueError for no keys or bad limits."""
    if max_body < 64:
        raise ValueError(f"max_body must be at least 64 bytes, got {max_body}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if not publish_timeout > 0:
        raise ValueError(f"publish_timeout must be > 0, got {publish_timeout}")
    api = PublishApi(publisher, KeyRing(api_keys), max_body, max_batch, publish_timeout, logger)
    app = Starlette(
        routes=[
            Route("/api/publish", _guarded(api, api.publish_one), methods=["POST"]),
            Route("/api/publish/batch", _guarded(api, api.publish_batch), methods=["POST"]),
            Route("/api/openapi.json", _guarded(api, api.openapi_json), methods=["GET"]),
            Route("/healthz", _guarded(api, api.healthz), methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.api = api
    return app


# --- OpenAPI ------------------------------------------------------------------------------

# The channel grammar of the shipped namespaces as one regular expression (length aside);
# the document describes the loaded ones (FANOUT_NAMESPACES_FILE).
CHANNEL_PATTERN = DEFAULT_NAMESPACES.openapi_pattern


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi_document(max_body: int, max_batch: int) -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API, with this server's limits."""
    errors = {
        "400": _error_response(
            "Malformed JSON, a wrong shape, a bad channel, key or id (codes malformed_json, "
            "bad_request, bad_channel, bad_key, too_many_messages). Nothing was published."
        ),
        "401": _error_response("Missing or invalid API key (code unauthorized)."),
        "413": _error_response(
            f"The body exceeds {max_body} bytes (code body_too_large). Nothing was published."
        ),
        "415": _error_response(
            "The body is not sent as application/json in UTF-8 (code unsupported_media_type)."
        ),
        "500": _error_response("An unexpected server error (code internal)."),
        "503": _error_response(
            "The message store is unavailable (code unavailable). The outcome is unknown: "
            "retry after Retry-After seconds with the same message ids."
        ),
    }
    security: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
    json_body = "application/json"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fanout publish API",
            "version": "1",
            "description": (
                "Publish messages to fanout channels. Offsets are assigned per channel, in "
                "order, gapless. A message with an `id` is published once per channel (within "
                "the idempotency TTL): sending it again answers with its first offset and "
                "`duplicate: true`, which makes retries safe. A message with `if_changed` "
                "is published only if it changes the channel's snapshot (else `unchanged: "
                "true`). A 4xx publishes nothing."
            ),
        },
        "paths": {
            "/api/publish": {
                "post": {
                    "operationId": "publish",
                    "summary": "Publish one message",
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            json_body: {"schema": {"$ref": "#/components/schemas/Message"}}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Published, a duplicate of a known id, or unchanged.",
                            "content": {
                                json_body: {
                                    "schema": {"$ref": "#/components/schemas/PublishResult"}
                                }
                            },
                        },
                        **errors,
                    },
                }
            },
            "/api/publish/batch": {
                "post": {
                    "operationId": "publishBatch",
                    "summary": "Publish several messages, in order, in one round trip",
                    "description": (
                        "The whole batch is validated first: if any message is invalid the "
                        "answer is a 400 naming its index and nothing is published."
                    ),
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            json_body: {"schema": {"$ref": "#/components/schemas/BatchRequest"}}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "One result per message, in request order.",
                            "content": {
                                json_body: {
                                    "schema": {"$ref": "#/components/schemas/BatchResult"}
                                }
                            },
                        },
                        **errors,
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document.",
                            "content": {json_body: {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness of the API process",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The process serves requests.",
                            "content": {
                                json_body: {"schema": {"$ref": "#/components/schemas/Health"}}
                            },
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <API key>",
                },
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Message": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["channel", "data"],
                    "properties": {
                        "channel": {
                            "type": "string",
                            "maxLength": MAX_CHANNEL_LENGTH,
                            "pattern": active_namespaces().openapi_pattern,
                            "description": (
                                "A fanout channel (docs/protocol.md), e.g. quotes.MNQ, "
                                "bars.1m.ES, account.42.orders."
                            ),
                            "examples": ["account.42.orders"],
                        },
                        "data": {
                            "description": (
                                "The payload: any JSON value. Channels that merge "
                                "(quotes.*, account.*.balance) merge object fields into the "
                                "snapshot."
                            ),
                        },
                        "key": {
                            "type": "string",
                            "maxLength": MAX_KEY_LENGTH,
                            "pattern": "^[^\\u0000-\\u001f]*$",
                            "default": "",
                            "description": (
                                "Snapshot key on keyed channels (depth.*, account.*.orders, "
                                "account.*.positions): an order id, a price level."
                            ),
                        },
                        "id": {
                            "type": "string",
                            "maxLength": MAX_MESSAGE_ID_LENGTH,
                            "default": "",
                            "description": (
                                "Idempotency id, unique per channel: a message with a known id "
                                "is not published again. Empty: no idempotency."
                            ),
                        },
                        "delete": {
                            "type": "boolean",
                            "default": False,
                            "description": "Remove `key` from a keyed channel's snapshot.",
                        },
                        "if_changed": {
                            "type": "boolean",
                            "default": False,
                            "description": (
                                "A state, not an event: publish only if it changes the "
                                "channel's snapshot (a new value for `key`, a delete of a "
                                "`key` that is there, a merge that changes a field); else "
                                "nothing is published and the result says `unchanged`."
                            ),
                        },
                    },
                },
                "BatchRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["messages"],
                    "properties": {
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": max_batch,
                            "items": {"$ref": "#/components/schemas/Message"},
                        }
                    },
                },
                "PublishResult": {
                    "type": "object",
                    "required": ["channel", "offset", "epoch", "duplicate", "unchanged"],
                    "properties": {
                        "channel": {"type": "string"},
                        "offset": {
                            "type": "integer",
                            "minimum": 0,
                            "description": (
                                "The message's offset in its channel; for an unchanged "
                                "message, the channel's last offset (0 if it has none)."
                            ),
                        },
                        "epoch": {
                            "type": "string",
                            "description": (
                                "The channel's epoch: offsets count within it (\"\" for an "
                                "unchanged message on a channel that has none yet)."
                            ),
                        },
                        "duplicate": {
                            "type": "boolean",
                            "description": "The id was already published: offset is its first.",
                        },
                        "unchanged": {
                            "type": "boolean",
                            "description": (
                                "Sent with if_changed and equal to the snapshot's state: not "
                                "published."
                            ),
                        },
                    },
                },
                "BatchResult": {
                    "type": "object",
                    "required": ["results"],
                    "properties": {
                        "results": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/PublishResult"},
                        }
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {
                                    "type": "string",
                                    "enum": [
                                        "malformed_json", "bad_request", "bad_channel",
                                        "bad_key", "too_many_messages", "unauthorized",
                                        "body_too_large", "unsupported_media_type",
                                        "unavailable", "internal", "not_found",
                                        "method_not_allowed", "http_error",
                                    ],
                                },
                                "message": {"type": "string"},
                                "index": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "description": "In a batch: the index of the bad message.",
                                },
                            },
                        }
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "const": "ok"}},
                },
            },
        },
    }
