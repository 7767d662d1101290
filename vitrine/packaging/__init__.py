"""Packaging: evaluate's winner as the deployable model folder, and the BentoML store it goes to.

Owns the package folder's files and version (`bundle`: TorchScript and ONNX models, model.json
as vitrine.contracts.PackagedModel, the model card) and the BentoML model store and Bento
(`store`). Whether the winner replaces the deployed model is vitrine.evaluation.promotion's call.
"""
