"""ensemble.serving.deploy: the Serve config YAML, its deployments and replicas, and the build
args, without starting Ray. `run_dir` and KINDS are in conftest.py."""

from __future__ import annotations

import pytest

from ensemble.serving import deploy, settings

from .conftest import KINDS


def test_deploy_config_is_a_valid_serve_config(run_dir):
    from ray.serve.schema import ServeDeploySchema

    cfg = settings.serve_config_for(
        run_dir, {"cascade": True, "route_prefix": "/ens", "num_cpus": 0.2}
    )
    config = deploy.deploy_config(run_dir, cfg, method="soft_vote")
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    assert config["http_options"] == {"host": "127.0.0.1", "port": 18999}
    (app,) = config["applications"]
    assert app["import_path"] == "ensemble.serving.app:build_app"
    assert app["route_prefix"] == "/ens"
    assert app["args"]["run_dir"] == str(run_dir.resolve())
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"combiner"} | {f"member_{n}" for n in KINDS}
    live = deps["combiner"]["user_config"]
    assert live["method"] == "soft_vote" and live["weights"]["teacher"] == 0.4
    assert live["cascade"] and 0.0 < live["cascade_threshold"] <= 1.0  # fitted on dev.npz
    member = deps["member_teacher"]
    assert member["user_config"] == {
        "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "forward_chunk_size": 8
    }
    assert member["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 0.0}


def test_replicas_are_a_count_or_an_autoscaling_config_serve_accepts(run_dir):
    from ray.serve.schema import ServeDeploySchema

    auto = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
            "downscale_delay_s": 5}
    cfg = settings.serve_config_for(run_dir, {"autoscaling": auto, "combiner_replicas": 2,
                                              "min_members": 2})
    config = deploy.deploy_config(run_dir, cfg)
    ServeDeploySchema.model_validate(config)
    deps = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deps["combiner"]["num_replicas"] == 2 and "autoscaling_config" not in deps["combiner"]
    assert deps["combiner"]["user_config"]["min_members"] == 2
    member = deps["member_teacher"]
    assert "num_replicas" not in member
    assert member["autoscaling_config"] == {**auto, "target_ongoing_requests": 2.0,
                                            "downscale_delay_s": 5.0}
    bad = [({"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
            r"serve.autoscaling is not a valid .*max_replicas \(2\) must be greater"),
           ({"combiner_autoscaling": {"max_replica": 2}},
            r"serve.combiner_autoscaling has unknown keys \['max_replica'\]"),
           ({"min_members": 5}, r"serve.min_members=5 but the run has 4 members; use 1 to 4")]
    for overrides, match in bad:
        with pytest.raises(ValueError, match=match):
            deploy.deploy_config(run_dir, settings.serve_config_for(run_dir, overrides))


def test_only_new_member_weights_change_the_build_args(run_dir):
    """Same args -> Serve reconfigures in place; new weights -> new args -> members reload."""
    cfg = settings.serve_config_for(run_dir)
    args = deploy.deploy_config(run_dir, cfg)["applications"][0]["args"]
    other = settings.serve_config_for(run_dir, {"cascade": True, "max_batch_size": 1})
    assert deploy.deploy_config(run_dir, other, "hard_vote")["applications"][0]["args"] == args
    (run_dir / "members" / "teacher" / "export" / "model.safetensors").write_bytes(b"new weights")
    assert deploy.deploy_config(run_dir, cfg)["applications"][0]["args"] != args
