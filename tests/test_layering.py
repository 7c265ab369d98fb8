"""The layering of the source tree, read from its import statements (every ``import``, also those inside
functions): the lower folders never import the exporter, and no two files import each other, directly
or through others, but for the cycles :data:`KNOWN_CYCLES` names (docs/ARCHITECTURE.md, "Layers").
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = ("exporter", "passes", "custom_ops", "samples")
BELOW_EXPORTER = ("passes", "custom_ops", "samples")


def _module_name(path: str) -> str:
    """``exporter/backends/onnx/export.py`` -> ``effexport.exporter.backends.onnx.export``; the files of
    ``exporter/_root/`` are the package root ``effexport``."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[:2] == ["exporter", "_root"]:
        parts = parts[2:]
    return ".".join(["effexport", *parts])


def _folder(module: str) -> str:
    """The top-level folder a module's file is in (the package root's files are in ``exporter/``)."""
    part = module.split(".")[1] if "." in module else ""
    return part if part in TOP_LEVEL else "exporter"


def _modules() -> dict[str, str]:
    """Module name -> file path of every source module."""
    out = {}
    for top in TOP_LEVEL:
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    out[_module_name(path)] = path
    return out


def _imported(path: str) -> set[str]:
    """Every name an import statement in ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _import_graph() -> dict[str, set[str]]:
    """Module -> the source modules it imports (a name resolves to its longest module prefix; a
    package's own parents, which Python imports anyway, are left out)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = set()
        for name in _imported(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                deps.add(name)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_lower_folders_never_import_the_exporter():
    graph = _import_graph()
    upward = sorted(f"{module} -> {dep}" for module, deps in graph.items() for dep in deps
                    if _folder(module) in BELOW_EXPORTER and _folder(dep) == "exporter")
    assert upward == []


def test_samples_and_custom_ops_import_no_other_top_level_folder():
    graph = _import_graph()
    crossing = sorted(f"{module} -> {dep}" for module, deps in graph.items() for dep in deps
                      if _folder(module) in ("samples", "custom_ops") and _folder(dep) != _folder(module))
    assert crossing == []


KNOWN_CYCLES = [
    # passes/_compressed_hf.py reuses compressed.py's matcher internals, and compressed.py dispatches to it
    # and to _compressed_write.py: gone once the compressed matchers share one matcher toolkit module
    ["effexport.passes._compressed_hf", "effexport.passes._compressed_write", "effexport.passes.compressed"],
]


def test_no_import_cycles_between_files():
    assert _cycles(_import_graph()) == KNOWN_CYCLES


def test_the_scan_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
