"""The Serve app for real: local Ray on 127.0.0.5, HTTP on 127.0.0.1, tiny random-init members.

One module-scoped deployment serves every test; settings change through live updates (the
combiner's and members' ``user_config``), which is itself under test. Every HTTP call has a
client timeout, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ensemble import combine
from ensemble.client import EnsembleClient, EnsembleHTTPError
from ensemble.serving import cascade
from ensemble.testing import CLASS_INTENSITY, EDGES, KINDS, LABELS, make_run_dir

pytestmark = pytest.mark.e2e

PORT = 18451
TEXTS = [
    "A warm , funny , engaging film .",
    "Nothing 's at stake , just a twisty double-cross you can smell a mile away .",
    "The plot is paper-thin and the acting is worse .",
    "An otherwise intense , twist-and-turn thriller .",
    "I did n't care .",
    "A deep and meaningful film .",
]


@dataclass
class Served:
    run_dir: Path
    url: str
    client: EnsembleClient

    def push(self, method: str | None = None, **overrides) -> dict:
        """Live update, the way `ensemble serve --update` does it."""
        from ensemble.serving import deploy, settings

        cfg = settings.serve_config_for(self.run_dir, {**_BASE, **overrides})
        return deploy.update(self.run_dir, cfg, method, timeout_s=120)


_BASE = {"port": PORT, "num_cpus": 0.2, "health_check_period_s": 1.0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from ensemble.serving import deploy, settings

    run_dir = make_run_dir(tmp_path_factory.mktemp("serve") / "run")
    # reuse a Ray (and Serve proxy) another fixture of the session started; else start ours
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.5", include_dashboard=False)
    running = deploy.running_http_options()
    if running is not None:
        _BASE["port"] = running["port"]
    try:
        url = deploy.deploy(run_dir, settings.serve_config_for(run_dir, _BASE), timeout_s=300)
        with EnsembleClient(url, timeout=20) as client:
            yield Served(run_dir, url, client)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(deploy.APP_NAME)


def _member_arrays(pred) -> dict[str, np.ndarray]:
    """Member outputs as the combiner saw them: probs in label order; the regressor's value."""
    return {
        n: np.float64(m.intensity)
        if m.kind == "regressor"
        else np.array([m.probs[label] for label in LABELS])
        for n, m in pred.members.items()
    }


def _stats(served: Served):
    return served.client.stats()


def test_http_round_trip(served):
    c = served.client
    assert c.health().status == "ok"
    deep = c.health(deep=True)
    assert deep.members == dict.fromkeys(KINDS, "ok")
    info = c.info()
    assert set(info.members) == set(KINDS) and info.label_names == LABELS
    assert info.versions["ray"] and info.method == "soft_vote"
    assert info.cascade.student == "student" and info.cascade.threshold is not None
    spec = httpx.get(served.url + "/openapi.json", timeout=10).json()
    assert {"/predict", "/healthz", "/info", "/stats"} <= set(spec["paths"])
    one = c.predict(TEXTS[0])
    batch = c.predict(TEXTS)
    assert len(one) == 1 and len(batch) == len(TEXTS)
    # padding to the longest text in a batch moves results by float rounding only
    assert batch[0].probs == pytest.approx(one[0].probs, abs=1e-6)
    for p in batch:
        assert p.label in LABELS and p.label == LABELS[p.label_id]
        assert sum(p.probs.values()) == pytest.approx(1.0)
        assert p.confidence == pytest.approx(max(p.probs.values()))
        assert 0.0 <= p.disagreement <= 0.75 and p.members is None


