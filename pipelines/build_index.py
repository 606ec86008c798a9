"""dn2 build-index --features FEATURES_DIR --output INDEX_DIR [--k 2] [--kmeans C] ...
dn2 build-index --add FEATURES_DIR --index INDEX_DIR --output NEW_INDEX_DIR [--retrain]"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None) -> int:
    args, _ = options.parse("build-index", argv)
    if args.add:
        return guarded(lambda: jobs.add(
            features_dir=args.add, index=args.index, output=args.output, retrain=args.retrain,
            config=args.config), "build-index")
    return guarded(lambda: jobs.build(
        features_dir=args.features, output=args.output, config=args.config), "build-index")
