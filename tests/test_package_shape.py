"""The package's shape, checked: imports point down the stack with no cycle (in-function imports count too),
nothing below the entry points reads the environment, and the public API imports from `ddtree_mlx`."""

import ast
from pathlib import Path

import ddtree_mlx

PACKAGE = Path(ddtree_mlx.__file__).parent
# Bottom to top: a module may import from its own sub-package and from the ones before it, never after.
LAYERS = ["config", "blas", "tree", "kernels", "models", "drafting", "loading", "engine", "serving", "training", "cli"]
# Where a run starts and configuration is built: the only places that may read os.environ.
ENTRY_POINTS = {"config", "blas", "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports, anywhere in its body (a function-level import is still an edge)."""
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_import_graph_has_no_cycle():
    edges = {name: targets - {"ddtree_mlx"} for name, targets in graph().items()}
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(edges[node]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(trail + [node, target])
            if target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_imports_point_down_the_stack():
    upward = [(name, target) for name, targets in graph().items() for target in targets
              if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)]
    assert upward == [], f"modules importing from a layer above their own: {upward}"


def test_a_cycle_is_found(tmp_path, monkeypatch):
    """The checks above can fail: two modules that import each other inside functions form a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    known = {"p.a", "p.b"}
    assert imports("p.a", tmp_path / "a.py", known) == {"p.b"} and imports("p.b", tmp_path / "b.py", known) == {"p.a"}


def test_nothing_below_the_entry_points_reads_the_environment():
    readers = [name for name, path in modules().items()
               if name.split(".")[1:2] and name.split(".")[1] not in ENTRY_POINTS
               and ("os.environ" in path.read_text() or "getenv(" in path.read_text())]
    assert readers == [], f"configuration is read once, at the entry points (config.DDTreeConfig.from_env): {readers}"


def test_the_public_api_imports_from_the_package():
    for name in ddtree_mlx.__all__:
        assert getattr(ddtree_mlx, name) is not None
    readme = (PACKAGE.parent / "README.md").read_text()
    for name in ("generate_ddtree_once", "stream_generate", "load", "DDTreeConfig", "PromptCache",
                 "PromptLookupDrafter", "DFlashDrafter", "Drafter", "DecodeStep"):
        assert name in ddtree_mlx.__all__
    assert "from ddtree_mlx import" in readme