def test_members_serve_their_exported_weights(served):
    """A member's served output equals the export loaded and run here with transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for name in ("teacher", "regressor"):
        path = served.run_dir / "members" / name / "export"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.inference_mode():
            logits = model(
                **tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
            ).logits
        served_out = served.client.predict_member(name, TEXTS)
        if name == "regressor":
            got = np.array([m.intensity for m in served_out])
            np.testing.assert_allclose(got, logits[:, 0].numpy(), atol=1e-5)
        else:
            got = np.array([[m.probs[label] for label in LABELS] for m in served_out])
            np.testing.assert_allclose(got, torch.softmax(logits, -1).numpy(), atol=1e-5)


def test_in_process_ensemble_answers_like_the_server(served):
    """`Ensemble.from_run` gives the served answers: learned weights, temperatures, the
    regressor's soft vote, member views, and the cascade."""
    from ensemble.inference import Ensemble

    manifest_path = served.run_dir / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["combine"] = {
        "method": "weighted",
        "weights": {"classifier": 0.4, "regressor": 0.2, "teacher": 0.3, "student": 0.1},
        "params": {
            "temperatures": {"classifier": 1.8, "teacher": 0.6, "student": 1.3},
            "regressor_sharpness": 15.0,
        },
    }
    try:
        manifest_path.write_text(json.dumps(manifest))
        served.push()
        here = Ensemble.from_run(served.run_dir)
        for members in (False, True):
            got = here.predict(TEXTS, return_members=members)
            want = served.client.predict_response(TEXTS, return_members=members).predictions
            # one request is one member batch on both sides: the same passes, the same floats
            assert [p.model_dump() for p in got] == [p.model_dump() for p in want]

        student = np.array([[p.members["student"].probs[label] for label in LABELS] for p in got])
        threshold = float(np.median(cascade.student_confidence(student)))
        served.push(cascade=True, cascade_threshold=threshold)
        cascaded = Ensemble.from_run(served.run_dir, cascade=True, cascade_threshold=threshold)
        got = cascaded.predict(TEXTS, return_members=True)
        want = served.client.predict_response(TEXTS, return_members=True).predictions
        assert {p.answered_by for p in got} == {"student", "ensemble"}
        assert [p.model_dump() for p in got] == [p.model_dump() for p in want]
    finally:
        manifest_path.write_text(original)
        served.push()


def test_every_method_matches_direct_computation_and_updates_live(served):
    before = _stats(served)
    rng = np.random.default_rng(0)
    weights = {"classifier": 0.5, "regressor": 0.2, "teacher": 1.0, "student": 0.3}
    names = list(KINDS)
    w = np.array([weights[n] for n in names])
    params = {
        "coef": rng.normal(size=(5, 20)).round(3).tolist(),
        "intercept": rng.normal(size=5).round(3).tolist(),
    }
    manifest_path = served.run_dir / "manifest.json"
    original = manifest_path.read_text()
    try:
        for method in combine.METHODS:
            # what a Tune run does: write new weights into the manifest, then push them
            manifest = json.loads(original)
            manifest["combine"] = {
                "method": method,
                "weights": weights,
                "params": params if method == "stacking" else {},
            }
            manifest_path.write_text(json.dumps(manifest))
            live = served.push()
            resp = served.client.predict_response(TEXTS, return_members=True)
            assert resp.method == method == live["method"]
            assert served.client.info().revision == resp.revision
            outs = [_member_arrays(p) for p in resp.predictions]
            probs = np.stack(
                [  # (M, B, C), the regressor voting through its bin
                    combine.regressor_probs(np.array([o[n] for o in outs]), EDGES, 5)
                    if KINDS[n] == "regressor"
                    else np.stack([o[n] for o in outs])
                    for n in names
                ]
            )
            expected = combine.apply(method, probs, w, params)
            # the regressor carries half, the classification members share the other half
            expected_cls = [
                combine.expected_intensity(probs[i], CLASS_INTENSITY)
                for i, n in enumerate(names)
                if KINDS[n] != "regressor"
            ]
            intensity = 0.5 * np.array([o["regressor"] for o in outs]) + 0.5 * np.mean(
                expected_cls, axis=0
            )
            got = np.array([[p.probs[label] for label in LABELS] for p in resp.predictions])
            np.testing.assert_allclose(got, expected, atol=1e-12)
            assert [p.label_id for p in resp.predictions] == expected.argmax(1).tolist()
            np.testing.assert_allclose([p.intensity for p in resp.predictions], intensity)
            np.testing.assert_allclose(
                [p.disagreement for p in resp.predictions], combine.disagreement(probs)
            )
    finally:
        manifest_path.write_text(original)
        served.push()
    after = _stats(served)
    # live updates: the very same processes answered before and after every update
    assert (after.combiner.pid, after.combiner.replica_id) == (
        before.combiner.pid,
        before.combiner.replica_id,
    )
    assert after.combiner.reconfigures >= before.combiner.reconfigures + len(combine.METHODS)
    for n in KINDS:
        assert after.members[n].pid == before.members[n].pid
        assert after.members[n].replica_id == before.members[n].replica_id


def _fire(served: Served, n: int) -> list[int]:
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(
                httpx.post,
                served.url + "/predict",
                json={"text": TEXTS[i % len(TEXTS)]},
                timeout=30,
            )
            for i in range(n)
        ]
        return [f.result().status_code for f in futures]


def _new(old: dict[int, int], new: dict[int, int]) -> dict[int, int]:
    return {k: v - old.get(k, 0) for k, v in new.items() if v - old.get(k, 0) > 0}


