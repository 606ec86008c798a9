"""dn2ops: the operations of the dn2 pipelines, one module per stage.

torch is imported before anything else in the package on purpose: torch and faiss each
bring their own libgomp, and when faiss's is loaded first, torch's OpenMP pool hangs in
forked children once the parent has run a parallel torch op (seen with faiss-cpu 1.15
and torch 2.14; tests/dn2ops/test_import_order.py). Every dn2ops module that imports
faiss therefore gets torch's runtime loaded first.
"""

import torch  # noqa: F401
