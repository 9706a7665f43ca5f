"""What /static serves: the demo page's own files and the browser client.

The browser client's single source is clients/js/src (the npm package @fanout/client). A
built wheel (`pip install .`, the Docker image) has it copied into edge/static by setup.py;
a checkout (editable install, the test suite) serves it from clients/js/src in place, so an
edit there shows on the next page load with no copy step.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.staticfiles import PathLike, StaticFiles

STATIC = Path(__file__).parent / "static"
CLIENT_SOURCE = Path(__file__).resolve().parent.parent / "clients" / "js" / "src"
CLIENT_FILES = ("fanout.js", "fanout.d.ts", "react.js", "react.d.ts", "zustand.js", "zustand.d.ts")


def static_directories() -> list[Path]:
    """edge/static, then clients/js/src when the client was not packaged into edge/static."""
    if (STATIC / CLIENT_FILES[0]).is_file() or not CLIENT_SOURCE.is_dir():
        return [STATIC]
    return [STATIC, CLIENT_SOURCE]


class StaticDirectories(StaticFiles):
    """StaticFiles over several directories, the first holding a path answering."""

    def __init__(self, directories: list[Path]) -> None:
        self._directories = [os.fspath(d) for d in directories]
        super().__init__(directory=directories[0])

    def get_directories(
        self,
        directory: PathLike | None = None,
        packages: list[str | tuple[str, str]] | None = None,
    ) -> list[PathLike]:
        return list(self._directories)


def static_files() -> StaticFiles:
    return StaticDirectories(static_directories())


__all__ = ["CLIENT_FILES", "CLIENT_SOURCE", "STATIC", "StaticDirectories", "static_files"]
