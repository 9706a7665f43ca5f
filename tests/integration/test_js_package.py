"""The npm package clients/js as a user gets it: `npm pack`, the tarball installed into a
scratch project (tools pinned by tests/integration/js_consumer/package-lock.json, `npm ci`),
a TypeScript file importing the root and both sub-paths type-checked with `tsc --strict`
against React's and zustand's own types, wrong uses rejected, and node importing every
entry point through the package's `exports`.

Needs node and npm (and the npm registry for the pinned tools): skipped without them,
except in CI (CI set), where their absence fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "js"
CONSUMER = Path(__file__).resolve().parent / "js_consumer"
CONSUMER_FILES = (
    "package.json",
    "package-lock.json",
    "tsconfig.json",
    "tsconfig.misuse.json",
    "consumer.ts",
    "misuse.ts",
    "check.mjs",
)
NPM_FLAGS = ("--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error")


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the JS package test")
        pytest.skip("node/npm not installed")
    return node, npm


def _run(args: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch project with the packed tarball and the pinned tools installed."""
    _, npm = _tools()
    work = tmp_path_factory.mktemp("js")
    packed = work / "packed"
    packed.mkdir()
    out = _ok(_run([npm, "pack", "--json", "--pack-destination", str(packed)], PACKAGE))
    (info,) = json.loads(out)
    assert info["name"] == "@fanout/client"
    files = sorted(f["path"] for f in info["files"])
    assert files == [
        "README.md",
        "package.json",
        "src/fanout.d.ts",
        "src/fanout.js",
        "src/react.d.ts",
        "src/react.js",
        "src/zustand.d.ts",
        "src/zustand.js",
    ], "the tarball holds the sources and their types, no tests"
    project = work / "app"
    project.mkdir()
    for name in CONSUMER_FILES:
        shutil.copy(CONSUMER / name, project / name)
    _ok(_run([npm, "ci", *NPM_FLAGS], project))
    tarball = packed / info["filename"]
    _ok(_run([npm, "install", "--no-save", *NPM_FLAGS, str(tarball)], project))
    installed = json.loads((project / "node_modules/@fanout/client/package.json").read_text())
    assert installed["version"] == json.loads((PACKAGE / "package.json").read_text())["version"]
    return project


def test_typescript_strict_accepts_the_root_and_both_subpaths(scratch: Path) -> None:
    result = _run([str(scratch / "node_modules/.bin/tsc"), "-p", "tsconfig.json"], scratch)
    _ok(result)


def test_typescript_rejects_misuse(scratch: Path) -> None:
    """Each @ts-expect-error in misuse.ts needs a real error (else TS2578 "unused"), and the
    one unmarked wrong call must be the only error: the declarations are read, not `any`."""
    result = _run([str(scratch / "node_modules/.bin/tsc"), "-p", "tsconfig.misuse.json"], scratch)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if ": error TS" in line]
    assert len(errors) == 1, result.stdout
    assert "TS2551" in errors[0] and "subscribeAll" in errors[0], result.stdout


def test_node_imports_every_entry_point(scratch: Path) -> None:
    node, _ = _tools()
    exports = json.loads(_ok(_run([node, "check.mjs"], scratch)).splitlines()[-1])
    assert exports == {
        "root": ["FanoutClient", "advisedDelay", "default", "shouldReconnect",
                 "subscribeRetryDelay"],
        "react": ["default", "makeHooks", "makeUseChannel", "makeUseConnectionState"],
        "zustand": ["bindChannel", "default"],
    }
