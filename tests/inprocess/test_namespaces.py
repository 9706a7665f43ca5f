"""Namespace files written to tmp_path: the setting that loads them, precedence of
FANOUT_HISTORY/FANOUT_OVERFLOW over them, permits, and the OpenAPI document of a loaded
file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.auth import Claims, permits
from common.channels import active_namespaces, parse_channel
from common.config import (
    EDGE_SETTINGS,
    EdgeConfig,
    HistoryPolicy,
    build,
)
from common.errors import ConfigError
from common.namespaces import (
    DEFAULT,
    activate,
    load_namespaces,
)
from ingest.config import INGEST_SETTINGS, IngestConfig
from tests.unit.test_namespaces import _restore_namespaces  # noqa: F401  (autouse)


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_namespaces(missing)
    assert info.value.setting == "FANOUT_NAMESPACES_FILE" and missing in info.value.problem


# --- the setting, and precedence of FANOUT_HISTORY / FANOUT_OVERFLOW ------------------------



def test_setting_loads_the_file_for_ingest(chat_file: str) -> None:
    config = build(IngestConfig, INGEST_SETTINGS, env={"FANOUT_NAMESPACES_FILE": chat_file})
    assert config.namespaces_file == chat_file
    assert active_namespaces().names == ("chat", "alerts")
    assert dict(config.history) == {"chat": HistoryPolicy(100, 600.0),
                                    "alerts": HistoryPolicy(50, 60.0)}
    assert parse_channel("chat.lobby").spec.snapshot == "none"


def test_history_and_overflow_settings_override_the_file(chat_file: str) -> None:
    ingest = build(IngestConfig, INGEST_SETTINGS, env={
        "FANOUT_NAMESPACES_FILE": chat_file, "FANOUT_HISTORY": "chat=10/5"})
    assert dict(ingest.history) == {"chat": HistoryPolicy(10, 5.0),
                                    "alerts": HistoryPolicy(50, 60.0)}
    edge = build(EdgeConfig, EDGE_SETTINGS, env={
        "FANOUT_NAMESPACES_FILE": chat_file, "FANOUT_OVERFLOW": "alerts=disconnect"})
    assert dict(edge.overflow) == {"chat": "drop", "alerts": "disconnect"}


def test_overrides_must_name_namespaces_of_the_file(chat_file: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(IngestConfig, INGEST_SETTINGS, env={
            "FANOUT_NAMESPACES_FILE": chat_file, "FANOUT_HISTORY": "quotes=10/5"})
    assert info.value.setting == "FANOUT_HISTORY"


def test_flag_selects_the_file_too(chat_file: str) -> None:
    import argparse

    from common.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, EDGE_SETTINGS)
    config = build(EdgeConfig, EDGE_SETTINGS, env={},
                   args=parser.parse_args(["--namespaces-file", chat_file]))
    assert config.namespaces_file == chat_file and dict(config.overflow)["chat"] == "drop"


def test_bad_file_fails_the_build_naming_file_namespace_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[namespaces.chat]\npattern = "chat.{room:id}"\noverflow = "block"\n')
    with pytest.raises(ConfigError) as info:
        build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_NAMESPACES_FILE": str(path)})
    assert info.value.setting == "FANOUT_NAMESPACES_FILE"
    assert str(path) in str(info.value) and "'chat': overflow:" in str(info.value)
    assert active_namespaces() is DEFAULT  # nothing activated


# --- permissions ---------------------------------------------------------------------------


def test_permits_per_subscribe_mode(chat_file: str) -> None:
    activate(load_namespaces(chat_file))
    nobody = Claims("nobody", 0.0, ("quotes.*",))
    d1 = Claims("d1", 0.0, ())
    trader = Claims("t", 0.0, (), ("d3",))
    admin = Claims("admin", 0.0, ("alerts.*",))
    assert permits(nobody, parse_channel("chat.lobby"))  # public
    assert not permits(nobody, parse_channel("alerts.d1"))
    assert permits(d1, parse_channel("alerts.d1")) and not permits(d1, parse_channel("alerts.d2"))
    assert permits(trader, parse_channel("alerts.d3"))
    assert not permits(trader, parse_channel("alerts.d1"))
    assert permits(admin, parse_channel("alerts.d9"))  # token patterns grant too


def test_openapi_document_describes_the_loaded_namespaces(chat_file: str) -> None:
    from ingest.http_api import CHANNEL_PATTERN, openapi_document

    def pattern() -> str:
        doc = openapi_document(1 << 20, 1000)
        channel = doc["components"]["schemas"]["Message"]["properties"]["channel"]
        return str(channel["pattern"])

    assert pattern() == CHANNEL_PATTERN == DEFAULT.openapi_pattern
    activate(load_namespaces(chat_file))
    assert pattern() == active_namespaces().openapi_pattern
    assert re.search(pattern()[:-1] + r"\Z", "chat.lobby")
    assert not re.search(pattern()[:-1] + r"\Z", "quotes.MNQ")
