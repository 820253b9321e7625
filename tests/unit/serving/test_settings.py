"""ensemble.serving.settings: the serve config layered from the run, and the combiner's live
settings (the cascade threshold fitted or given), without starting Ray. `run_dir` is in
conftest.py."""

from __future__ import annotations

import os

import pytest

from ensemble import combination
from ensemble.rundir import Manifest
from ensemble.serving import cascade, settings


def test_serve_config_layers_run_config_and_overrides(run_dir):
    cfg = settings.serve_config_for(run_dir, {"max_batch_size": 4, "host": None})
    assert (cfg.port, cfg.max_batch_size, cfg.host) == (18999, 4, "127.0.0.1")
    with pytest.raises(ValueError, match=r"unknown serve setting\(s\) \['max_batch'\]"):
        settings.serve_config_for(run_dir, {"max_batch": 4})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        settings.serve_config_for(run_dir, {"max_batch_size": 128})


def test_explicit_threshold_wins_over_fitting(run_dir):
    cfg = settings.serve_config_for(run_dir, {"cascade": True, "cascade_threshold": 0.42})
    manifest = Manifest.load(run_dir)
    live = settings.combiner_settings(run_dir, manifest, cfg)
    assert (live.cascade_threshold, live.cascade_confidence) == (0.42, "margin")  # auto's reading
    cfg = settings.serve_config_for(
        run_dir, {"cascade": True, "cascade_threshold": 0.8, "cascade_confidence": "max_prob"}
    )
    live = settings.combiner_settings(run_dir, manifest, cfg)
    assert (live.cascade_threshold, live.cascade_confidence) == (0.8, "max_prob")


def test_fitted_threshold_comes_with_the_measure_auto_chose(run_dir):
    manifest = Manifest.load(run_dir)
    live = settings.combiner_settings(
        run_dir, manifest, settings.serve_config_for(run_dir, {"cascade": True})
    )
    spec = manifest.combination()
    threshold, measure, _ = cascade.fit_cascade_from_run(run_dir, spec, "auto")
    assert (live.cascade_threshold, live.cascade_confidence) == (threshold, measure)


def test_cascade_budget_sets_the_fitted_threshold(run_dir):
    manifest = Manifest.load(run_dir)
    spec = manifest.combination()
    for budget in (0.0, 0.05):
        cfg = settings.serve_config_for(
            run_dir, {"cascade": True, "cascade_max_accuracy_loss": budget,
                      "cascade_confidence": "margin"}
        )
        live = settings.combiner_settings(run_dir, manifest, cfg)
        expected, _ = cascade.fit_threshold_from_run(run_dir, spec, budget, measure="margin")
        assert live.cascade_threshold == expected
    # on one confidence measure (thresholds on two measures do not compare), a larger budget
    # never lets the student answer fewer texts
    strict, loose = (
        settings.combiner_settings(run_dir, manifest, settings.serve_config_for(
            run_dir, {"cascade": True, "cascade_max_accuracy_loss": b,
                      "cascade_confidence": "margin"})).cascade_threshold
        for b in (0.0, 0.05)
    )
    assert loose <= strict


def test_cascade_without_predictions_or_student_names_the_fix(run_dir):
    os.remove(run_dir / "predictions" / "dev.npz")
    cfg = settings.serve_config_for(run_dir, {"cascade": True})
    with pytest.raises(ValueError, match="set serve.cascade_threshold"):
        settings.combiner_settings(run_dir, Manifest.load(run_dir), cfg)
    manifest = Manifest.load(run_dir)
    manifest.members.pop("student")
    manifest.combine = combination.without(manifest.combine, ["student"])
    with pytest.raises(ValueError, match="kind 'student'"):
        settings.combiner_settings(run_dir, manifest, cfg)
