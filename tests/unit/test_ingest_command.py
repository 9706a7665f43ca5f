"""`fanout ingest`'s feed settings: checked at start, secrets kept out of the repr."""

from __future__ import annotations

import pytest

from common.config import build
from common.errors import ConfigError
from ingest.config import INGEST_SETTINGS, IngestConfig, check_ingest


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"FANOUT_FEED": "ws"}, "FANOUT_WS_URL"),
        ({"FANOUT_FEED": "ws", "FANOUT_WS_URL": "ws://h/x"}, "FANOUT_WS_MAPPING"),
        ({"FANOUT_FEED": "projectx"}, "FANOUT_PROJECTX_TOKEN"),
        ({"FANOUT_FEED": "projectx", "FANOUT_PROJECTX_TOKEN": "t"}, "FANOUT_PROJECTX_CONTRACTS"),
        ({"FANOUT_API_PORT": "8090"}, "FANOUT_API_KEYS"),
        ({"FANOUT_RECONNECT_BASE": "5", "FANOUT_RECONNECT_CAP": "1"}, "FANOUT_RECONNECT_CAP"),
    ],
)
def test_feed_settings_are_checked_at_start(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_ingest(build(IngestConfig, INGEST_SETTINGS, env=env))
    assert info.value.setting == setting


def test_secrets_stay_out_of_the_repr() -> None:
    config = build(IngestConfig, INGEST_SETTINGS, env={
        "FANOUT_API_KEYS": "k-secret", "FANOUT_PROJECTX_TOKEN": "jwt-secret",
        "FANOUT_WS_HEADERS": '{"Authorization": "Bearer h-secret"}',
        "FANOUT_WS_URL": "wss://feed/x?token=u-secret",
    })
    assert config.api_keys == ("k-secret",)
    assert "secret" not in repr(config)
