"""The package's shape: imports run one way (cli -> resolve -> train / export -> predict -> evaluate -> data /
models / checkpoint -> runtime -> config), so a newcomer can follow a batch or a config in one direction; and the
command line parses without torch."""
import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import vit_train

PACKAGE_DIR = Path(vit_train.__file__).parent


def module_files():
    """{module name: source file} for every module of vit_train, packages included."""
    files = {}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="vit_train."):
        relative = info.name.split(".")[1:]
        path = PACKAGE_DIR.joinpath(*relative)
        files[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    files["vit_train"] = PACKAGE_DIR / "__init__.py"
    return files


# The command lines (the tools' and the benchmarks') import each command's modules (and torch) after parsing its
# arguments; nowhere else may an import wait inside a function.
DEFERRED_IMPORTS_IN = {"vit_train.cli", "vit_train.bench.model_step", "vit_train.bench.muon_step",
                       "vit_train.bench.pipeline_overhead", "vit_train.bench.time_to_accuracy"}


def top_level_imports(path: Path, modules: set, inside_functions=False) -> set:
    """The vit_train modules a file imports at its top level, or anywhere in it with `inside_functions`."""
    imported = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if inside_functions else tree.body):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from vit_train.data import augment` imports the submodule; `from vit_train.data import X` the package
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        imported.update(name for name in names if name in modules)
    return imported


def import_graph():
    """{module: the vit_train modules it imports}, deferred imports included: a module imported later still
    must not import back up."""
    files = module_files()
    # Edges are explicit imports only. Importing a.b also runs a/__init__ first, but that is no cycle even when
    # a/__init__ imports a.b: Python finishes the package's own imports before the submodule's body runs on.
    return {name: top_level_imports(path, set(files), inside_functions=True) for name, path in files.items()}


def find_cycle(graph):
    """A list of modules forming an import cycle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert {"vit_train.cli", "vit_train.train", "vit_train.data.loaders", "vit_train.runtime"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_vit_train_import_hides_inside_a_function():
    """An import of our own modules inside a function is how a cycle gets dodged; optional third-party
    packages (matplotlib, timm) may still be imported where they are needed, and the command line imports its
    commands' modules after parsing (their edges are in the graph the cycle test walks)."""
    for name, path in module_files().items():
        if name in DEFERRED_IMPORTS_IN:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("vit_train")):
                        raise AssertionError(f"{name}.{node.name} imports {inner.module} inside a function")
                    if isinstance(inner, ast.Import) and any(a.name.startswith("vit_train") for a in inner.names):
                        raise AssertionError(f"{name}.{node.name} imports vit_train inside a function")


def test_layers_import_downhill_only():
    """Lower layers never import higher ones: e.g. evaluate must not import train, config or cli. Modules in one
    tier do not depend on each other (the export and the training loop); the per-image tools sit between
    training, which logs an attention picture, and the evaluation whose loaded model they take."""
    tiers = [["vit_train.cli"], ["vit_train.resolve"], ["vit_train.train", "vit_train.export"], ["vit_train.predict"],
             ["vit_train.evaluate"]]
    graph = import_graph()
    for i, upper_tier in enumerate(tiers):
        for lower in [module for tier in tiers[i + 1:] for module in tier]:
            for upper in upper_tier:
                assert upper not in graph[lower], f"{lower} imports {upper}, which sits above it"
    layered = {module for tier in tiers for module in tier}
    below_all = {"vit_train.runtime", "vit_train.errors", "vit_train.checkpoint", "vit_train.config"}
    for module in below_all:
        assert not graph[module] & layered, f"{module} imports {graph[module] & layered}"


def test_every_module_imports():
    """A module no test imports (a benchmark, say) still has to import: a moved name breaks it here, not for a user."""
    for name in module_files():
        if name != "vit_train.__main__":  # runs the command line
            importlib.import_module(name)


def test_the_command_line_parses_without_torch():
    """Every tool's --help, --version and usage errors come from modules that do not import torch (which takes
    seconds): building each parser, printing its help and reading both default recipes leave torch unimported."""
    probe = ("import sys, vit_train.cli as cli\n"
             "for build in (cli.train_parser, cli.eval_parser, cli.predict_parser, cli.attention_parser, "
             "cli.export_parser):\n"
             "    assert build().format_help().startswith('usage: vit-')\n"
             "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy', 'tqdm') if m in sys.modules)\n"
             "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the parsers imported {result.stdout.strip()}"
    for command, argv, message in [("train_main", ["--batch", "8"], "unrecognized arguments: --batch 8"),
                                   ("eval_main", [], "give --checkpoint"),
                                   ("eval_main", ["--checkpoint", "r", "--img-size", "64"], "--img-size goes with"),
                                   ("predict_main", ["--checkpoint", "r", "x.png", "--top-k", "0"], "--top-k"),
                                   ("export_main", ["--checkpoint", "r", "--out", ""], "--out is an empty path")]:
        usage_error = subprocess.run([sys.executable, "-c", f"import sys; from vit_train.cli import {command}; "
                                      f"code = {command}({argv!r}); print('torch' in sys.modules); sys.exit(code)"],
                                     capture_output=True, text=True, timeout=120)
        assert usage_error.returncode == 2 and usage_error.stdout.strip() == "False", usage_error
        assert usage_error.stderr.startswith(f"error: {message}") or message in usage_error.stderr, usage_error
    listing = subprocess.run([sys.executable, "-c", "import sys; from vit_train.cli import eval_main, train_main; "
                              "codes = [train_main(['--list-models']), train_main(['--list-pretrained']), "
                              "eval_main(['--list-pretrained'])]; print(codes, 'torch' in sys.modules)"],
                             capture_output=True, text=True, timeout=120)
    assert listing.stdout.strip().endswith("[0, 0, 0] False"), listing
