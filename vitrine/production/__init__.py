"""Production: what the service records of its answers, for review and drift monitoring.

Owns the answers database (`records`: its schema, the store over SQLAlchemy, and the Alembic
migrations under `migrations/` that create and change it), the local spool that makes each
answer's record durable before the answer leaves (`spool`), the uploaded photos kept by content
under a retention limit (`photos`), and the recorder that ties them together in the service
(`recorder`: the request path appends, a background thread writes to the database; its
Prometheus metrics in `metrics`). Light on purpose, like vitrine.runtime: the Bento ships it.
The moderators' side, which the service's review routes use: their decisions on answers
(`reviews`), the review queue ranked by the value model (`queue`), and the training photos'
review, dedupe's candidates and the decisions file it applies (`curation`, which reads dedupe's
manifest with pandas only where the service runs beside the project).
Also owns what is read back from those records away from the service: the drift figures and
statistics of a window of answers against the evaluated test set (`drift`, with scipy and
pandas, which the service never imports) and their page (`drift_page`).
"""
