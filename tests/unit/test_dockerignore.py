"""The image is built from a context that .dockerignore reduces to an allow-list: a package
added to pyproject.toml but not to that list would build an image without it (the `fanout`
entrypoint failing at start). Read from the files; no Docker needed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def allowed() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines and "*" in [line.strip() for line in lines]  # everything else is ignored
    return {line[1:].strip().rstrip("/") for line in lines if line.startswith("!")}


def test_every_package_the_wheel_holds_reaches_the_image_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    tops = {name.split(".")[0] for name in packages}
    roots = {top for top in tops if (ROOT / top).is_dir()}  # fanout_client: clients/python
    missing = sorted(top for top in roots if top not in allowed())
    assert not missing, f".dockerignore leaves out {missing}: add !<name>/ to it"


def test_what_the_build_reads_reaches_it() -> None:
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "requirements", "clients/js/src"):
        assert name in allowed(), name
