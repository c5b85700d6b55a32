"""The studio's modules in layers, as the data flows: shared facts and helpers; building a merge (config -> plan ->
tensors on disk); running and inspecting a merged model (loaded model -> router scores -> figures); the app (CLI,
UI, background jobs) on top. Build and inspect meet only through data (a trace, a folder on disk), never by
importing each other, and no layer imports one above it. Read with `ast`, at every depth of each module (imports
under `if TYPE_CHECKING:` are types only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

STUDIO = Path(__file__).resolve().parents[1] / "studio"

SHARED = {"errors", "formatting", "prompts", "devices", "safe_yaml", "sources", "families", "moe_layouts",
          "gate_modes", "config", "tokenizer_files", "mxfp4", "trace", "zoo.corpora"}
BUILD = {"plan", "outputs", "forward", "hidden_states", "calibrate", "expert_text", "gates", "refine", "writer",
         "destination", "integrity", "card", "report", "merge", "preview", "synthetic"}
INSPECT = {"moe_folder", "routing", "quantize", "chat", "conversation", "loaded", "evaluate", "quality", "plots"}
APP = {"jobs", "progress", "form", "workspace", "hub", "cli", "ui", "__main__", "__init__", "zoo", "zoo.train",
       "zoo.prompts", "zoo.__main__"}
SPLIT = {"zoo"}  # packages whose modules sit in different layers (the zoo's corpora are data, its training a tool)
# Arrows across build and inspect that carry data, each with its reason.
EXCEPTIONS = {
    ("refine", "routing"): "the refinement loads the written model and finds its routers as the inspector does",
}


def layer_of(module: str) -> str:
    for name, members in (("shared", SHARED), ("build", BUILD), ("inspect", INSPECT), ("app", APP)):
        if module in members:
            return name
    raise AssertionError(f"studio/{module} is in no layer; add it to one in tests/test_layering.py")


def studio_imports(source: str) -> set[str]:
    """The studio modules (first component under `studio.`) imported anywhere in `source`, except under
    `if TYPE_CHECKING:`."""
    tree = ast.parse(source)
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "studio":
            names = [node.module] if node.module != "studio" else [f"studio.{a.name}" for a in node.names]
            found.update(_module_name(name.split(".")[1:]) for name in names)
        elif isinstance(node, ast.Import):
            found.update(_module_name(a.name.split(".")[1:]) for a in node.names if a.name.startswith("studio."))
    return found


def _module_name(parts: list[str]) -> str:
    """`zoo.corpora` for a module of a split package, else the top-level module or package."""
    return ".".join(parts[:2]) if parts[0] in SPLIT and len(parts) > 1 else parts[0]


def modules() -> dict[str, set[str]]:
    """Each top-level module or package of studio/ and what it imports of the others."""
    found: dict[str, set[str]] = {}
    for path in STUDIO.rglob("*.py"):
        parts = list(path.relative_to(STUDIO).with_suffix("").parts)
        name = _module_name(parts if parts[-1] != "__init__" or len(parts) == 1 else parts[:-1])
        found.setdefault(name, set()).update(studio_imports(path.read_text()))
    return {name: imports - {name} for name, imports in found.items()}


def test_studio_imports_skips_type_checking_blocks_and_reads_every_depth():
    source = ("from studio.config import x\nif TYPE_CHECKING:\n    from studio.build.gates import G\n"
              "def f():\n    from studio import merge\n    import studio.inspect.plots\n")
    assert studio_imports(source) == {"config", "merge", "plots"}


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


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
