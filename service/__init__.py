"""The BentoML HTTP service (service/service.py) over the packaged model.

The model's runtime (ONNX Runtime behind the shared resize, the decision rule) and the packaged
model's contract (model.json) live in vitrine.runtime and vitrine.contracts: the service only
speaks HTTP, batches requests and records nothing of its own.
"""
