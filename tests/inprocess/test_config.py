"""Configuration from config files and secret files written to tmp_path (common/config.py),
and `fanout config check`.

Every test passes its own `env` mapping, so the process environment is never read (the
`fanout config check` tests clear the FANOUT_ variables first).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from common.config import (
    DEFAULT_OVERFLOW,
    EDGE_SETTINGS,
    EdgeConfig,
    HistoryPolicy,
    RedisSettings,
    Source,
)
from common.errors import ConfigError
from fanout.config import load
from tests.unit.test_config import ROOT, flags

# --- the config file: defaults < file < environment < flags ----------------------------------


def write(tmp_path: Path, text: str, name: str = "fanout.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_file_values_are_typed_toml_or_strings_for_the_same_parsers(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [redis]
        url = "redis://cache:6379/1"
        key_prefix = "md"
        [edge]
        port = "9001"                 # a string goes through the parser, as from env
        ping_interval = 2.5
        queue_max_messages = 5
        compression = true
        overflow = {quotes = "drop"}
        auth_channels = ["quotes.*", "bars.*"]
        gc_thresholds = "python"
        [ingest]
        symbols = ["ES", "NQ"]
        history = {bars = "10/60"}
        projectx_accounts = [1, 2]
        ws_mapping = {channel = "quotes.{s}", id = "seq"}
        ws_subscribe = [{op = "subscribe"}]
    """)
    e = load("edge", env={}, path=path)
    assert e.config == EdgeConfig(
        redis=RedisSettings("redis://cache:6379/1", "md"), port=9001, ping_interval=2.5,
        queue_max_messages=5, compression=True,
        overflow={**DEFAULT_OVERFLOW, "quotes": "drop"},
        auth_channels=("quotes.*", "bars.*"), gc_thresholds=None,
    )
    assert e.sources["port"] == Source("file", f"{path}: [edge] port")
    assert e.sources["redis.url"] == Source("file", f"{path}: [redis] url")
    assert e.sources["host"] == Source("default")
    i = load("ingest", env={}, path=path).config
    assert i.redis.key_prefix == "md"  # [redis] is shared
    assert i.sim.symbols == ("ES", "NQ")
    assert i.history["bars"] == HistoryPolicy(10, 60.0)
    assert i.projectx.accounts == (1, 2)
    assert json.loads(i.ws.mapping) == {"channel": "quotes.{s}", "id": "seq"}
    assert json.loads(i.ws.subscribe) == [{"op": "subscribe"}]


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge]\nport = 1001\nhost = '10.0.0.1'\n")
    env = {"FANOUT_EDGE_PORT": "1002"}
    assert load("edge", env={}, path=path).config.port == 1001
    loaded = load("edge", env=env, path=path)
    assert (loaded.config.port, loaded.config.host) == (1002, "10.0.0.1")
    assert loaded.sources["port"] == Source("env", "FANOUT_EDGE_PORT")
    loaded = load("edge", env=env, args=flags("edge", ["--port", "1003", "--config", path]))
    assert loaded.config.port == 1003
    assert loaded.sources["port"] == Source("flag", "--port")
    assert loaded.sources["host"] == Source("file", f"{path}: [edge] host")


def test_the_file_comes_from_the_flag_or_fanout_config(tmp_path: Path) -> None:
    a = write(tmp_path, "[edge]\nport = 1\n", "a.toml")
    b = write(tmp_path, "[edge]\nport = 2\n", "b.toml")
    assert load("edge", env={"FANOUT_CONFIG": a}).config.port == 1
    assert load("edge", env={"FANOUT_CONFIG": a}, args=flags("edge", ["--config", b])
                ).config.port == 2
    assert load("edge", env={"FANOUT_CONFIG": ""}).file is None


