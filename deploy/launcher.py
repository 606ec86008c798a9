"""Flex template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in deploy/Dockerfile).

The Dataflow launcher runs this file with the template's parameters
(deploy/metadata.json) as ``--name=value`` plus Beam's own options; it is the
nightly job ``dn2 score``, built against an index made once with
``dn2 build-index``.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
