"""The package's import map: imports run downward only and there is no cycle, counting imports inside functions
too (a function-level import must never hide a cycle). Levels, lowest first: quant/paths/config/ops/cache, layers,
distributed (collectives, the shard plan), models, backends, engine/train, and the user-facing modules above them."""

import ast
from pathlib import Path

import qwen35

ROOT = Path(qwen35.__file__).parent
# A module in the first group never imports one in the second.
RULES = [
    (("qwen35.quant", "qwen35.paths", "qwen35.ops", "qwen35.cache", "qwen35.layers", "qwen35.models"),
     ("qwen35.backends", "qwen35.engine", "qwen35.train", "qwen35.llm", "qwen35.serve", "qwen35.cli", "qwen35.demo",
      "qwen35.chat")),
    (("qwen35.ops", "qwen35.cache", "qwen35.quant", "qwen35.paths"), ("qwen35.layers", "qwen35.models",
                                                                       "qwen35.distributed")),
    (("qwen35.distributed",), ("qwen35.models", "qwen35.backends", "qwen35.engine", "qwen35.train", "qwen35.llm",
                               "qwen35.serve", "qwen35.cli")),
    (("qwen35.backends",), ("qwen35.engine", "qwen35.train", "qwen35.llm", "qwen35.serve", "qwen35.cli",
                            "qwen35.demo")),
]


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("qwen35", *p.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwen35"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("qwen35"))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_imports_run_downward():
    bad = [(m, d) for m, deps in import_graph().items() for low, high in RULES if under(m, low)
           for d in deps if under(d, high)]
    assert not bad, bad


def test_no_import_cycle():
    graph = import_graph()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package importing its own submodule
                continue
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
