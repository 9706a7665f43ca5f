"""The shipped Grafana dashboard imports anywhere (no datasource of one installation)."""

from __future__ import annotations

import json
from pathlib import Path

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


DASHBOARD = PROMETHEUS.parent / "grafana" / "dashboards" / "fanout.json"


def test_dashboard_is_importable_anywhere() -> None:
    """No hard-coded datasource: every panel and query uses the `datasource` variable, so
    the JSON imports into any Grafana and picks that Grafana's Prometheus."""
    board = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    for panel in board["panels"]:
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
