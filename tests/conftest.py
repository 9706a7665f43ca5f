"""The three tiers, by folder: tests/unit (no I/O at all; enforced by tests/unit/conftest.py),
tests/inprocess (ASGI apps over httpx, socketpairs, fakes of servers, temporary files) and
tests/integration (a real Valkey, servers on loopback ports, subprocesses, browsers). Each
test gets its folder's marker, so `-m unit` or `-m "not integration"` select by tier; the
fixtures that start servers live in tests/integration/conftest.py, so the other tiers never
load them.
"""

from __future__ import annotations

from pathlib import Path

import hypothesis  # noqa: F401  (loaded up front: a lazy import at session end trips a CPython 3.11 AST bug)
import pytest

from common.auth import PrivateKey
from tests.support.jwtkeys import generate_keys

TIERS = ("unit", "inprocess", "integration")
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with the tier of its folder; a test outside the three folders, or
    marked with another tier than its folder's, is an error rather than a silent mix."""
    for item in items:
        path = item.path.resolve()
        if not path.is_relative_to(HERE):
            continue  # another project's tests (clients/...): not tiered here
        parts = path.relative_to(HERE).parts
        tier = parts[0] if len(parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests go in tests/{{{','.join(TIERS)}}}/")
        others = [m.name for m in item.iter_markers() if m.name in TIERS and m.name != tier]
        if others:
            raise pytest.UsageError(f"{item.nodeid} is in tests/{tier}/ but marked {others[0]}")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def keys() -> dict[str, PrivateKey]:
    """RSA 2048 (two), EC P-256 and P-384, Ed25519: generated in the test process."""
    return generate_keys()


CHAT = """
[namespaces.chat]
pattern = "chat.{room:id:32}"
snapshot = "none"
history_length = 100
history_age = 600
overflow = "drop"
subscribe = "public"

[namespaces.alerts]
pattern = "alerts.{desk:id}"
snapshot = "last"
history_length = 50
history_age = 60
overflow = "conflate"
subscribe = "account"
account_segment = "desk"
account_claims = ["accounts", "sub"]
recovery = false
max_rate = 5
"""


@pytest.fixture
def chat_file(tmp_path: Path) -> str:
    """A namespaces file of two namespaces unlike the shipped ones (the inprocess and the
    integration namespace tests load it)."""
    path = tmp_path / "namespaces.toml"
    path.write_text(CHAT)
    return str(path)
