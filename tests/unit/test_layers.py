"""The layers' import rules, read from the source (ast; nothing is imported): `common` is
what ingest and edge share, so it imports neither of them nor the composition root
`fanout`; ingest and edge do not import `fanout` (it wires them, not the reverse). Redis
is reached only through the broker seam: only `common/broker/` imports `redis`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level packages it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"edge", "ingest", "fanout", "redis"}),
    "edge": frozenset({"fanout", "redis"}),
    "ingest": frozenset({"fanout", "redis"}),
}
# folder -> top-level packages it may import all the same (the Redis broker implementation)
ALLOWED: dict[str, frozenset[str]] = {"common/broker/": frozenset({"redis"})}


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, anywhere (also inside
    functions: a lazy import is still a dependency). `module` resolves relative imports."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def sources(root: Path) -> list[tuple[str, str]]:
    """(path relative to the repository, text) of every module of the checked packages."""
    return [(str(path.relative_to(root)), path.read_text(encoding="utf-8"))
            for package in FORBIDDEN for path in sorted((root / package).rglob("*.py"))]


def violations(modules: list[tuple[str, str]]) -> list[str]:
    """`path:line: imports X` for every import that breaks a rule in FORBIDDEN."""
    bad: list[str] = []
    for relative, text in modules:
        parts = Path(relative).with_suffix("").parts
        forbidden = FORBIDDEN.get(parts[0], frozenset())
        for folder, allowed in ALLOWED.items():
            if relative.startswith(folder):
                forbidden = forbidden - allowed
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] == "__init__":
            module += ".__init__"  # relative imports resolve against the package itself
        for line, name in imported_modules(ast.parse(text, relative), module):
            if name.split(".")[0] in forbidden:
                bad.append(f"{relative}:{line}: imports {name}")
    return bad


def test_the_layers_keep_their_import_rules() -> None:
    modules = sources(ROOT)
    assert {Path(path).parts[0] for path, _ in modules} == set(FORBIDDEN)  # all found
    bad = violations(modules)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_checker_finds_absolute_relative_and_lazy_imports() -> None:
    source = (
        "import os\n"
        "import edge.hub\n"
        "from ingest import worker\n"
        "from . import keys\n"
        "from ..fanout import cli\n"
        "def f() -> None:\n"
        "    from fanout.dev import run\n"
    )
    found = imported_modules(ast.parse(source), "common.sub.mod")
    assert found == [(1, "os"), (2, "edge.hub"), (3, "ingest"), (4, "common.sub"),
                     (5, "common.fanout"), (7, "fanout.dev")]


def test_violations_name_the_file_line_and_import() -> None:
    modules = [
        ("common/a.py", "import json\nfrom edge.hub import Hub\n"),
        ("common/pkg/__init__.py", "from .. import keys\nimport ingest.worker as w\n"),
        ("ingest/b.py", "from common.keys import Keys\ndef f() -> None:\n    import fanout\n"),
        ("edge/c.py", "from ingest.upstream import UpstreamMessage\n"),  # not a rule here
        ("fanout/cli.py", "import edge.server\nimport ingest.worker\n"),  # the root may
        ("edge/d.py", "from redis.asyncio import Redis\n"),
        ("common/broker/e.py", "from redis.asyncio import Redis\n"),  # the seam may
        ("common/f.py", "import redis\n"),
    ]
    assert violations(modules) == [
        "common/a.py:2: imports edge.hub",
        "common/pkg/__init__.py:2: imports ingest.worker",
        "ingest/b.py:3: imports fanout",
        "edge/d.py:1: imports redis.asyncio",
        "common/f.py:1: imports redis",
    ]
