"""Model: the networks, the one resize in front of them, and their export.

Owns the pretrained backbones and their embeddings (`embeddings`), the candidate networks and
the Predictor that training, evaluation and serving share (`networks`), the resize from prepared
arrays to a network's input (`network_input`) and the ONNX export, int8 quantization and baked-in
calibration of a served model (`export`).
"""
