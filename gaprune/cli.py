"""`gaprune`: one front door to the commands, each of which also runs as `python -m <module>`.

    gaprune search   --params 0.25           search a smaller architecture (python -m ga.run)
    gaprune export   --chromosome best.json   write the compact model untrained, in seconds
    gaprune heal     --chromosome best.json   heal it by training, measure before and after (python -m finetune.best)
    gaprune evaluate --folder compact         held-out perplexity, KL and top-1 (python -m evaluators.evaluate)

`gaprune <command> --help` lists a command's options; every command reads --config FILE and
prints its resolved settings with --print-config.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module whose main() runs it, arguments it always gets first, one line of help)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "search": ("ga.run", (), "search which layers, sub-layers and widths to keep under a budget"),
    "export": ("finetune.best", ("--steps", "0"), "write a chromosome's compact model, repaired, untrained"),
    "heal": ("finetune.best", (), "heal a chromosome's compact model by training; measure before and after"),
    "evaluate": ("evaluators.evaluate", (), "held-out perplexity, KL from the dense model and top-1 agreement"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: gaprune <command> [options]   (gaprune <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module, fixed, _ = COMMANDS[name]
    if fixed and any(arg.split("=")[0] in fixed[::2] for arg in rest):
        print(f"error: gaprune {name} sets {' '.join(fixed)} itself; use gaprune heal to choose them", file=sys.stderr)
        return 2
    sys.argv[0] = f"gaprune {name}"
    return importlib.import_module(module).main([*fixed, *rest])


if __name__ == "__main__":
    sys.exit(main())
