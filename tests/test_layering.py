"""The studio's modules in layers, as the data flows: shared facts and helpers (the modules at the top of
studio/); building a merge (studio/build: config -> plan -> tensors on disk); running and inspecting a merged
model (studio/inspect: loaded model -> router scores -> figures); the app (studio/app: CLI, UI, background jobs)
on top. The layer of a module is the package it sits in. Build and inspect meet only through data (a trace, a
folder on disk), never by importing each other, and no layer imports one above it. Read with `ast`, at every
depth of each module (imports under `if TYPE_CHECKING:` are types only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STUDIO = Path(__file__).resolve().parents[1] / "studio"
# Model code written into DeepSeek MoE and Phi MoE outputs, where transformers loads it: relative imports only.
MODEL_CODE = STUDIO / "build" / "outputs" / "modeling"

LAYER_PACKAGES = ("build", "inspect", "app")  # studio/<layer>/: every module under it is in that layer
# Modules outside the layer packages that are not shared helpers, each with its layer and why.
PLACED = {
    "__main__": ("app", "`python -m studio`: the CLI's entry point"),
    "zoo": ("app", "the zoo's training and prompt scoring, a tool of its own (`python -m studio.zoo`)"),
    "zoo.corpora": ("shared", "the zoo's texts: data that its training and the quality measure both read"),
}
GROUPS = {*LAYER_PACKAGES, "zoo"}  # packages whose modules are each a node of the graph
# Arrows across build and inspect that carry data, each with its reason.
EXCEPTIONS = {
    ("build.refine", "inspect.routing"):
        "the refinement loads the written model and finds its routers as the inspector does",
}


def layer_of(module: str) -> str:
    """The layer of `module` (a name under studio/, e.g. `config`, `build.plan`, `app.ui`, `zoo.corpora`)."""
    package = module.split(".")[0]
    if module in PLACED or package in PLACED:
        return PLACED[module if module in PLACED else package][0]
    if package in LAYER_PACKAGES:
        return package
    if (STUDIO / f"{module}.py").is_file():
        return "shared"
    raise AssertionError(f"studio/{module.replace('.', '/')} is in no layer; move it into studio/build, "
                         "studio/inspect or studio/app (or place it in tests/test_layering.py, with a reason)")


def studio_imports(source: str, relative: bool = False) -> set[str]:
    """The studio modules (as `layer_of` names them) imported anywhere in `source`, except under
    `if TYPE_CHECKING:`. A relative import is refused unless `relative` (it would hide an arrow)."""
    tree = ast.parse(source)
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level > 0 and not relative:
            raise AssertionError(f"relative import `from {'.' * node.level}{node.module or ''}`: the layers are "
                                 f"read from absolute `studio.` imports; write it as one")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "studio":
            found.update(_module_name(parts) for parts in _imported_from(node))
        elif isinstance(node, ast.Import):
            found.update(_module_name(a.name.split(".")[1:]) for a in node.names if a.name.startswith("studio."))
    return found


def _imported_from(node: ast.ImportFrom) -> list[list[str]]:
    """The paths under studio/ that `from studio... import ...` reads: the names it imports where they are
    modules (`from studio import safe_yaml`, `from studio.build import merge`), else its module."""
    parts = node.module.split(".")[1:]
    if not parts or (len(parts) == 1 and parts[0] in GROUPS):
        return [parts + [alias.name] for alias in node.names]
    return [parts]


def _module_name(parts: list[str]) -> str:
    """`build.plan` for a module of a layer package (or the zoo), else the top-level module or package."""
    return ".".join(parts[:2]) if parts[0] in GROUPS and len(parts) > 1 else parts[0]


def modules() -> dict[str, set[str]]:
    """Each module of studio/ (a package below a layer package counting as one) and what it imports of the
    others."""
    found: dict[str, set[str]] = {}
    for path in STUDIO.rglob("*.py"):
        parts = list(path.relative_to(STUDIO).with_suffix("").parts)
        name = _module_name(parts if parts[-1] != "__init__" or len(parts) == 1 else parts[:-1])
        found.setdefault(name, set()).update(studio_imports(path.read_text(), relative=MODEL_CODE in path.parents))
    return {name: imports - {name} for name, imports in found.items()}


def test_studio_imports_skips_type_checking_blocks_and_reads_every_depth():
    source = ("from studio.config import x\nif TYPE_CHECKING:\n    from studio.build.gates import G\n"
              "def f():\n    from studio.build import merge\n    import studio.inspect.plots\n"
              "    from studio.app.ui.common import y\n    from studio import safe_yaml\n")
    assert studio_imports(source) == {"config", "build.merge", "inspect.plots", "app.ui", "safe_yaml"}


def test_a_relative_import_is_refused_outside_the_model_code_written_into_outputs():
    with pytest.raises(AssertionError, match="relative import `from ..inspect`"):
        studio_imports("from ..inspect import routing\n")
    assert studio_imports("from .sparse_moe import Router\n", relative=True) == set()


def test_the_layer_of_a_module_is_its_package():
    assert [layer_of(m) for m in ("config", "build.outputs", "inspect.plots", "app.ui", "build", "__main__",
                                  "zoo.train", "zoo.corpora")] == \
        ["shared", "build", "inspect", "app", "build", "app", "app", "shared"]


def test_every_module_is_in_a_layer():
    layers = {layer_of(module) for module in modules()}
    assert layers == {"shared", "build", "inspect", "app"}


def test_no_layer_imports_one_it_should_not():
    rank = {"shared": 0, "build": 1, "inspect": 1, "app": 2}
    wrong = []
    for module, imports in sorted(modules().items()):
        for imported in sorted(imports):
            here, there = layer_of(module), layer_of(imported)
            crosses = here != there and there != "shared" and (rank[there] >= rank[here])
            if crosses and (module, imported) not in EXCEPTIONS:
                wrong.append(f"{module} ({here}) imports {imported} ({there})")
    assert wrong == []


def test_the_import_graph_has_no_cycle():
    graph = modules()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported in graph and imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
