"""Architecture rules that code review alone would not keep: layers point downward, no import cycles."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"eval": "unconfuse.eval", "train": "unconfuse.train", "recipes": "unconfuse.recipes", "cli": "unconfuse.cli"}
# the eval core: data model, images, benchmark arguments, scorer, prompts, model backends, runner, launcher, checkpoint conversion
# (convert: the CLI in eval/tools and the tiny twins in eval/world both use it)
CORE = ("unconfuse.eval.home", "unconfuse.eval.io", "unconfuse.eval.pairs", "unconfuse.eval.benchmarks",
        "unconfuse.eval.images", "unconfuse.eval.scorer", "unconfuse.eval.prompts", "unconfuse.eval.models",
        "unconfuse.eval.runner", "unconfuse.eval.runs", "unconfuse.eval.judge", "unconfuse.eval.download",
        "unconfuse.eval.splits", "unconfuse.eval.http", "unconfuse.eval.options", "unconfuse.eval.convert",
        "unconfuse.eval.launch", "unconfuse.eval.stats", "unconfuse.eval.folders", "unconfuse.eval.leakage",
        "unconfuse.eval.tracking", "unconfuse.eval.evaluation", "unconfuse.eval.retention")


def module_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (imports inside functions too)."""
    files = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.with_suffix("").relative_to(REPO / folder).parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 30
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles


def test_the_cycle_check_has_teeth(tmp_path, monkeypatch):
    graph = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "module_graph", lambda: graph | {f"m{i}": set() for i in range(40)})
    try:
        test_no_import_cycles()
    except AssertionError:
        return
    raise AssertionError("a two-module cycle went unnoticed")


def test_layers_point_downward():
    """cli -> recipes -> train -> eval tools -> eval world -> eval core, never upward."""
    graph = module_graph()

    def imports(prefixes, forbidden):
        return sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(prefixes)
                      for t in targets if t.startswith(forbidden))

    assert not imports(("unconfuse.eval",), ("unconfuse.train", "unconfuse.recipes", "unconfuse.cli"))
    assert not imports(CORE, ("unconfuse.eval.world", "unconfuse.eval.tools"))
    assert not imports(("unconfuse.eval.world",), ("unconfuse.eval.tools",))
    assert not imports(("unconfuse.train",), ("unconfuse.recipes", "unconfuse.cli"))
    assert not imports(("unconfuse.recipes",), ("unconfuse.cli",))


def test_the_layer_check_has_teeth(monkeypatch):
    graph = module_graph()
    graph["unconfuse.train.lifecycle"] = graph["unconfuse.train.lifecycle"] | {"unconfuse.recipes"}
    monkeypatch.setattr(sys.modules[__name__], "module_graph", lambda: graph)
    try:
        test_layers_point_downward()
    except AssertionError:
        return
    raise AssertionError("train importing recipes went unnoticed")


def in_a_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a new Python; it exits 0 or the test fails with what it printed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_core_loads_nothing_of_the_world_and_no_torch_for_scoring():
    code = ("import sys, unconfuse.eval.scorer, unconfuse.eval.pairs, unconfuse.eval.benchmarks, unconfuse.eval.runs; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "import unconfuse.eval.models, unconfuse.eval.runner; "
            "bad += [m for m in sys.modules if m.startswith(('unconfuse.eval.world', 'unconfuse.eval.tools', 'unconfuse.train', "
            "'unconfuse.recipes', 'unconfuse.cli'))]; "
            "print(bad); sys.exit(bool(bad))")
    in_a_fresh_interpreter(code)


def test_no_top_level_train_or_eval_modules_are_installed():
    code = "import importlib.util as u; print(u.find_spec('train'), u.find_spec('eval'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.stdout.strip() == "None None"


def test_importing_unconfuse_has_no_side_effects():
    """The packages a notebook imports load no torch, and leave the warning filters and the environment as they were."""
    code = ("import os, sys, warnings, numpy; "  # numpy adds its own filters on import
            "filters, env = list(warnings.filters), dict(os.environ); "
            "import unconfuse.eval, unconfuse.train, unconfuse.recipes, unconfuse.cli; "
            "from unconfuse.eval import load_benchmark, load_model, evaluate, compare; "
            "from unconfuse.recipes import run_recipe, RECIPES; "
            "bad = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; "
            "bad += ['warnings'] if warnings.filters != filters else []; "
            "bad += [k for k in set(os.environ) ^ set(env)] + [k for k in env if os.environ.get(k) != env[k]]; "
            "print(bad); sys.exit(bool(bad))")
    in_a_fresh_interpreter(code)


def test_the_cli_entry_point_stays_the_function_once_the_commands_are_imported():
    """``unconfuse.cli.main`` (the entry point) is a function, and no submodule of ``unconfuse.cli`` shadows it once
    imported (a submodule named ``main`` did: ``from unconfuse.cli import main`` then gave a module)."""
    import importlib

    importlib.import_module("unconfuse.cli.commands")
    from unconfuse.cli import main

    assert callable(main) and main.__module__ == "unconfuse.cli"
