"""dn2ops: the operations of the dn2 pipelines, one package per stage (docs/architecture.md).

torch is not imported here: a worker that embeds with an exported model (ONNX Runtime,
OpenVINO) never needs it, and it costs 0.5 GB of RSS a process (docs/memory.md,
"Embedding workers"). dn2ops.index imports it before faiss (see there).

For the same reason dn2ops marks Beam's RunInference model manager absent, before Beam's
RunInference module loads, if it has not loaded yet: in Beam 2.77,
``apache_beam.ml.inference.base`` imports ``apache_beam.ml.inference.model_manager``,
which imports torch (to watch GPU memory) whenever torch is installed, and handles its
absence (``ModelManager = None``) as on a machine without torch. dn2 never asks for the
model manager (RunInference's ``use_model_manager`` stays False); tests/dn2ops/
test_import_order.py checks that RunInference then loads without torch.
"""

import sys as _sys

if "apache_beam.ml.inference.base" not in _sys.modules:
    _sys.modules.setdefault("apache_beam.ml.inference.model_manager", None)
