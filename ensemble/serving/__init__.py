"""Serving the combined ensemble with Ray Serve.

* `ensemble.serving.app`: the deployments (one per member + the combiner ingress), `build_app`.
* `ensemble.serving.settings`: a run's `ServeConfig` and each deployment's live settings.
* `ensemble.serving.deploy`: the deployments' options, Serve config YAML, deploy / live update.
* `ensemble.serving.commands`: ``ensemble serve`` / ``ensemble query``.
* `ensemble.serving.schemas`: the HTTP bodies (pydantic).
* `ensemble.serving.cascade`: combination of member outputs and the student-first cascade (numpy).

Importing this package imports neither Ray nor torch; only `app` does.
"""
