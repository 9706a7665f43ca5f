"""deploy/k8s renders (`kubectl kustomize`, as an operator would apply it) and every object
is valid against the Kubernetes schemas (kubernetes-validate, bundled: no cluster, no
network), and it agrees with the code: known settings that parse, probe paths that
exist, a grace period that covers the edge's drain."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.config import EDGE_SETTINGS, EdgeConfig, build
from edge.app import create_app
from fanout.config import COMMANDS, known_env, load
from tests.integration.test_browser import need

pytestmark = pytest.mark.integration  # runs kubectl

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES = "1.30.0"  # the oldest release still supported upstream when this was written
TREES = ["base", "overlays/example"]


def render(tree: str) -> list[dict[str, Any]]:
    kubectl = need(shutil.which("kubectl"), "kubectl (Debian package kubernetes-client)")
    done = subprocess.run([kubectl, "kustomize", str(K8S / tree)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container_env(docs: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    """The environment a container sees from literal values and its ConfigMaps. Files it
    mounts from ConfigMaps are written to a scratch directory, and the variables that name
    them point there: the settings are checked against the files the pod would read."""
    pod = by_kind(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(by_kind(docs, "ConfigMap", name)["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    scratch = Path(tempfile.mkdtemp(prefix="fanout-k8s-"))
    for mount in container.get("volumeMounts", []):
        data = by_kind(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])["data"]
        where = scratch / mount["mountPath"].lstrip("/")
        where.mkdir(parents=True)
        for file, text in data.items():
            (where / file).write_text(text)
        env = {k: str(where) + v[len(mount["mountPath"]):]
               if v.startswith(mount["mountPath"] + "/") else v for k, v in env.items()}
    return env


@pytest.mark.parametrize("tree", TREES)
def test_renders_and_every_object_is_valid(tree: str) -> None:
    docs = render(tree)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ConfigMap"} <= set(kinds)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_broken_object_is_caught() -> None:
    """The validator really checks: a misspelt field fails."""
    deployment = by_kind(render("base"), "Deployment", "fanout-edge")
    deployment["spec"]["replicass"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize("tree", TREES)
def test_settings_are_known_and_parse(tree: str) -> None:
    docs = render(tree)
    known = known_env()
    edge_env, ingest_env = container_env(docs, "fanout-edge"), container_env(docs, "fanout-ingest")
    unknown = sorted(k for k in {*edge_env, *ingest_env} if k not in known)
    assert not unknown, f"settings fanout does not have: {unknown}"
    # as at start: unknown variables, every value, the cross-setting checks (ConfigError)
    load("edge", env=edge_env)
    load("ingest", env=ingest_env)


@pytest.mark.parametrize("tree", TREES)
def test_no_secret_in_a_config_map_and_no_service_links(tree: str) -> None:
    docs = render(tree)
    secrets = {s.env for c in COMMANDS.values() for s in c.settings if s.secret}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            assert not secrets & set(doc["data"]), doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            # Service links would add FANOUT_EDGE_PORT=tcp://... for a Service fanout-edge.
            assert doc["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_probes_ports_and_grace_agree_with_the_code() -> None:
    docs = render("base")
    paths = {route.path for route in create_app(EdgeConfig()).routes}  # type: ignore[attr-defined]
    edge = by_kind(docs, "Deployment", "fanout-edge")["spec"]["template"]["spec"]
    (c,) = edge["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    env = container_env(docs, "fanout-edge")
    config = build(EdgeConfig, EDGE_SETTINGS, env=env)
    assert c["ports"][0]["containerPort"] == config.port
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    # preStop, then the drain, then uvicorn's 5 s graceful shutdown, before SIGKILL.
    assert edge["terminationGracePeriodSeconds"] > pre_stop + config.drain_seconds + 5
    ingest = by_kind(docs, "Deployment", "fanout-ingest")
    assert ingest["spec"]["replicas"] == 2  # a leader and a hot standby
    (ic,) = ingest["spec"]["template"]["spec"]["containers"]
    port = int(container_env(docs, "fanout-ingest")["FANOUT_INGEST_METRICS_PORT"])
    assert ic["ports"][0]["containerPort"] == port
    assert {ic["readinessProbe"]["httpGet"]["path"], ic["livenessProbe"]["httpGet"]["path"]} \
        == {"/readyz", "/healthz"}


def test_the_namespaces_file_is_mounted_and_is_the_shipped_one() -> None:
    """Edges and ingest read one namespaces file from the same ConfigMap; the base's copy is
    the shipped default (an overlay may replace it)."""
    shipped = Path(__file__).resolve().parents[2] / "common" / "namespaces.toml"
    assert (K8S / "base" / "namespaces.toml").read_text() == shipped.read_text()
    docs = render("base")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("fanout-namespaces")]
    assert cm["data"]["namespaces.toml"] == shipped.read_text()
    for name in ("fanout-edge", "fanout-ingest"):
        pod = by_kind(docs, "Deployment", name)["spec"]["template"]["spec"]
        (volume,) = pod["volumes"]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        (mount,) = pod["containers"][0]["volumeMounts"]
        path = container_env(docs, name)["FANOUT_NAMESPACES_FILE"]
        assert path.endswith(f"{mount['mountPath']}/namespaces.toml")
        assert Path(path).read_text() == shipped.read_text()
