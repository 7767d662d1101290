"""The documentation site's generated sections (`mkdocs build` fills them in through
docs/hooks/generated.py): the parameters, outputs, quarantine reasons, HTTP API and results
pages, read from the project's own files, so that they cannot drift from it.

Everything here reads source and data files (ast, YAML, JSON) and imports no stage, service or
heavy library: a build takes seconds and needs no model, GPU or pipeline run.

    python -m scripts.docs params      # print one generated section (params, outputs, ...)
"""
