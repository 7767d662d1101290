"""Data: how photos are stored between stages and fed to training.

Owns the content-addressed shards collect writes and every later stage reads (`shards`), and the
prepared splits as packed uint8 arrays with their loaders (`splits`).
"""