def test_concurrent_requests_are_batched_and_batching_can_be_turned_off(served):
    served.push(batch_wait_timeout_s=0.05)
    before = _stats(served)
    assert _fire(served, 24) == [200] * 24
    mid = _stats(served)
    # the combiner fans out once per batch of requests ...
    fanouts = _new(before.combiner.fanout_sizes, mid.combiner.fanout_sizes)
    assert sum(k * v for k, v in fanouts.items()) == 24 and max(fanouts) > 1, fanouts
    # ... and a member runs one forward pass per batch of texts
    batched = _new(before.members["teacher"].batch_sizes, mid.members["teacher"].batch_sizes)
    assert sum(k * v for k, v in batched.items()) == 24  # every text went through once
    assert max(batched) > 1, f"no batching happened: {batched}"

    served.push(max_batch_size=1)
    assert served.client.stats().members["teacher"].max_batch_size == 1
    assert _fire(served, 12) == [200] * 12
    after = _stats(served)
    assert _new(mid.combiner.fanout_sizes, after.combiner.fanout_sizes) == {1: 12}
    assert _new(mid.members["teacher"].batch_sizes, after.members["teacher"].batch_sizes) == {1: 12}
    served.push()


def test_sequential_fan_out_gives_the_same_answers(served):
    parallel = served.client.predict(TEXTS)
    live = served.push(sequential=True)
    assert live["sequential"] and served.client.info().sequential
    sequential = served.client.predict(TEXTS)
    served.push()
    assert [p.probs for p in sequential] == [p.probs for p in parallel]


