"""The layout's rule, checked on the source: imports flow one way (`shared_model` <- `client`,
`server` <- `simulations`; client and server never import each other), no benchmark imports
another (what they share lives in a library module), and no module imports itself around a
loop."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared_model", "client", "server", "simulations")
MAY_IMPORT = {"shared_model": {"shared_model"}, "client": {"shared_model", "client"},
              "server": {"shared_model", "server"}, "simulations": set(PACKAGES)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every project module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from package import module`
    return {name for name in found if name.split(".")[0] in PACKAGES}


def project_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {i for i in imports_of(path) if i in modules and i != name} for name, path in modules.items()}


def test_imports_flow_one_way():
    wrong = sorted(f"{module} imports {target}" for module, targets in project_graph().items() for target in targets
                   if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]])
    assert wrong == []


def test_no_benchmark_imports_another():
    wrong = sorted(f"{module} imports {target}" for module, targets in project_graph().items() for target in targets
                   if module.startswith("simulations.bench_") and target.startswith("simulations.bench_"))
    assert wrong == []


def test_no_import_cycles():
    graph = project_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
