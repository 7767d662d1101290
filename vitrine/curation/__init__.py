"""Curation: what the dedupe stage finds in the collected photos.

Owns each photo's descriptor and embedding, cached by sha256 (`features`), near-duplicate search
over perceptual hashes and embeddings (`neardup`), label-noise and outlier scores (`noise`) and
the review gallery people decide from (`review`).
"""