@pytest.mark.parametrize("in_combiner", [True, False], ids=["student-in-combiner", "student-hop"])
def test_cascade_routes_by_student_confidence(served, in_combiner):
    full = served.client.predict(TEXTS, return_members=True)
    student = np.array([[p.members["student"].probs[label] for label in LABELS] for p in full])
    conf = cascade.student_confidence(student)  # the served measure: top-1 minus top-2
    threshold = float(np.median(conf))
    try:
        served.push(
            cascade=True, cascade_threshold=threshold, cascade_student_in_combiner=in_combiner
        )
        before = _stats(served)
        got = served.client.predict(TEXTS, return_members=True)
        after = _stats(served)
        for p, f, c, s in zip(got, full, conf, student, strict=True):
            if c >= threshold:
                assert p.answered_by == "student" and set(p.members) == {"student"}
                np.testing.assert_allclose([p.probs[label] for label in LABELS], s, rtol=1e-5)
                assert p.disagreement is None
            else:
                assert p.answered_by == "ensemble" and set(p.members) == set(KINDS)
                assert p.probs == pytest.approx(f.probs, rel=1e-5)
        assert {p.answered_by for p in got} == {"student", "ensemble"}
        # the first stage ran where configured: in the combiner, or in the student deployment
        local = after.combiner.local_student_texts - before.combiner.local_student_texts
        hop = _new(before.members["student"].batch_sizes, after.members["student"].batch_sizes)
        if in_combiner:
            assert local == len(TEXTS) and not hop, (local, hop)
        else:
            assert local == 0 and sum(k * v for k, v in hop.items()) == len(TEXTS), hop
        # the threshold may apply to the student's top probability instead
        top = student.max(1)
        live = served.push(cascade=True, cascade_threshold=float(np.median(top)),
                           cascade_confidence="max_prob", cascade_student_in_combiner=in_combiner)
        assert served.client.info().cascade.confidence == "max_prob"
        by_top = [p.answered_by for p in served.client.predict(TEXTS)]
        assert by_top == ["student" if t >= live["cascade_threshold"] else "ensemble" for t in top]
        served.push(cascade=True, cascade_threshold=0.0, cascade_student_in_combiner=in_combiner)
        assert {p.answered_by for p in served.client.predict(TEXTS)} == {"student"}
    finally:
        served.push()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"text": ""}, 422, "empty"),
        ({"texts": ["fine", "  "]}, 422, "index [1] are empty"),
        ({"texts": []}, 422, "empty"),
        ({"texts": ["x"] * 65}, 413, "limit is 64"),
        ({"text": "x" * 2001}, 413, "2000 characters"),
        ({"text": 5}, 422, "text: Input should be a valid string"),
        ({"texts": "not a list"}, 422, "valid list"),
        ({"text": "a", "return_members": "yes"}, 422, "return_members"),
        ({"text": "a", "return_member": True}, 422, "Extra inputs"),
        ({}, 422, "exactly one"),
        (b'{"text": "unterminated', 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_a_clear_4xx(served, body, status, fragment):
    kw = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(served.url + "/predict", timeout=10, **kw)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert served.client.predict(TEXTS[0])  # the server still answers


def test_client_raises_with_the_server_message(served):
    with pytest.raises(EnsembleHTTPError, match="limit is 64") as err:
        served.client.predict(["x"] * 65)
    assert err.value.status_code == 413
    with pytest.raises(EnsembleHTTPError, match="no member 'ghost'"):
        served.client.predict_member("ghost", ["x"])
    assert httpx.get(served.url + "/predict", timeout=10).status_code == 405


def test_cli_update_and_query(served, capsys):
    from ensemble.serving import commands

    parser = argparse.ArgumentParser()
    commands.add_commands(parser.add_subparsers())
    args = parser.parse_args(
        [
            "serve",
            str(served.run_dir),
            "--update",
            "--port",
            str(PORT),
            "--num-cpus",
            "0.2",
            "--method",
            "hard_vote",
        ]
    )
    try:
        assert args.func(args) == 0
        assert "method=hard_vote" in capsys.readouterr().out
        args = parser.parse_args(["query", *TEXTS[:2], "--url", served.url, "--json", "--members"])
        assert args.func(args) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["method"] == "hard_vote" and len(body["predictions"]) == 2
        assert set(body["predictions"][0]["members"]) == set(KINDS)

        # more texts than serve.max_texts: several requests, in order, answers concatenated
        served.push(max_texts=4)
        with pytest.raises(EnsembleHTTPError, match="limit is 4"):
            served.client.predict(TEXTS)
        requests = served.client.stats().combiner.requests
        args = parser.parse_args(["query", *TEXTS, "--url", served.url, "--json"])
        assert args.func(args) == 0
        body = json.loads(capsys.readouterr().out)
        assert served.client.stats().combiner.requests == requests + 2  # 4 texts, then 2
        alone = [served.client.predict(t)[0] for t in TEXTS]
        assert [p["label"] for p in body["predictions"]] == [p.label for p in alone]
        for got, want in zip(body["predictions"], alone, strict=True):
            assert got["probs"] == pytest.approx(want.probs, abs=1e-6)
    finally:
        served.push()


def _kill_under_load(served: Served, member: str, workers: int = 8) -> tuple[list, int]:
    """SIGKILL ``member``'s replica while ``workers`` clients keep posting; every response
    until Serve has replaced it, and the new replica's pid."""
    import threading

    old = served.client.stats().members[member].pid
    responses: list[httpx.Response] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as http:  # a hang raises ReadTimeout and fails the test
            while not stop.is_set():
                responses.append(http.post(served.url + "/predict",
                                           json={"texts": TEXTS[:2], "return_members": True}))

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(client) for _ in range(workers)]
        time.sleep(1.0)
        os.kill(old, signal.SIGKILL)
        new_pid, deadline = None, time.monotonic() + 120
        with httpx.Client(timeout=10) as http:
            while new_pid is None and time.monotonic() < deadline:
                time.sleep(0.5)
                stats = http.get(served.url + "/stats").json()
                if member in stats["members"] and stats["members"][member]["pid"] != old:
                    new_pid = stats["members"][member]["pid"]
        time.sleep(1.0)  # some answers from the replaced replica too
        stop.set()
        for f in futures:
            f.result()
    assert new_pid is not None, f"{member} not replaced in time"
    return responses, new_pid


def test_a_killed_member_replica_degrades_answers_instead_of_failing_them(served):
    served.push(request_timeout_s=3.0)
    before = served.client.stats().combiner
    responses, new_pid = _kill_under_load(served, "teacher")
    codes = [r.status_code for r in responses]
    assert codes.count(200) == len(codes), [r.text for r in responses if r.status_code != 200]
    preds = [p for r in responses for p in r.json()["predictions"]]
    degraded = [p for p in preds if p["degraded"]]
    assert degraded, "no answer was given while the teacher was down"
    for p in degraded:  # the others answered, and the answer says so
        assert "teacher" not in p["members_used"] and "teacher" not in p["members"]
        assert sum(p["probs"].values()) == pytest.approx(1.0)
    assert all(p["members_used"] == list(KINDS) for p in preds if not p["degraded"])
    after = served.client.stats().combiner
    assert after.degraded_texts - before.degraded_texts == len(degraded)
    assert after.member_failures["teacher"] > before.member_failures.get("teacher", 0)
    print(f"teacher killed under load: {len(codes)} responses, all 200, {len(degraded)} texts "
          f"degraded; new pid {new_pid}")
    assert served.client.health(deep=True).status == "ok"

    # with every member required, the same kill is a 503 that names the setting
    served.push(request_timeout_s=3.0, min_members=len(KINDS))
    responses, _ = _kill_under_load(served, "teacher", workers=2)
    failed = [r for r in responses if r.status_code != 200]
    assert failed and all(r.status_code == 503 for r in failed), [r.text for r in failed]
    assert "fewer than serve.min_members (4)" in failed[0].json()["detail"]
    assert failed[0].headers["retry-after"] == "1"
    assert not any(p["degraded"] for r in responses if r.status_code == 200
                   for p in r.json()["predictions"])
    served.push()


