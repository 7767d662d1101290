"""Runtime: what a served model runs, identical in evaluate, package and the service.

Owns the one resize from prepared uint8 arrays to a network's input (`network_input`), model.onnx
under ONNX Runtime behind it (`onnx`: the service, and batch scoring of evaluate and package) and
the rule that turns probabilities into an answer (`decisions`). Light on purpose: the Bento ships
it with the service.
"""
