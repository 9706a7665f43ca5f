"""The commands `fanout` runs from settings, and the loading functions of common/config.py
bound to them: every command's settings are known to each (a FANOUT_ variable or a config
file key of another command is no typo), so only the composition root can list them."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from common import config
from common.config import EDGE_COMMAND, Command, ConfigFile, Loaded, Setting
from ingest.config import INGEST_COMMAND

COMMANDS: dict[str, Command] = {"edge": EDGE_COMMAND, "ingest": INGEST_COMMAND}


def load(
    command: str,
    env: Mapping[str, str] | None = None,
    args: argparse.Namespace | None = None,
    path: str | None = None,
) -> Loaded:
    """What `fanout <command>` runs with (common.config.load over every command)."""
    return config.load(COMMANDS, command, env, args, path)


def known_env() -> frozenset[str]:
    """Every FANOUT_ variable that means something to some command."""
    return config.known_env(COMMANDS)


def check_environment(env: Mapping[str, str]) -> None:
    """Fail on a FANOUT_ variable that is no setting of any command."""
    config.check_environment(env, COMMANDS)


def file_sections() -> dict[str, dict[str, Setting]]:
    """section -> key -> setting, over every command."""
    return config.file_sections(COMMANDS)


def read_config_file(path: str) -> ConfigFile:
    """Read and check a TOML config file against every command's keys."""
    return config.read_config_file(path, COMMANDS)
