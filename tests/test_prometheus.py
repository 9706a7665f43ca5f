"""The shipped alerting rules: valid (`promtool check rules`), behaving as their unit tests
say (`promtool test rules`), and naming only metrics that a running edge and a running
ingest worker really export."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from common.embedded import free_port, stop_process
from tests.httpwait import wait_http_ok
from tests.test_browser import need

pytestmark = pytest.mark.integration

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
METRIC = re.compile(r"\b(fanout_[a-z_]+)")


def promtool(*args: str) -> str:
    binary = need(shutil.which("promtool"), "promtool (Debian package prometheus)")
    done = subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid_and_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in promtool("test", "rules", "rules.test.yml")
    promtool("check", "config", "prometheus.yml")  # its rule_files entry resolves


def exported(text: str) -> set[str]:
    """Metric names as a query names them: a counter `x` is queried as `x_total`, a
    histogram as `x_bucket`/`x_sum`/`x_count` (the exposition lists those samples)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_every_metric_the_rules_name_is_exported(edge, redis_server, key_prefix) -> None:
    wanted = set(METRIC.findall((PROMETHEUS / "rules.yml").read_text()))
    assert wanted, "no fanout metric in rules.yml?"
    port = free_port()
    env = {**os.environ, "FANOUT_REDIS_URL": redis_server.url, "FANOUT_KEY_PREFIX": key_prefix,
           "FANOUT_INGEST_METRICS_PORT": str(port), "FANOUT_LOG_LEVEL": "warning"}
    ingest = subprocess.Popen([sys.executable, "-m", "common.cli", "ingest"], env=env)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            url = f"http://127.0.0.1:{port}/metrics"
            await wait_http_ok(http, url, proc=ingest)
            names = exported((await http.get(url)).text)
            names |= exported((await http.get(f"{edge.http}/metrics")).text)
    finally:
        stop_process(ingest)
    assert wanted <= names, f"not exported: {sorted(wanted - names)}"
