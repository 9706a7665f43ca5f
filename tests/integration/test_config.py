"""Every FANOUT_ name the repository mentions (the files `git ls-files` lists) is a setting,
a _FILE variant or a known non-setting."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from common.errors import ConfigError
from fanout.config import check_environment, known_env

# The config tests' own files: misspelt names on purpose, and FANOUT_FOO_* below.
OWN = {"tests/unit/test_config.py", "tests/integration/test_config.py"}


def test_every_fanout_variable_the_project_mentions_is_known() -> None:
    """Docs, deploy files, the image, tests: a FANOUT_ name that is neither a setting, a
    _FILE variant nor in NOT_SETTINGS would fail the unknown-variable check (or be a typo
    in the docs). FANOUT_FOO_* stands for a family of settings."""
    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                           check=True).stdout.split()
    known = known_env()
    # typos and placeholders on purpose: the docs' example, a test of the check
    deliberate = {"FANOUT_QUEUE_MAX_MESAGES", "FANOUT_X_PORT", "FANOUT_LOGLEVEL"}
    unknown: set[str] = set()
    for name in files:
        if name in OWN or not (root / name).is_file():
            continue
        text = (root / name).read_text(errors="replace")
        for match in re.finditer(r"\bFANOUT_[A-Z0-9_]+\*?", text):
            word = match.group(0)
            if word.endswith(("*", "_")):
                assert any(k.startswith(word.rstrip("*")) for k in known), word
                continue
            if word in deliberate:
                continue
            try:
                check_environment({word: ""})  # also lets Kubernetes service links pass
            except ConfigError:
                unknown.add(f"{word} ({name})")
    assert not unknown, sorted(unknown)