def test_a_killed_combiner_replica_is_covered_by_the_second_one(served):
    """With serve.combiner_replicas=2, SIGKILL one combiner replica while clients keep posting:
    plain HTTP clients lose at most the request each had in flight on it (a 500), and
    EnsembleClient, which sends such a request again, loses none."""
    import threading

    from ensemble.serving import deploy, settings

    deploy.deploy(served.run_dir, settings.serve_config_for(
        served.run_dir, {**_BASE, "combiner_replicas": 2}), timeout_s=300)
    try:
        pids, deadline = set(), time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(served.client.stats().combiner.pid)
        assert len(pids) == 2, f"one combiner replica answered /stats: {pids}"
        victim = min(pids)
        stop, responses, answers = threading.Event(), [], []

        def raw() -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    responses.append(http.post(served.url + "/predict",
                                               json={"texts": TEXTS[:2]}))

        def typed() -> None:  # any EnsembleError fails the test through f.result()
            with EnsembleClient(served.url, timeout=10) as client:
                while not stop.is_set():
                    answers.append(client.predict(TEXTS[:2]))

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(raw if i % 2 else typed) for i in range(8)]
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            replaced, deadline = False, time.monotonic() + 120
            while not replaced and time.monotonic() < deadline:
                time.sleep(0.5)
                replaced = _running_replicas(deploy.COMBINER) == 2 and victim not in {
                    served.client.stats().combiner.pid for _ in range(4)}
            time.sleep(1.0)
            stop.set()
            for f in futures:
                f.result()
        assert replaced, "the killed combiner replica was not replaced in time"
        codes = [r.status_code for r in responses]
        failed = [c for c in codes if c != 200]
        print(f"combiner replica killed under load: plain HTTP {len(codes)} responses, "
              f"{codes.count(200)} x 200, others {failed}; EnsembleClient {len(answers)} "
              "requests, all answered")
        assert set(failed) <= {500} and len(failed) <= 4, failed  # only what was in flight
        assert answers and all(len(a) == 2 for a in answers)
    finally:
        deploy.deploy(served.run_dir, settings.serve_config_for(served.run_dir, _BASE),
                        timeout_s=300)


def _running_replicas(deployment: str) -> int:
    from ray import serve

    from ensemble.serving import deploy

    app = serve.status().applications[deploy.APP_NAME]
    states = app.deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def test_a_member_deployment_scales_out_under_load_and_back_in(served):
    """Last in the module: it redeploys the app with autoscaling, then as it was."""
    import threading

    from ensemble.serving import deploy, settings

    auto = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "metrics_interval_s": 0.5,
            "look_back_period_s": 1.0}
    teacher = deploy.member_deployment_name("teacher")
    deploy.deploy(served.run_dir, settings.serve_config_for(
        served.run_dir, {**_BASE, "autoscaling": auto}), timeout_s=300)
    try:
        assert _running_replicas(teacher) == 1
        stop, codes, seen = threading.Event(), [], [1]

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    codes.append(http.post(served.url + "/predict",
                                           json={"texts": TEXTS}).status_code)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client) for _ in range(8)]
            deadline = time.monotonic() + 120
            while max(seen) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
                seen.append(_running_replicas(teacher))
            stop.set()
            for f in futures:
                f.result()
        assert max(seen) == 2, f"no scale-out under load; replicas seen {sorted(set(seen))}"
        assert set(codes) == {200}
        deadline = time.monotonic() + 120
        while _running_replicas(teacher) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running_replicas(teacher) == 1, "no scale-in once the load stopped"
        print(f"autoscaling: 1 -> 2 replicas under load ({len(codes)} requests, all 200), "
              "back to 1 after it")
    finally:
        deploy.deploy(served.run_dir, settings.serve_config_for(served.run_dir, _BASE),
                        timeout_s=300)
