"""The package's shape: no import circles, no function-level sibling imports outside the CLI, errors in one line."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seify"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported seify module, inside a function) for every import in ``path``, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            modules = [target] if node.module else [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seify"):
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names if a.name.startswith("seify")]
        else:
            continue
        for module in modules:
            yield module, id(node) in nested


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = set()
        for module, _ in _imports(path):
            while module not in files and "." in module:  # `from .x import name`: name may be an attribute
                module = module.rpartition(".")[0]
            if module in files and module != name:
                graph[name].add(module)
    return graph


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_a_circle_would_be_found():
    graph = _graph()
    assert "seify.models" in graph["seify.api"] and "seify.checkpoint" in graph["seify.models"]
    assert "seify.models" not in graph["seify.checkpoint"]  # checkpoint is pure file I/O


def test_sibling_imports_live_at_the_top_except_in_the_cli():
    """The CLI imports its commands' modules on use, so `seify --help` does not import torch."""
    inside = [(p.name, m) for p in PACKAGE.rglob("*.py") if "cli" not in p.parts and "__init__" not in p.name
              for m, nested in _imports(p) if nested]
    assert inside == [], inside


def test_rooms_stay_readable():
    """No module over 400 lines, no class over 250, no function over 60 (the house issue's bounds)."""
    too_big = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_big.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = 250 if isinstance(node, ast.ClassDef) else 60
                if node.end_lineno - node.lineno + 1 > limit:
                    too_big.append(f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, too_big


COMMANDS = {"seify.api", "seify.profile", "seify.analyze", "seify.fold", "seify.export", "seify.compare"}


def test_no_command_imports_another():
    """Each command's module imports only the rooms below the commands (gates, images, models, counting, ...);
    the CLI alone calls several (its demo is their tour)."""
    graph = _graph()
    crossing = sorted((name, other) for name in COMMANDS for other in graph[name] & COMMANDS)
    assert crossing == [], crossing
    assert all(name in graph for name in COMMANDS)
    assert "seify.gates" in graph["seify.fold"] and "seify.images.scoring" in graph["seify.analyze"]
