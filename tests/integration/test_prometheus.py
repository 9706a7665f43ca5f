"""The shipped alerting rules: valid (`promtool check rules`), behaving as their unit tests
say (`promtool test rules`), and naming only metrics that a running edge and a running
ingest worker really export."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from fanout.embedded import free_port, stop_process
from tests.integration.conftest import EdgeServer, RedisServer
from tests.integration.test_browser import need
from tests.support.edgeproc import ingest_process
from tests.support.httpwait import wait_http_ok
from tests.unit.test_prometheus import DASHBOARD, PROMETHEUS

pytestmark = pytest.mark.integration
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
            elif kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_every_metric_the_rules_name_is_exported(
    edge: EdgeServer, redis_server: RedisServer, key_prefix: str,
) -> None:
    wanted = set(METRIC.findall((PROMETHEUS / "rules.yml").read_text()))
    assert wanted, "no fanout metric in rules.yml?"
    async with ingest_process(redis_server.url, key_prefix) as ingest, \
            httpx.AsyncClient(timeout=5) as http:
        names = exported((await http.get(f"{ingest.http}/metrics")).text)
        names |= exported((await http.get(f"{edge.http}/metrics")).text)
    assert wanted <= names, f"not exported: {sorted(wanted - names)}"


@pytest.fixture
async def exit_stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as stack:
        yield stack


def dashboard_metrics() -> dict[str, set[str]]:
    """Metric name -> titles of the panels whose queries name it."""
    found: dict[str, set[str]] = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            for name in METRIC.findall(target["expr"]):
                found.setdefault(name, set()).add(panel["title"])
    return found


async def test_every_dashboard_and_alert_metric_reaches_a_real_prometheus(
    edge: EdgeServer, redis_server: RedisServer, key_prefix: str, tmp_path: Path,
    exit_stack: contextlib.AsyncExitStack,
) -> None:
    """A real Prometheus scrapes a running edge and ingest worker; every metric a dashboard
    panel or an alert queries must be known to it (as a series, or as a metric family
    announced in the scrape when it has no sample yet, e.g. a counter by reason)."""
    binary = need(shutil.which("prometheus"), "prometheus (Debian package prometheus)")
    wanted = dashboard_metrics()
    for name in METRIC.findall((PROMETHEUS / "rules.yml").read_text()):
        wanted.setdefault(name, set()).add("rules.yml")
    prom_port = free_port()
    ingest = await exit_stack.enter_async_context(ingest_process(redis_server.url, key_prefix))
    jobs = {"fanout-edge": edge.port, "fanout-ingest": ingest.port}
    (tmp_path / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]}
                           for job, p in jobs.items()],
    }))
    prom = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            await wait_http_ok(http, f"http://127.0.0.1:{prom_port}/-/ready", 60, proc=prom)

            async def known() -> set[str]:
                names = set((await http.get(f"{api}/label/__name__/values")).json()["data"])
                families = (await http.get(f"{api}/metadata")).json()["data"]
                for family in families:  # a counter family is queried as <name>_total
                    names |= {family, family + "_total", family + "_bucket"}
                return names

            async with asyncio.timeout(60):  # until both targets are scraped and announced
                while not {"fanout_edge_connections", "fanout_ingest_leader"} <= await known():
                    await asyncio.sleep(0.2)
            # Both export the process collector's metrics (RSS, CPU, descriptors).
            rss = (await http.get(f"{api}/query", params={
                "query": "count by (job) (process_resident_memory_bytes)"})).json()["data"]
            assert {r["metric"]["job"] for r in rss["result"]} == set(jobs)
            missing = {name: sorted(panels) for name, panels in wanted.items()
                       if name not in await known()}
    finally:
        stop_process(prom)
    assert not missing, f"queried but never exported: {missing}"
