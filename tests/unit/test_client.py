"""EnsembleClient against a stub HTTP server on 127.0.0.1: typed results, errors, timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ensemble.client import (
    EnsembleClient,
    EnsembleConnectionError,
    EnsembleHTTPError,
    EnsembleTimeout,
    print_predictions,
)

PREDICTION = {
    "label": "pos",
    "label_id": 2,
    "probs": {"neg": 0.1, "neu": 0.2, "pos": 0.7},
    "intensity": 0.8,
    "confidence": 0.7,
    "disagreement": 0.25,
    "answered_by": "ensemble",
    "members": {
        "c": {
            "kind": "classifier",
            "label": "pos",
            "probs": {"neg": 0, "neu": 0, "pos": 1.0},
            "intensity": 1.0,
            "confidence": 1.0,
        }
    },
}


class _Stub(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up first (timeout test)
            pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, body))
        if self.path == "/api/predict":
            n = len(body.get("texts") or [body.get("text")])
            self._send(
                200, {"predictions": [PREDICTION] * n, "method": "soft_vote", "revision": "abc"}
            )
        elif self.path == "/too-big/predict":
            self._send(413, {"detail": "70 texts in one request; the limit is 64"})
        elif self.path == "/fastapi/predict":
            self._send(422, {"detail": [{"loc": ["body", "text"], "msg": "bad type"}]})
        elif self.path == "/flaky/predict":  # a replica dies under the first two requests
            self.server.flaky += 1
            if self.server.flaky <= 2:
                self._send(500, "Internal Server Error")
            else:
                self._send(200, {"predictions": [PREDICTION], "method": "soft_vote",
                                 "revision": "abc"})
        elif self.path == "/down/predict":
            self._send(503, "upstream restarting")
        elif self.path == "/slow/predict":
            time.sleep(2.0)
            self._send(200, {})

    def do_GET(self):
        if self.path.startswith("/api/healthz"):
            self._send(200, {"status": "ok"})


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.seen = []
    server.flaky = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


def test_predict_returns_typed_results_and_sends_the_right_body(stub):
    url, server = stub
    with EnsembleClient(url + "/api", timeout=5) as client:
        preds = client.predict(["a", "b"], return_members=True)
        one = client.predict("c")
        assert client.health().status == "ok"
    assert len(preds) == 2 and preds[0].label == "pos" and preds[0].members["c"].intensity == 1.0
    assert len(one) == 1
    assert server.seen[-2:] == [
        ("/api/predict", {"return_members": True, "texts": ["a", "b"]}),
        ("/api/predict", {"return_members": False, "text": "c"}),
    ]


@pytest.mark.parametrize(
    ("prefix", "status", "message"),
    [
        ("/too-big", 413, "70 texts in one request; the limit is 64"),
        ("/fastapi", 422, "body.text: bad type"),
        ("/down", 503, "upstream restarting"),
    ],
)
def test_http_errors_carry_the_server_message(stub, prefix, status, message):
    url, _ = stub
    with pytest.raises(EnsembleHTTPError) as err:
        EnsembleClient(url + prefix, timeout=5).predict(["x"])
    assert err.value.status_code == status
    assert err.value.message == message
    assert message in str(err.value)


def test_server_errors_are_sent_again_and_client_errors_are_not(stub):
    url, server = stub
    server.flaky = 0
    with EnsembleClient(url + "/flaky", timeout=5, retries=2) as client:
        assert client.predict(["x"])[0].label == "pos"
    assert server.flaky == 3  # two 500s, then the answer
    server.flaky = 0
    with pytest.raises(EnsembleHTTPError) as err:
        EnsembleClient(url + "/flaky", timeout=5, retries=0).predict(["x"])
    assert err.value.status_code == 500 and server.flaky == 1
    before = len(server.seen)
    with pytest.raises(EnsembleHTTPError):
        EnsembleClient(url + "/too-big", timeout=5, retries=2).predict(["x"])
    assert len(server.seen) == before + 1  # a 413 is the request's fault: sent once
    with pytest.raises(ValueError, match="retries=-1"):
        EnsembleClient(url, retries=-1)


def test_timeout_is_bounded_and_explained(stub):
    url, _ = stub
    start = time.monotonic()
    with pytest.raises(EnsembleTimeout, match="within 0.3s"):
        EnsembleClient(url + "/slow", timeout=0.3).predict(["x"])
    assert time.monotonic() - start < 1.5


def test_unreachable_server():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EnsembleConnectionError, match="ensemble serve"):
        EnsembleClient(f"http://127.0.0.1:{port}", timeout=2).predict(["x"])


def test_bad_client_arguments():
    with pytest.raises(ValueError, match="http://"):
        EnsembleClient("127.0.0.1:8000")
    with pytest.raises(ValueError, match="timeout"):
        EnsembleClient("http://127.0.0.1:8000", timeout=0)


def test_print_predictions_table(stub, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich folds long cells on narrow terminals
    url, _ = stub
    preds = EnsembleClient(url + "/api", timeout=5).predict(["a gripping film"])
    print_predictions(["a gripping film"], preds, members=True)
    out = capsys.readouterr().out
    assert "a gripping film" in out and "pos" in out and "0.700" in out and "classifier" in out
