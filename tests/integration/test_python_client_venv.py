"""fanout-client installs alone and works: a venv of its own with only websockets and msgpack
(the versions and hashes of requirements/dev.txt) and the client's wheel; nothing of the
server importable there; its smoke script (clients/python/tests/smoke.py) against a real
edge this test runs and publishes to.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
DEPENDENCIES = ("websockets", "msgpack")


def pinned(names: tuple[str, ...], lock: Path) -> str:
    """The lock entries (``name==version`` with every ``--hash``) of `names`."""
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==\S+", block)
        if match and match.group(1).lower() in names:
            lines = [ln.strip() for ln in block.splitlines() if not ln.strip().startswith("#")]
            entries[match.group(1).lower()] = " ".join(ln.rstrip("\\").strip() for ln in lines)
    assert sorted(entries) == sorted(names), f"not in {lock}: {set(names) - set(entries)}"
    assert all("--hash=sha256:" in e for e in entries.values())
    return "\n".join(entries[n] for n in names) + "\n"


def run(args: list[str], cwd: Path, timeout: float = 150) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def client_venv(tmp: Path) -> Path:
    """A venv with the pinned dependencies and the client wheel; returns its python."""
    (tmp / "requirements.txt").write_text(pinned(DEPENDENCIES, ROOT / "requirements/dev.txt"))
    run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    python = tmp / "venv" / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "install", "--require-hashes", "--no-deps", "-r", "requirements.txt"], tmp)
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel",
         "--no-deps", "--no-build-isolation", "-w", str(wheels), str(CLIENT)], tmp)
    (wheel,) = wheels.glob("fanout_client-*.whl")
    run([*pip, "install", "--no-deps", "--no-index", str(wheel)], tmp)
    return python


async def test_client_alone_in_its_venv_against_a_real_edge(
    tmp_path: Path, edge: Any, publisher: Publisher
) -> None:
    python = await asyncio.to_thread(client_venv, tmp_path)
    installed = await asyncio.to_thread(
        run, [str(python), "-I", "-m", "pip", "--disable-pip-version-check", "list",
              "--format=json"], tmp_path)
    names = {p["name"].lower() for p in json.loads(installed)}
    assert names - {"pip", "setuptools"} == {"fanout-client", *DEPENDENCIES}

    channel = "trades.VENV"
    for i in range(5):
        await publisher.publish(UpstreamMessage(channel, {"price": 100 + i, "size": 1}))
    url: str = edge.url
    proc = await asyncio.create_subprocess_exec(
        str(python), "-I", str(CLIENT / "tests" / "smoke.py"), url, channel, "10",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            ready = (await proc.stdout.readline()).decode().split()
            assert ready == ["ready", "5"], ready
            for i in range(10):
                await publisher.publish(UpstreamMessage(channel, {"price": 200 + i, "size": 2}))
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().splitlines()[-1])
    assert Path(seen["module"]).is_relative_to(tmp_path / "venv")
    assert seen["snapshot_offset"] == 5
    assert seen["offsets"] == list(range(6, 16))
    assert [d["price"] for d in seen["data"]] == list(range(200, 210))
    assert seen["bad_channel"] == "bad_channel"
    assert seen["delivered"] == 10
