"""Runtime: what a served model runs, identical in evaluate, package and the service.

Owns model.onnx under ONNX Runtime behind the shared resize (`onnx`) and the rule that turns
probabilities into an answer (`decisions`). Light on purpose: the service imports it.
"""
