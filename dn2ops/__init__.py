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

In a Beam SDK worker process (``python -m apache_beam.runners.worker.sdk_worker_main``,
which the local runner starts for ``--direct_running_mode multi_processing`` and which
runs on Dataflow's workers), importing dn2ops also registers ``gc.freeze`` to run at
exit (see ``skip_final_collection``). The local runner stops its worker processes one
after another and waits for each to exit; the interpreter's last garbage collection over
Beam's and dn2's objects took 0.3-0.5 s of each, 1.3-1.5 s of a four-process run's end
(docs/memory.md). Every bundle has been processed and reported by then.
"""

import atexit as _atexit
import gc as _gc
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


SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"


def skip_final_collection() -> None:
    """Let this process exit without the interpreter's last collection of the objects it
    holds (``gc.freeze`` at exit; the atexit handlers registered before still run).

    Python does not promise that objects alive at exit are finalized ("It is not
    guaranteed that __del__() methods are called for objects that still exist when the
    interpreter exits", the data model's ``__del__``), so a program can skip the last
    collection at no cost to its correctness: dn2's outputs are written, closed and
    committed by then. Called by ``dn2``'s entry point after a job, and below in Beam's
    SDK worker processes.
    """
    _atexit.register(_gc.freeze)


if getattr(getattr(_sys.modules.get("__main__"), "__spec__", None), "name", None) == \
        SDK_WORKER_MAIN:
    skip_final_collection()
