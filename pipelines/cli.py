"""The ``dn2`` command: dispatches to one entry point per subcommand."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS = {
    "embed": ("pipelines.embed", "images -> feature shards"),
    "build-index": ("pipelines.build_index", "normal feature shards -> index"),
    "score": ("pipelines.score", "images or features x index -> ranked anomalies"),
    "run": ("pipelines.run", "embed normal, build index, embed and score input"),
    "report": ("pipelines.report", "results -> one self-contained HTML page"),
}

USAGE = "usage: dn2 {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(
    f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dn2: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # dn2 logs progress itself
    return importlib.import_module(COMMANDS[command][0]).run(rest)


if __name__ == "__main__":
    sys.exit(main())
