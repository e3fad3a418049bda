"""The package layout as rules: which stage may import what, and no import cycle anywhere.

Every ``import`` statement in the package counts, including those inside functions (a lazy
import is still a dependency); imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "llmco2_vllm"
STAGES = ("plugin", "accounting", "predict", "measure", "carbon", "serve", "dev")

# Which stages a stage may import (top-level modules settings/cli and the package root aside).
ALLOWED_STAGES = {
    "plugin": {"accounting", "predict", "measure", "carbon", "serve"},
    "accounting": {"predict", "measure", "carbon", "serve"},
    "serve": {"predict", "carbon"},
    "measure": {"predict", "dev"},  # the collect harness's CPU smoke run uses dev's tiny model
    "predict": {"carbon"},  # batch predictions report grams beside joules
    "carbon": set(),
    "dev": set(STAGES) - {"dev"},
}
# Third-party packages only one stage may import (development tools in dev/ run vLLM too).
EXCLUSIVE_IMPORTS = {"vllm": {"plugin", "dev"}, "torch_geometric": {"predict.gnn"}, "pynvml": {"measure"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module the file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(child) for node in ast.walk(tree) if _type_checking_block(node) for child in ast.walk(node)}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def package_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_stage_is_a_package() -> None:
    for stage in STAGES:
        assert (PACKAGE_DIR / stage / "__init__.py").exists(), stage


def test_stages_import_only_what_the_data_flow_allows() -> None:
    violations = []
    for module, imports in package_graph().items():
        stage = stage_of(module)
        for imported in imports:
            target = stage_of(imported)
            if stage and target and target != stage and target not in ALLOWED_STAGES[stage]:
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(sorted(violations))


@pytest.mark.parametrize("library", sorted(EXCLUSIVE_IMPORTS))
def test_third_party_libraries_stay_in_their_stage(library: str) -> None:
    owners = EXCLUSIVE_IMPORTS[library]
    violations = []
    for path in PACKAGE_DIR.rglob("*.py"):
        module = module_name(path)
        uses = any(name == library or name.startswith(library + ".") for name in imported_modules(path))
        if uses and not any(module == f"llmco2_vllm.{owner}" or module.startswith(f"llmco2_vllm.{owner}.") for owner in owners):
            violations.append(module)
    assert not violations, f"{library} imported outside {sorted(owners)}: {sorted(violations)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_public_api_names_resolve() -> None:
    import llmco2_vllm

    for name in llmco2_vllm.__all__:
        assert getattr(llmco2_vllm, name) is not None, name
    with pytest.raises(AttributeError):
        llmco2_vllm.no_such_name  # noqa: B018


REPO_ROOT = PACKAGE_DIR.parent


def test_tests_import_no_other_test_module_and_no_benchmark() -> None:
    test_modules = {path.stem for path in (REPO_ROOT / "tests").glob("test_*.py")}
    benchmarks = {path.stem for path in (REPO_ROOT / "benchmarks").glob("*.py")}
    violations = []
    for path in (REPO_ROOT / "tests").rglob("*.py"):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] in test_modules or (parts[0] == "tests" and len(parts) > 1 and parts[1] in test_modules):
                violations.append(f"{path.relative_to(REPO_ROOT)} imports test module {name}")
            if parts[0] in benchmarks or parts[0] == "benchmarks" or parts[0] == "conftest":
                violations.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_benchmarks_import_nothing_from_tests() -> None:
    violations = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in (REPO_ROOT / "benchmarks").glob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0] in {"tests", "conftest"} or name.split(".")[0].startswith("test_")
    ]
    assert not violations, "\n".join(violations)
