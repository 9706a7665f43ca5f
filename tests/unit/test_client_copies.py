"""The Python client package depends on nothing of the server, so it carries its own copies
of a few protocol facts (subprotocol names, error and close codes, the backoff schedule).
These tests keep each copy equal to the server's definition: a change on one side fails
here instead of drifting."""

from __future__ import annotations

import inspect

import fanout_client
from fanout_client import backoff as client_backoff
from fanout_client import client as client_module
from fanout_client import errors as client_errors

from common import backoff as server_backoff
from common import errors as server_errors
from common import protocol


def test_the_subprotocol_names_are_the_servers() -> None:
    assert client_module.SUBPROTOCOL_JSON == protocol.SUBPROTOCOL_JSON
    assert client_module.SUBPROTOCOL_MSGPACK == protocol.SUBPROTOCOL_MSGPACK


def test_every_request_error_code_has_its_client_class() -> None:
    server = {cls.code for cls in vars(server_errors).values()
              if inspect.isclass(cls) and issubclass(cls, server_errors.RequestError)}
    client = {cls.error_code for cls in vars(client_errors).values()
              if inspect.isclass(cls) and issubclass(cls, client_errors.RequestFailed)
              and cls.error_code}
    assert client == server


def test_every_terminal_close_code_has_its_client_class() -> None:
    """Codes 3500-3599 end a connection for good (docs/protocol.md): the client raises a
    class of its own for each; the 3000s are reconnected and need none."""
    terminal = {int(code) for code in server_errors.CloseCode if 3500 <= code < 3600}
    client = {cls.close_code for cls in vars(client_errors).values()
              if inspect.isclass(cls) and issubclass(cls, client_errors.FanoutClosed)
              and cls is not client_errors.FanoutClosed}
    assert client == terminal


def test_the_backoff_schedule_is_the_servers() -> None:
    ours = client_backoff.Backoff(rand=lambda low, high: high)
    theirs = server_backoff.Backoff(rand=lambda low, high: high)
    assert (ours.base, ours.cap) == (theirs.base, theirs.cap)
    assert [ours.next_delay() for _ in range(12)] == [theirs.next_delay() for _ in range(12)]


def test_a_position_has_the_servers_fields() -> None:
    assert fanout_client.Position.__dataclass_fields__.keys() == \
        protocol.Position.__dataclass_fields__.keys()
