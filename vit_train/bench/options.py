"""What the benchmarks' command lines share beyond vit_train/cli.py's Parser and entry_point: argparse types for
their numbers and KEY=VALUE settings. No torch here: --help and usage errors answer before it is imported."""
import argparse
import ast


def positive_int(text) -> int:
    """argparse type of a count: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not {text!r}")
    return value


def assignment(text) -> tuple:
    """argparse type of a KEY=VALUE setting: (key, the value as a Python literal, else as the text itself)."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, not {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value
