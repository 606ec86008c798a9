"""The ``dn2`` command: dispatches to one entry point per subcommand."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "embed": ("pipelines.embed", "images -> feature shards"),
    "build-index": ("pipelines.build_index", "normal feature shards -> index"),
    "score": ("pipelines.score", "images or features x index -> ranked anomalies"),
    "run": ("pipelines.run", "embed normal, build index, embed and score input"),
    "report": ("pipelines.report", "results -> one self-contained HTML page"),
    "load-bigquery": ("pipelines.load_bigquery", "committed results -> BigQuery tables"),
}

USAGE = ("usage: dn2 {" + ",".join(COMMANDS) + "} [--verbose] [options]\n\n"
         + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
         + "\n\n  --verbose    also show the INFO logs of Beam, botocore, gcsfs, faiss, ...")

# Libraries that log at INFO what a dn2 user does not need: botocore two lines for every
# file Beam's S3 filesystem touches, faiss.loader its CPU probing at import, Beam its
# worker chatter. Every other library inherits the root logger's WARNING too.
QUIET = ("apache_beam", "botocore", "boto3", "s3transfer", "aiobotocore", "s3fs", "gcsfs",
         "fsspec", "urllib3", "google", "google_auth_httplib2", "faiss", "faiss.loader",
         "asyncio")

LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


def configure_logging(verbose: bool = False) -> None:
    """dn2's own progress at INFO; everything else at WARNING unless ``verbose``.

    Called before any subcommand module is imported: faiss logs its loader's probing
    when first imported.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("dn2").setLevel(logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dn2: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    configure_logging(verbose="--verbose" in rest)
    rest = [a for a in rest if a != "--verbose"]
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcsfs reads this when imported: its experimental zonal-bucket support probes
        # GCS over gRPC, which an emulator lacks (a 60 s wait per call).
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return importlib.import_module(COMMANDS[command][0]).run(rest)


def console() -> int:
    """The ``dn2`` program (its console script, ``python -m pipelines.cli``): ``main``,
    then an exit without the interpreter's last garbage collection, 0.4 s of every
    ``dn2`` process's end after a job (dn2ops.skip_final_collection). ``main`` alone
    stays the function to call from Python (tests, deploy/launcher.py)."""
    code = main()
    from dn2ops import skip_final_collection

    skip_final_collection()
    return code


if __name__ == "__main__":
    sys.exit(console())
