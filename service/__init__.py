"""BentoML service for the packaged classifier (see service/service.py).

Kept import-light: the package stage reads these names without loading the service.
"""

# The model the service loads from the BentoML store, as `<name>:latest`.
MODEL_NAME_ENV = "VITRINE_MODEL_NAME"
DEFAULT_MODEL_NAME = "vitrine-classifier"

# Files inside the packaged model folder (the DVC output and the BentoML store model alike).
SCRIPTED_MODEL_FILE = "model.pt"  # TorchScript: the framework's portable export
ONNX_MODEL_FILE = "model.onnx"  # what the service runs (service/runtime.py)
MODEL_INFO_FILE = "model.json"
MODEL_CARD_FILE = "model_card.md"
