"""fanout-client: the asyncio Python client of fanout's WebSocket protocol.

    from fanout_client import FanoutClient, Publication, Resync, Gap

    async with FanoutClient("ws://127.0.0.1:8000/ws") as client:
        async for event in client.subscribe("quotes.MNQ", snapshot=True):
            ...  # Publication, Resync or Gap, in order

Errors: one tree under FanoutClientError (fanout_client.errors). Depends on websockets and
msgpack only; the server package (fanout) is not needed.
"""

from fanout_client.backoff import Backoff
from fanout_client.client import (
    ClientState,
    Counters,
    Event,
    FanoutClient,
    Gap,
    Position,
    Publication,
    Resync,
    Subscription,
    advised_delay,
    retry_after,
    subscribe_retry_delay,
)
from fanout_client.errors import (
    AlreadySubscribed,
    BadChannel,
    BadRequest,
    ClosedBadRequest,
    ClosedConnectionLimit,
    ClosedForbidden,
    ClosedUnauthorized,
    ConnectionLost,
    FanoutClientError,
    FanoutClosed,
    HistoryUnavailable,
    InternalError,
    NotSubscribed,
    PermissionDenied,
    RequestFailed,
    TokenUnavailable,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
    UnknownType,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadySubscribed",
    "Backoff",
    "BadChannel",
    "BadRequest",
    "ClientState",
    "ClosedBadRequest",
    "ClosedConnectionLimit",
    "ClosedForbidden",
    "ClosedUnauthorized",
    "ConnectionLost",
    "Counters",
    "Event",
    "FanoutClient",
    "FanoutClientError",
    "FanoutClosed",
    "Gap",
    "HistoryUnavailable",
    "InternalError",
    "NotSubscribed",
    "PermissionDenied",
    "Position",
    "Publication",
    "RequestFailed",
    "Resync",
    "Subscription",
    "TokenUnavailable",
    "TooManySubscriptions",
    "Unauthorized",
    "Unavailable",
    "UnknownType",
    "__version__",
    "advised_delay",
    "retry_after",
    "subscribe_retry_delay",
]
