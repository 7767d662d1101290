"""The BentoML HTTP service (service/service.py) over the packaged model.

The model's runtime (ONNX Runtime behind the shared resize, the decision rule) and the packaged
model's contract (model.json) live in vitrine.runtime and vitrine.contracts, the record of its
answers (spool, database, photos) in vitrine.production: the service speaks HTTP, batches
requests and hands each answer to the recorder (service/recording.py).
"""
