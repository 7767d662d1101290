"""Model: the networks, how they are trained, and their export.

Owns the pretrained backbones and their embeddings (`embeddings`), the candidate networks and
the Predictor that training, evaluation and serving share (`networks`), fitting a candidate with
Lightning (`training`) and the ONNX export, int8 quantization and baked-in calibration of a
served model (`export`). The resize in front of every network is vitrine.runtime.network_input.
"""
