"""dn2ops: the operations of the dn2 pipelines, one package per stage (docs/architecture.md).

torch is not imported here: a worker that embeds with an exported model (ONNX Runtime,
OpenVINO) never needs it, and it costs 0.5 GB of RSS a process (docs/memory.md,
"Embedding workers"). dn2ops.index imports it before faiss (see there).

For the same reason dn2ops puts a stand-in for Beam's RunInference model manager in
place, before Beam's RunInference module loads, if it has not loaded yet: in Beam 2.77,
``apache_beam.ml.inference.base`` imports ``apache_beam.ml.inference.model_manager``,
which imports torch (to watch GPU memory) whenever torch is installed. dn2 never asks for
the model manager (RunInference's ``use_model_manager`` stays False); the stand-in's
``ModelManager`` refuses to be built, with a message. (A stand-in, not an absent module:
Beam imports the stdlib ``resource`` in the same ``try``, and would lose its memory
figures.) tests/dn2ops/test_import_order.py checks that RunInference then runs, without
torch.
"""

import sys as _sys
import types as _types

_MODEL_MANAGER = "apache_beam.ml.inference.model_manager"


class _NoModelManager:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("dn2 keeps Beam's RunInference model manager out of its processes "
                           "(it imports torch; see dn2ops/__init__.py): use_model_manager is "
                           "not supported")


if "apache_beam.ml.inference.base" not in _sys.modules and _MODEL_MANAGER not in _sys.modules:
    _stand_in = _types.ModuleType(_MODEL_MANAGER, "dn2's stand-in: see dn2ops/__init__.py")
    _stand_in.ModelManager = _NoModelManager
    _sys.modules[_MODEL_MANAGER] = _stand_in
