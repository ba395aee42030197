"""Docs that cannot drift from the commands: every `vit-*` or `python -m vit_train...` command in a fenced shell
block of README.md or docs/*.md is parsed by that command's own parser, its `--set` keys looked up in the config
(the recipe's, with --config), and every recipe (--config) and model (--model) it names resolved.

The parsers are found, not listed: every `*_parser()` function of vit_train/cli.py and of the vit_train.bench
modules, known by the program name it gives argparse (`vit-eval`, `python -m vit_train.bench.model_step`).
"""
import importlib
import inspect
import pkgutil
import re
import shlex
from pathlib import Path

import pytest

import vit_train.bench
import vit_train.cli
from vit_train.config import DEFAULT_RECIPES, get_key, load_recipe, parse_assignment
from vit_train.errors import UserError
from vit_train.models import get_config

ROOT = Path(__file__).resolve().parents[1]
SHELL_BLOCK = re.compile(r"^```(sh|bash|console|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {"&&", "||", ";", "|"}


def parsers() -> dict:
    """{program name as a user types it: its argparse parser}, from every *_parser() builder of the tools and the
    benchmarks; `python -m vit_train` is vit-train (vit_train/__main__.py)."""
    modules = [vit_train.cli] + [importlib.import_module(info.name) for info in
                                 pkgutil.iter_modules(vit_train.bench.__path__, "vit_train.bench.")]
    found = {}
    for module in modules:
        for name, build in inspect.getmembers(module, inspect.isfunction):
            if name.endswith("_parser") and build.__module__ == module.__name__:
                parser = build()
                found[parser.prog] = parser
    found["python -m vit_train"] = found["vit-train"]
    return found


PARSERS = parsers()


def commands_in(markdown: str):
    """(line, the command's words) for each command in the page's shell blocks: continuation lines joined,
    comments and console output dropped, split at && ; | and ||."""
    for match in SHELL_BLOCK.finditer(markdown):
        first_line = markdown[:match.start()].count("\n") + 2
        continued, start = "", None
        for offset, line in enumerate(match.group(2).split("\n")):
            start = offset if start is None else start
            if line.endswith("\\"):  # continued on the next line; the command keeps its first line's number
                continued += line[:-1] + " "
                continue
            line, continued, number, start = continued + line, "", first_line + start, None
            if match.group(1) == "console":  # `$ command` lines; the rest is what it printed
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            command = []
            for word in [*lexer, ";"]:
                if word in SEPARATORS:
                    if command:
                        yield number, command
                    command = []
                else:
                    command.append(word)


def documented_commands():
    """(page:line, the command's words) for every command in README.md and docs/*.md."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, words in commands_in(page.read_text()):
            yield f"{page.relative_to(ROOT)}:{line}", words


def program_and_arguments(words):
    """(program name as in PARSERS, its arguments), or None for a command that is not ours (pip, torchrun's
    script, scripts/*.sh). Environment assignments before the command and a path before its name (.venv/bin/)
    are dropped; `torchrun ... -m vit_train` and `python -m MODULE` are our programs."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if not words:
        return None
    name = Path(words[0]).name
    if name.startswith("vit-"):
        return name, words[1:]
    if (re.fullmatch(r"python[0-9.]*|torchrun", name) and "-m" in words
            and words[words.index("-m") + 1].split(".")[0] == "vit_train"):
        module = words.index("-m") + 1
        return f"python -m {words[module]}", words[module + 1:]
    return None


def without_placeholders(arguments):
    """Optional parts written `[--json eval.json]` lose their brackets; `...` stands for more and goes."""
    return [word.strip("[]") for word in arguments if word.strip("[]") not in ("", "...", "…")]


def check_names_and_keys(program, args):
    """Recipes and models named must resolve; --set keys must exist in the config they would change."""
    if program in ("vit-train", "python -m vit_train"):
        recipe = load_recipe(args.config or DEFAULT_RECIPES[bool(getattr(args, "pretrained", None))])
        model_name = getattr(args, "model_name", None) or recipe.model_name
        sets = args.set
    elif program == "python -m vit_train.bench.time_to_accuracy":
        recipe, model_name, sets = load_recipe("cifar10_cpu"), None, args.set
    else:
        recipe, model_name, sets = None, getattr(args, "model", None), []
    assignments = [parse_assignment(text) for text in sets]
    model_name = dict(assignments).get("model_name", model_name)
    if model_name:
        get_config(model_name)
    for key, _ in assignments:
        if key.startswith("model."):  # the model's keys: the recipe's own model, else the named model's
            model = recipe.model if recipe.model is not None and model_name == recipe.model_name else \
                get_config(model_name)
            get_key(model, key[len("model."):])
        else:
            get_key(recipe, key)


def check_command(words):
    """None for a command that is ours and right, or not ours; else what is wrong with it."""
    found = program_and_arguments(words)
    if found is None:
        return None
    program, arguments = found
    if program not in PARSERS:
        return f"no such program: {program} (programs: {', '.join(sorted(PARSERS))})"
    try:
        args = PARSERS[program].parse_args(without_placeholders(arguments))
        check_names_and_keys(program, args)
    except UserError as error:
        return str(error)
    except SystemExit:  # --help or --version: they print and exit 0, which is right
        return None
    return None


COMMANDS = list(documented_commands())


def test_the_docs_show_commands_of_every_tool():
    shown = {program_and_arguments(words)[0] for _, words in COMMANDS if program_and_arguments(words)}
    assert {"vit-train", "vit-eval", "vit-predict", "vit-attention", "vit-export",
            "python -m vit_train.bench.model_step", "python -m vit_train.bench.time_to_accuracy",
            "python -m vit_train.bench.pipeline_overhead"} <= shown, shown


@pytest.mark.parametrize("where, words", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_documented_command_parses_and_names_what_exists(where, words):
    assert check_command(words) is None, f"{where}: {shlex.join(words)}: {check_command(words)}"


@pytest.mark.parametrize("command, fragment", [
    ("vit-train --batch 64", "unrecognized arguments: --batch"),
    ("vit-train --config no_such_recipe", "recipe"),
    ("vit-train --model ViT-Q_3", "unknown model"),
    ("vit-train --set optim.no_such_key=1", "unknown config key 'optim.no_such_key'"),
    ("vit-train --model testing --set model.transformer.no_such_key=1", "unknown config key"),
    ("vit-eval --checkpoint runs/NAME --top-k 3", "unrecognized arguments: --top-k"),
    (".venv/bin/python -m vit_train.bench.model_step --model ViT-Q_3", "unknown model"),
    ("python -m vit_train.bench.time_to_accuracy --set optim.nope=1", "unknown config key"),
    ("python -m vit_train.bench.nope --help", "no such program"),
])
def test_the_check_catches_what_drifted(command, fragment):
    assert fragment in check_command(shlex.split(command))


def test_the_command_reader_follows_the_shell():
    page = ("```sh\nCUDA_VISIBLE_DEVICES=0 .venv/bin/vit-train --model testing \\\n  --steps 2  # a comment\n"
            "pip install -e . && vit-eval --checkpoint runs/x [--json e.json] ...\n```\n"
            "```console\n$ vit-predict --checkpoint r a.png\nr\n  0.9  cat\n```\n")
    assert [program_and_arguments(words) for _, words in commands_in(page)] == [
        ("vit-train", ["--model", "testing", "--steps", "2"]), None,
        ("vit-eval", ["--checkpoint", "runs/x", "[--json", "e.json]", "..."]),
        ("vit-predict", ["--checkpoint", "r", "a.png"])]
    assert without_placeholders(["--checkpoint", "runs/x", "[--json", "e.json]", "..."]) == \
        ["--checkpoint", "runs/x", "--json", "e.json"]
