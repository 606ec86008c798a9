"""Resume after a crash (dn2 embed, dn2 score --input, so dn2 run; the local runner only):
the launcher's part.

A run that embeds stages into ``OUTPUT/_staging-KEY-RUN/`` (KEY: dn2ops.embed.resume.
resume_key) and seals its rows there as it goes (dn2ops.io.pieces). Holding the
output's lease, it adopts the checked pieces of the gone runs of the same KEY
(``adopt``), holds its staging folder's own lease while it runs (a commit into OUTPUT
leaves the staging of a run that still runs alone), and says what it resumed
(``log_resumed``). A failed run keeps its sealed pieces; a run that committed deletes
its staging, and its commit the staging folders it adopted.

On Dataflow (or a template launch) nothing is sealed: the service retries a failed
bundle itself, and a job that fails as a whole starts from zero when run again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from dn2ops.embed.export import CacheDirError, cache_root, private_dir
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.resume import Resume, resume_key
from dn2ops.engines.base import device_type, resolve_engine
from dn2ops.io import lease, outputs, pieces
from pipelines import checks, finalize

LOG = logging.getLogger("dn2")
RESUME_KEY = "resume.key"  # in dn2's cache: the key that signs sealed pieces


def key(input: str, plan: EmbedPlan, options: PipelineOptions) -> str | None:
    """The key a run that embeds ``input`` stages under, or None where it does not seal
    (a remote runner, a template launch). ``input`` counts as the place it names, not
    as it is spelled: a relative path, its absolute form and either with a trailing
    slash are one input (fsspec's canonical uri of it)."""
    if not checks.runs_here(options) or checks.is_template(options):
        return None
    c = plan.config
    fs, path = outputs.fs_and_path(input)
    return resume_key(plan, input=fs.unstrip_protocol(path),
                      engine=resolve_engine(c.engine, c.device), device=device_type(c.device))


@contextlib.contextmanager
def adopt(output: str, staging: str, key: str | None, plan: EmbedPlan
          ) -> Iterator[Resume | None]:
    """The Resume of the run staging into ``staging`` (None without ``key``): the pieces
    of the gone runs of ``key`` in ``output``, checked. Call it holding OUTPUT's lease.
    Holds ``staging``'s own lease while the block runs; then deletes ``staging`` (the
    block committed), or keeps its sealed pieces only (it failed)."""
    if key is None:
        yield None
        return
    key_bytes = secret(plan.config.cache_dir)
    found = pieces.find(output, key, staging, key_bytes)
    for other in found.others:
        LOG.info("%s holds sealed pieces of another input or configuration: not resumed "
                 "(this run's commit deletes them)", other)
    if found.pieces:
        LOG.info("found %s sealed pieces (%s images) left by %s; resuming", len(found.pieces),
                 found.images, ", ".join(found.runs))
    resume = Resume(staging, found.pieces,
                    piece_rows=pieces.CALLS_PER_PIECE * plan.config.batch_size,
                    piece_sha256=found.checksums, secret=key_bytes)
    try:
        with lease.hold(staging, finalize.run_id(staging)):
            yield resume
    except BaseException:
        outputs.discard(staging, keep=(pieces.PIECES,))  # the rest goes: a rerun needs none
        raise
    outputs.discard(staging)


def secret(cache_dir: str | None = None) -> bytes:
    """This user's resume key: 32 random bytes in dn2's cache (``cache_dir``, else
    $DN2_CACHE_DIR or the XDG cache: dn2ops.embed.export.cache_root), a file of mode
    0600 in a directory only its owner may write, made at first use. It signs the seals
    of the pieces a run leaves, so that a rerun adopts only pieces that this user's runs
    on this machine sealed (dn2ops.io.pieces)."""
    path = os.path.join(private_dir(cache_root(cache_dir)), RESUME_KEY)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise CacheDirError(f"{path} (dn2's resume key) is owned by uid {st.st_uid} "
                                f"with mode {stat.filemode(st.st_mode)}: it must be this "
                                "user's and readable by nobody else; delete it (dn2 makes "
                                "a new one)")
        data = f.read()
    if len(data) != 32:
        raise CacheDirError(f"{path} (dn2's resume key) holds {len(data)} bytes, not 32; "
                            "delete it (dn2 makes a new one)")
    return data


def log_resumed(result: Any, resume: Resume | None) -> None:
    """'resumed N of M images from K sealed pieces', from the run's ``dn2`` counters."""
    if resume is None or not resume.pieces:
        return
    try:
        found = result.metrics().query(MetricsFilter().with_namespace("dn2"))["counters"]
    except Exception:  # a runner without metrics: nothing to say
        return
    counts: dict[str, int] = {}
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + int(value or 0)
    LOG.info("resumed %s of %s images from %s sealed pieces", counts.get("resumed", 0),
             counts.get("listed", 0), len(resume.pieces))
