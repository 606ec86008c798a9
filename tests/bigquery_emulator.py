"""A real BigQuery API on 127.0.0.1 for the ``bigquery`` tests: bqemulator (PyPI).

bqemulator (DuckDB-backed, REST + gRPC) runs as a subprocess on free ports, like moto and
fake-gcs-server (tests/objectstores.py). At start it installs DuckDB's ``spatial``
extension, which it would download; offline, the copy in PyPI's
``duckdb-extension-spatial`` wheel (same DuckDB version) is put where DuckDB looks for
installed extensions, ``$HOME/.duckdb/extensions/vVERSION/PLATFORM/``, under a HOME of
the server's own. ``env`` points dn2 (and google-cloud-bigquery) at it:
BIGQUERY_EMULATOR_HOST, which dn2 honours with anonymous credentials.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tests.objectstores import Server, free_port


def spatial_extension() -> Path:
    """The spatial extension file of the installed duckdb-extension-spatial wheel."""
    import duckdb
    import duckdb_extension_spatial

    found = (Path(duckdb_extension_spatial.__file__).parent / "extensions"
             / f"v{duckdb.__version__}" / "spatial.duckdb_extension")
    if not found.exists():
        raise RuntimeError(f"{found} not found: install duckdb-extension-spatial=="
                           f"{duckdb.__version__} (setup.py's dev extras pin both)")
    return found


def duckdb_platform() -> str:
    import duckdb

    return duckdb.sql("PRAGMA platform").fetchone()[0]


class BigQueryEmulator(Server):
    """bqemulator's REST API (in memory), its DuckDB extensions installed offline."""

    ready_path = "/bigquery/v2/projects/dn2-test/datasets"

    def __init__(self, log_dir: Path):
        super().__init__(log_dir)
        self.grpc_port = free_port()
        self.home = log_dir / "home"
        import duckdb

        target = self.home / ".duckdb" / "extensions" / f"v{duckdb.__version__}" / duckdb_platform()
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(spatial_extension(), target / "spatial.duckdb_extension")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bqemulator", "start", "--ephemeral",
                "--rest-host", "127.0.0.1", "--rest-port", str(self.port),
                "--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--log-level", "warning"]

    def process_env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home)}

    @property
    def env(self) -> dict[str, str]:
        return {"BIGQUERY_EMULATOR_HOST": self.url}

    def client(self, project: str):
        """A google-cloud-bigquery client of ``project`` on the emulator (anonymous)."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                               client_options=ClientOptions(api_endpoint=self.url))
