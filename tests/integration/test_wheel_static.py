"""The browser client in a built fanout wheel, as `pip install .` and the Docker image get it.

The client's one source is clients/js/src; setup.py copies it into the wheel's edge/static
(MANIFEST.in puts it into the sdist). This builds an sdist, a wheel from that sdist (what
pip does for `pip install <sdist>`, and the same build_py as `pip wheel .`), checks the
files are there byte for byte, and serves /static from the unpacked wheel, away from this
checkout, to show the edge finds them there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge.webstatic import CLIENT_FILES, CLIENT_SOURCE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SERVE = """
import sys
from pathlib import Path
from starlette.testclient import TestClient
import edge.webstatic as ws
root = Path(sys.argv[1]).resolve()
assert Path(ws.__file__).resolve().is_relative_to(root), ws.__file__
assert ws.static_directories() == [ws.STATIC], ws.static_directories()
client = TestClient(ws.static_files())
for name in sys.argv[2:]:
    response = client.get("/" + name)
    assert response.status_code == 200, (name, response.status_code)
    sys.stdout.buffer.write(response.content)
"""


def _run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"


def test_wheel_carries_and_serves_the_browser_client(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = (
        "import sys; from setuptools import build_meta as b; "
        "print(b.build_sdist(sys.argv[1]))"
    )
    _run([sys.executable, "-c", build, str(dist)], ROOT)
    (sdist,) = dist.glob("fanout-*.tar.gz")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(sdist)],
         tmp_path)
    (wheel,) = dist.glob("fanout-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in CLIENT_FILES:
            assert f"edge/static/{name}" in names
            assert archive.read(f"edge/static/{name}") == (CLIENT_SOURCE / name).read_bytes()
        assert {"edge/static/index.html", "edge/static/demo.js"} <= names
        assert not any("/test/" in n or n.endswith(".mjs") for n in names)
        archive.extractall(unpacked)

    # The unpacked wheel first on the path, run from elsewhere: its edge, not this checkout's.
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    served = subprocess.run(
        [sys.executable, "-c", SERVE, str(unpacked), "fanout.js", "react.js", "index.html"],
        cwd=tmp_path, env=env, capture_output=True, timeout=60,
    )
    assert served.returncode == 0, served.stderr.decode()
    expected = b"".join(
        [(CLIENT_SOURCE / "fanout.js").read_bytes(), (CLIENT_SOURCE / "react.js").read_bytes(),
         (ROOT / "edge/static/index.html").read_bytes()]
    )
    assert served.stdout == expected
