"""Serving the combined ensemble with Ray Serve.

* `ensemble.serving.app`: the deployments (one per member + the combiner ingress), `build_app`.
* `ensemble.serving.commands`: settings, Serve config YAML, deploy / live update, CLI hooks.
* `ensemble.serving.schemas`: the HTTP bodies (pydantic).
* `ensemble.serving.cascade`: combination of member outputs and the student-first cascade (numpy).

Importing this package imports neither Ray nor torch; only `app` does.
"""
