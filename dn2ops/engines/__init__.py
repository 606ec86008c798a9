"""Inference engines: one Beam model handler base, then one handler per runtime
(torch, onnxruntime, openvino) and auto."""