def test_an_empty_string_in_the_file_is_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge]\nnode_id = ''\n")
    assert load("edge", env={}, path=path).sources["node_id"] == Source("default")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[edge]\nport = 70000\n", "{path}: [edge] port: must be between 0 and 65535, got 70000"),
        ("[edge]\nport = 'x'\n", "{path}: [edge] port: must be an integer, got 'x'"),
        ("[edge]\nqueue_max_mesages = 5\n",
         "{path}: [edge] queue_max_mesages: unknown setting; did you mean queue_max_messages?"),
        ("[ingest]\nqueue_max_messages = 5\n",
         "{path}: [ingest] queue_max_messages: unknown setting; it belongs in "
         "[edge] queue_max_messages"),
        ("[egde]\nport = 1\n", "{path}: [egde]: unknown section; did you mean edge?"),
        ("port = 1\n", "{path}: port: settings go in a section: [redis], [edge], [ingest]; "
         "did you mean [edge] port?"),
        ("[edge]\nauth_secret = 'x'\n",
         "{path}: [edge] auth_secret: secrets are not read from the config file: set "
         "FANOUT_AUTH_SECRET or FANOUT_AUTH_SECRET_FILE in the environment, or "
         "auth_secret_file = \"/path/to/file\" here"),
        ("[redis]\nurl = 'redis://:pw@h/0'\n",
         "{path}: [redis] url: holds credentials, which do not belong in the config file: "
         "set FANOUT_REDIS_URL or FANOUT_REDIS_URL_FILE, or url_file = \"/path/to/file\""),
        ("[edge]\nstarted = 1979-05-27\n", "{path}: [edge] started: unknown setting"),
        ("[edge]\nauth_issuer = 1979-05-27\n",
         "{path}: [edge] auth_issuer: unsupported value date: give a string, number, "
         "boolean, or an array or table of strings and numbers"),
        ("[edge]\nauth_channels = [['a']]\n",
         "{path}: [edge] auth_channels: unsupported value list: give a string, number, "
         "boolean, or an array or table of strings and numbers"),
        ("[edge]\nauth_secret_file = 1\n",
         "{path}: [edge] auth_secret_file: must be the name of a file"),
        ("[edge]\nport_file = 'x'\n",
         "{path}: [edge] port_file: unknown setting; did you mean port?"),
    ],
)
def test_file_errors_name_the_file_section_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load("edge", env={}, path=path)
    assert str(info.value) == message.format(path=path)


def test_a_section_of_another_command_is_checked_but_not_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingest]\nrate = 0\n")  # a bad value for ingest
    assert load("edge", env={}, path=path).config == EdgeConfig()
    with pytest.raises(ConfigError, match=r"\[ingest\] rate: must be a finite number > 0"):
        load("ingest", env={}, path=path)


def test_bad_toml_and_missing_files_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load("edge", env={}, path=path)
    assert info.value.setting == path
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load("edge", env={"FANOUT_CONFIG": missing})
    assert str(info.value) == f"{missing}: cannot read the config file: No such file or directory"


def test_cross_setting_checks_run_on_the_loaded_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingest]\nfeed = 'ws'\n")
    with pytest.raises(ConfigError) as info:
        load("ingest", env={}, path=path)
    assert info.value.setting == "FANOUT_WS_URL"


def test_secret_from_a_file_variable(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    loaded = load("edge", env={"FANOUT_AUTH_SECRET_FILE": str(secret)})
    assert loaded.config.auth_secret == "s" * 40  # the trailing newline stripped
    assert loaded.sources["auth_secret"] == Source("env", "FANOUT_AUTH_SECRET_FILE")
    url = tmp_path / "url"
    url.write_text("redis://:pw@h:1/0\r\n")
    assert load("ingest", env={"FANOUT_REDIS_URL_FILE": str(url)}
                ).config.redis.url == "redis://:pw@h:1/0"
    keys = tmp_path / "keys"
    keys.write_text("k1,k2")
    assert load("ingest", env={"FANOUT_API_KEYS_FILE": str(keys)}).config.api_keys == (
        "k1", "k2")


def test_secret_file_variable_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load("edge", env={"FANOUT_AUTH_SECRET_FILE": str(tmp_path / "none")})
    assert info.value.setting == "FANOUT_AUTH_SECRET_FILE"
    assert "No such file" in info.value.problem
    short = tmp_path / "short"
    short.write_text("hunter2-hunter2")
    with pytest.raises(ConfigError) as info:
        load("edge", env={"FANOUT_AUTH_SECRET_FILE": str(short)})
    assert info.value.setting == "FANOUT_AUTH_SECRET_FILE"
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="set only one of FANOUT_AUTH_SECRET and "
                       "FANOUT_AUTH_SECRET_FILE"):
        load("edge", env={"FANOUT_AUTH_SECRET": "s" * 40,
                          "FANOUT_AUTH_SECRET_FILE": str(short)})


