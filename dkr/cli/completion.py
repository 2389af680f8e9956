"""Bash completion for dkr, written from the argument parser.

``python -m dkr.cli.completion > dkr/data/bash-completion/dkr`` makes the copy
the package installs (share/bash-completion/completions, where bash-completion
finds it for the dkr on PATH); a test checks it is current.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from dkr.cli.main import DEFAULT_IMAGE_ROOT
from dkr.cli.manpage import commands, options, positionals, value_name

# Values that name files or directories: complete paths after them.
PATH_VALUES = ("FILE", "DIR")


def _option_words(parser: argparse.ArgumentParser) -> tuple[list[str], list[str], list[str]]:
    """``parser``'s options, those that take a value, and those whose value is a path."""
    names, valued, paths = [], [], []
    for action in options(parser):
        names += action.option_strings
        if action.nargs != 0:
            valued += action.option_strings
            if value_name(action) in PATH_VALUES:
                paths += action.option_strings
    return names, valued, paths


def _choices(parser: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """(option, the words it takes) for options with a fixed set of values."""
    found = []
    for action in options(parser):
        words = [str(c) for c in action.choices] if action.choices else \
            ["true", "false"] if value_name(action) == "BOOL" else []
        found += [(name, words) for name in action.option_strings if words]
    return found


def _words(words: list[str]) -> str:
    return shlex.quote(" ".join(words))


def _names_machines(parser: argparse.ArgumentParser) -> bool:
    """Whether the command's first argument is a machine dkr made (LOCAL)."""
    first = next(positionals(parser), None)
    return first is not None and first.metavar == "LOCAL"


def _case_branch(pattern: str, parser: argparse.ArgumentParser, extra_words: list[str]) -> str:
    names, valued, paths = _option_words(parser)
    lines = [f"        {pattern})",
             f"            options={_words(names)} valued={_words(valued)}"
             f" paths={_words(paths)} words={_words(extra_words)}"]
    if _names_machines(parser):
        lines.append('            words=$(_dkr_machines "$root")')
    for option, words in _choices(parser):
        lines.append(f"            [[ $prev == {option} ]] && choices={_words(words)}")
    lines.append("            ;;")
    return "\n".join(lines)


def render(parser: argparse.ArgumentParser) -> str:
    found = commands(parser)
    names = [name for command in found for name in (command.name, *command.aliases)]
    _, top_valued, _ = _option_words(parser)
    others = [name for name in top_valued if name != "--image-root"]
    skip_values = f"""\
            {"|".join(others)}) [[ ${{COMP_WORDS[i+1]}} == "=" ]] && ((i++)); ((i++)) ;;
""" if others else ""
    branches = [_case_branch('""', parser, names)]
    branches += [_case_branch("|".join((c.name, *c.aliases)), c.parser, []) for c in found]
    branch_text = "\n".join(branches)
    return f"""\
# bash completion for dkr: its commands and their options.
# Written from dkr's argument parser by dkr.cli.completion; do not edit.

# The machines dkr made in image root $1: their records' names.
_dkr_machines() {{
    local record
    for record in "$1"/.dkr/machines/*.json; do
        [[ -e $record ]] && record=${{record##*/}} && printf '%s\\n' "${{record%.json}}"
    done
}}

_dkr() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    if [[ $prev == "=" ]]; then         # --option=value: bash splits at '='
        prev=${{COMP_WORDS[COMP_CWORD-2]}}
    elif [[ $cur == "=" ]]; then
        prev=${{COMP_WORDS[COMP_CWORD-1]}} cur=
    fi
    # The command: the first word that is neither an option nor an option's value;
    # and the image root, where the machines to offer are.
    local command= root={shlex.quote(DEFAULT_IMAGE_ROOT)} i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            --image-root)
                [[ ${{COMP_WORDS[i+1]}} == "=" ]] && ((i++))
                ((i++)); root=${{COMP_WORDS[i]}} ;;
{skip_values}            -*) ;;
            *) [[ -z $command ]] && command=${{COMP_WORDS[i]}} ;;
        esac
    done
    local options= valued= paths= words= choices=
    case $command in
{branch_text}
        *) return 0 ;;
    esac
    if [[ -n $choices ]]; then
        COMPREPLY=($(compgen -W "$choices" -- "$cur"))
    elif [[ " $paths " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ " $valued " == *" $prev "* ]]; then
        COMPREPLY=()
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    fi
}}
complete -F _dkr dkr
"""


def main() -> int:
    from dkr.cli.main import build_parser
    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
