"""Only what pyproject.toml cannot say: the wheel's edge/static gets the browser client.

The browser client lives in clients/js/src (the npm package @fanout/client); every edge
serves it at /static/fanout.js etc. for the demo page. build_py copies those files into the
built edge/static, so a wheel (`pip install .`, the Docker image) carries them; a checkout
(editable install) serves them from clients/js/src directly (edge/app.py). One source, no
committed copy to keep equal. A build without clients/js/src fails rather than ship an edge
whose demo page cannot load its client.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT_SRC = Path(__file__).resolve().parent / "clients" / "js" / "src"
CLIENT_FILES = ("fanout.js", "fanout.d.ts", "react.js", "react.d.ts", "zustand.js", "zustand.d.ts")


class BuildWithBrowserClient(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the edge reads clients/js/src in place
        target = Path(self.build_lib) / "edge" / "static"
        target.mkdir(parents=True, exist_ok=True)
        for name in CLIENT_FILES:
            source = CLIENT_SRC / name
            if not source.is_file():
                raise SystemExit(f"fanout build: {source} is missing (the edge serves it)")
            shutil.copyfile(source, target / name)


setup(cmdclass={"build_py": BuildWithBrowserClient})