def test_secret_file_keys_in_the_config_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("f" * 40 + "\n")
    path = write(tmp_path, f"[edge]\nauth_secret_file = '{secret}'\n")
    loaded = load("edge", env={}, path=path)
    assert loaded.config.auth_secret == "f" * 40
    assert loaded.sources["auth_secret"] == Source("file", f"{path}: [edge] auth_secret_file")
    # the environment still wins over the file
    assert load("edge", env={"FANOUT_AUTH_SECRET": "e" * 40}, path=path
                ).config.auth_secret == "e" * 40
    both = write(tmp_path, "[redis]\nurl = 'redis://h/0'\nurl_file = 'x'\n", "both.toml")
    with pytest.raises(ConfigError, match=r"\[redis\] url_file: set only one of url and "):
        load("edge", env={}, path=both)


# --- fanout config check ---------------------------------------------------------------------


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("FANOUT_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    return monkeypatch


def test_config_check_prints_every_setting_value_and_source(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fanout.cli import main

    path = write(tmp_path, "[edge]\nport = 9001\n[redis]\nkey_prefix = 'md'\n")
    clean_environ.setenv("FANOUT_AUTH_SECRET", "topsecret-" * 4)
    clean_environ.setenv("FANOUT_REDIS_URL", "redis://:redispw@h:1/0")
    assert main(["config", "check", "--command", "edge", path]) == 0
    out = capsys.readouterr().out
    assert "topsecret" not in out and "redispw" not in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert out.splitlines()[0] == f"fanout edge: configuration OK (config file {path})"
    assert set(lines) == {f"{s.section or 'edge'}.{s.key}" for s in EDGE_SETTINGS}
    assert lines["edge.auth_secret"] == ["***", "env", "FANOUT_AUTH_SECRET"]
    assert lines["redis.url"] == ["redis://:***@h:1/0", "env", "FANOUT_REDIS_URL"]
    assert lines["edge.port"] == ["9001", "file", f"{path}:", "[edge]", "port"]
    assert lines["redis.key_prefix"][0] == "md"
    assert lines["edge.ping_interval"] == ["5", "default"]
    assert main(["config", "check", path]) == 0  # both commands
    out = capsys.readouterr().out
    assert "fanout edge: configuration OK" in out and "fanout ingest: configuration OK" in out


def test_config_check_fails_with_the_error(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fanout.cli import main

    path = write(tmp_path, "[edge]\nport = -1\n")
    assert main(["config", "check", path]) == 2
    err = capsys.readouterr().err
    assert err == (f"fanout config check: bad setting {path}: [edge] port: must be between 0 "
                   "and 65535, got -1\n")
    clean_environ.setenv("FANOUT_CONFIG", path)
    clean_environ.setenv("FANOUT_QUEUE_MAX_MESAGES", "1")
    assert main(["config", "check"]) == 2
    assert "did you mean FANOUT_QUEUE_MAX_MESSAGES?" in capsys.readouterr().err


def test_the_documented_config_file_loads(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "architecture.md").read_text()
    section = docs[docs.index("## Configuration"):]
    example = section[section.index("```toml\n") + 8:]
    example = example[:example.index("```")]
    secret = tmp_path / "secret"
    secret.write_text("d" * 40 + "\n")
    path = write(tmp_path, example.replace("/run/secrets/fanout_auth_secret", str(secret)))
    edge_config = load("edge", env={}, path=path).config
    assert edge_config.auth_secret == "d" * 40
    assert edge_config.overflow["trades"] == "conflate"
    assert load("ingest", env={}, path=path).config.sim.symbols == ("ES", "NQ")


def test_a_secret_file_is_read_only_when_it_is_the_value_used(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge]\nauth_secret_file = '/nonexistent/secret'\n")
    assert load("edge", env={"FANOUT_AUTH_SECRET": "e" * 40}, path=path
                ).config.auth_secret == "e" * 40
    args = flags("edge", ["--redis-url", "redis://h:1/0"])
    env = {"FANOUT_REDIS_URL_FILE": "/nonexistent/url"}
    assert load("edge", env=env, args=args).config.redis.url == "redis://h:1/0"
    with pytest.raises(ConfigError) as info:
        load("edge", env={}, path=path)
    assert info.value.setting == f"{path}: [edge] auth_secret_file"
