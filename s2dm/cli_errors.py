"""How a library error reads on the command line: its ``key`` as the verb's flag (``n`` →
``--n``), options that library messages spell as Python keyword arguments (``force=True``,
``resume='never'``) spelt as the verb's flags (``--force``, ``--resume never``), and a Python
warning as one ``warning:`` line. ``cli.py`` parses; this module only words.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

from .errors import S2dmError
from .util import dist


# An error's key as the Python API spells it, where the flag's dest is another name.
KEY_DESTS = {"overrides": "set", "use_ema": "ema", "weights": "classifier"}  # weights: FD-cnn's (Inception's is inception_weights)


def _option_of(parser: argparse.ArgumentParser, verb: str, key: Optional[str]) -> Optional[argparse.Action]:
    """The flag-taking argument of ``verb`` that ``key`` (an API name) names, or None."""
    if not key:
        return None
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    dest = KEY_DESTS.get(key, key)
    return next((a for a in verbs[verb]._actions if a.dest == dest and a.option_strings), None)


def flag_of(parser: argparse.ArgumentParser, verb: str, key: Optional[str]) -> Optional[str]:
    """The flag of ``verb``'s argument that an error's ``key`` names (``eps_scale`` →
    ``--eps-scale``), or None (no key, a config key, a positional argument)."""
    action = _option_of(parser, verb, key)
    return action.option_strings[0] if action else None  # the long name: --n, not its alias --num-images


# An option as library messages spell it, a Python keyword argument: force=True, resume='never',
# image_size=32 (not a config key such as model.ch=32: no dot or word character before it).
_NAME, _VALUE = r"[a-z_][a-z0-9_]*", r"True|False|'[^']*'|-?\d+(?:\.\d+)?|[A-Z][A-Z_]*"  # PATH: a placeholder
_EDGES = (r"(?<![\w.\-])", r"(?!\w|\.\w)")
KWARG = re.compile(rf"{_EDGES[0]}({_NAME})=({_VALUE}){_EDGES[1]}")
KWARG_RUN = re.compile(rf"{_EDGES[0]}{_NAME}=(?:{_VALUE})(?:, {_NAME}=(?:{_VALUE}))*{_EDGES[1]}")


def spell_option(parser: argparse.ArgumentParser, verb: str, name: str, value: str) -> Optional[str]:
    """``force=True`` → ``--force``, ``use_ema=False`` → ``--no-ema``, ``resume='never'`` →
    ``--resume never``; None where ``name`` is not one of ``verb``'s flags."""
    action = _option_of(parser, verb, name)
    if action is None:
        return None
    if value in ("True", "False"):
        want = "--no-" if value == "False" else "--"
        # store_true's flag, or BooleanOptionalAction's --x / --no-x
        return next((f for f in action.option_strings if f.startswith(want) and
                     (value == "False" or not f.startswith("--no-"))), None)
    return f"{action.option_strings[0]} {value.strip(chr(39))}"


def spell_options(text: str, spell) -> str:
    """``text`` with each run of keyword arguments (``resume='never', force=True``) spelt by
    ``spell(name, value)`` as flags (``--resume never --force``) where every one is a flag."""
    def one_run(m: re.Match) -> str:
        parts = KWARG.findall(m.group(0))
        flags = [spell(name, value) for name, value in parts]
        return m.group(0) if None in flags else " ".join(flags)
    return KWARG_RUN.sub(one_run, text)


def error_message(exc: S2dmError, flag: Optional[str], spell=None) -> str:
    """The error's message naming ``flag``: its leading key replaced by the flag
    (``n must be ...`` → ``--n must be ...``), else the flag put in front (``--out: ...``)
    unless the message names it already; ``spell``: see ``spell_options``."""
    text = str(exc)
    if flag is not None:
        lead = re.match(rf"{re.escape(exc.key)}(?![\w.=])", text)  # not "force=True ...": spell's
        text = flag + text[lead.end():] if lead else text
        again = re.match(rf"{re.escape(flag)}: {re.escape(exc.key)}(?![\w.])", text)  # "steps: steps must be ..."
        text = flag + text[again.end():] if again else text
    if spell is not None:
        text = spell_options(text, spell)
    named = (flag, "--no-" + flag[2:]) if flag is not None else ()  # --ema is named by --no-ema too
    if flag is not None and not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text) for f in named):
        text = f"{flag}: {text}"
    return text


def one_line_warnings():
    """A ``warnings.showwarning`` for one command: each Python warning as one ``warning:``
    line (not the file, line number and source line that mean nothing to a CLI user), each
    line once (a grid's warning comes up at every evaluation of a training run and in every
    cell of ``s2dm eval``), and under torchrun by rank 0 only."""
    said = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"warning: {message}"
        if dist.env_rank() != 0:  # under torchrun every rank meets the same warning: rank 0 says it
            return
        if text not in said:
            said.add(text)
            print(text, file=sys.stderr if file is None else file)

    return show
