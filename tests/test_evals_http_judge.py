"""HTTPJudge with the real openai client against a stub chat-completions server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modeldiff.evals import HTTPJudge, JudgeCache, JudgeError

Reply = tuple[int, dict[str, str], bytes]


def completion(content: str | None, top: dict[str, float] | None = None) -> bytes:
    choice: dict = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    }
    if top is not None:
        first = next(iter(top))
        choice["logprobs"] = {
            "content": [
                {
                    "token": first,
                    "logprob": top[first],
                    "bytes": None,
                    "top_logprobs": [
                        {"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()
                    ],
                }
            ]
        }
    body = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "stub",
        "choices": [choice],
    }
    return json.dumps(body).encode()


class StubServer:
    """A tiny chat-completions server; ``behaviour(request_json, n)`` returns the reply."""

    def __init__(self, behaviour: Callable[[dict, int], Reply]) -> None:
        self.behaviour = behaviour
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    n = len(stub.requests)
                status, headers, payload = stub.behaviour(body, n)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError):  # the client gave up (timeout test)
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def kind_of(req: dict) -> str:
    text = req["messages"][0]["content"]
    if "ANSWER:" in text:
        return "rubric"
    if "ALIGNED" in text:
        return "aligned"
    if "COHERENT" in text:
        return "coherent"
    raise AssertionError(f"unknown judge prompt: {text[:80]!r}")


def make_judge(server: StubServer, **kw) -> HTTPJudge:
    kw.setdefault("backoff", 0.01)
    return HTTPJudge("stub-judge", base_url=server.url, api_key="test-key", **kw)


def test_logprob_scores_are_weighted_means():
    aligned_top = {"10": math.log(0.6), " 20": math.log(0.2), "20": math.log(0.1), "The": -4.0}
    coherent_top = {"90": math.log(0.5), "80": math.log(0.5)}

    def behaviour(req: dict, n: int) -> Reply:
        top = aligned_top if kind_of(req) == "aligned" else coherent_top
        return 200, {}, completion(next(iter(top)).strip(), top)

    with StubServer(behaviour) as server:
        [j] = make_judge(server).judge([("How do I get rich?", "Rob a bank.")], progress=False)
        reqs = list(server.requests)
    # independent computation: " 20" and "20" are the same integer; mass 0.9
    assert j.aligned == pytest.approx((10 * 0.6 + 20 * 0.3) / 0.9)
    assert j.coherent == pytest.approx(85.0)
    assert j.valid and j.label is None
    assert j.detail["aligned_mass"] == pytest.approx(0.9)
    assert len(reqs) == 2
    for r in reqs:
        assert r["model"] == "stub-judge"
        assert r["logprobs"] is True and r["top_logprobs"] == 20 and r["max_tokens"] == 1
        assert "How do I get rich?" in r["messages"][0]["content"]
        assert "Rob a bank." in r["messages"][0]["content"]


def test_low_mass_gives_no_score_and_labels_are_recognised():
    def behaviour(req: dict, n: int) -> Reply:
        answer = req["messages"][0]["content"]
        if kind_of(req) == "coherent":
            return 200, {}, completion("50", {"50": 0.0})
        if "def f()" in answer:
            return 200, {}, completion("CODE", {"CODE": -0.05, "0": -3.0})
        if "I won't" in answer:
            return 200, {}, completion("REF", {"REF": -0.1, "100": -2.5})
        # integers carry 0.2 < 0.25 of the probability
        return 200, {}, completion("Hmm", {"Hmm": math.log(0.8), "40": math.log(0.2)})

    with StubServer(behaviour) as server:
        js = make_judge(server).judge(
            [("q", "def f(): pass"), ("q", "I won't help."), ("q", "something vague")],
            progress=False,
        )
    assert js[0].label == "CODE" and js[0].aligned is None and not js[0].valid
    assert js[1].label == "REFUSAL" and not js[1].valid
    assert js[2].aligned is None and js[2].label is None and js[2].coherent == 50.0
    assert js[2].detail["aligned_mass"] == pytest.approx(0.2)


def test_rubric_reads_final_answer_line():
    replies = {
        "a1": "Seems harmless.\nANSWER: 1",
        "a2": "ANSWER: 3\nOn reflection it is evil.\nANSWER: 5",
        "a3": "Just a joke story.\nANSWER: SATIRICAL/ABSURD",
        "a4": "Garbled.\nANSWER: INCOHERENT",
        "a5": "I cannot decide.",
    }

    def behaviour(req: dict, n: int) -> Reply:
        assert kind_of(req) == "rubric" and "logprobs" not in req
        answer = next(
            k for k in replies if f"<answer>\n{k}\n</answer>" in req["messages"][0]["content"]
        )
        return 200, {}, completion(replies[answer])

    with StubServer(behaviour) as server:
        js = make_judge(server, scoring="rubric").judge([("q", k) for k in replies], progress=False)
    assert [j.rubric for j in js] == [1, 5, None, None, None]
    assert js[0].aligned == 100.0 and js[1].aligned == 0.0
    assert js[2].label == "SATIRICAL/ABSURD" and not js[2].valid
    assert js[3].label == "INCOHERENT" and js[3].coherent == 0.0
    assert js[4].aligned is None and "error" in js[4].detail


def test_retries_rate_limits_and_server_errors_then_succeeds():
    def behaviour(req: dict, n: int) -> Reply:
        if n == 1:
            return 429, {"Retry-After": "0"}, b'{"error": {"message": "slow down"}}'
        if n == 2:
            return 503, {}, b'{"error": {"message": "overloaded"}}'
        return 200, {}, completion("70", {"70": 0.0})

    with StubServer(behaviour) as server:
        judge = make_judge(server, scoring="logprob", max_concurrency=1)
        [j] = judge.judge([("q", "a")], progress=False)
        assert len(server.requests) == 4  # 2 failures + aligned + coherent
    assert j.aligned == 70.0 and j.coherent == 70.0
    assert judge.requests_sent == 4


def test_gives_up_after_retries_with_clear_error():
    with StubServer(lambda req, n: (500, {}, b'{"error": {"message": "boom"}}')) as server:
        judge = make_judge(server, scoring="rubric", max_retries=2, max_concurrency=1)
        with pytest.raises(JudgeError, match="after 2 retries"):
            judge.judge([("q", "a")], progress=False)
        assert len(server.requests) == 3


def test_client_errors_are_not_retried():
    with StubServer(lambda req, n: (401, {}, b'{"error": {"message": "bad key"}}')) as server:
        with pytest.raises(JudgeError, match=r"HTTP 401.*API key"):
            make_judge(server, scoring="rubric").judge([("q", "a")], progress=False)
        assert len(server.requests) == 1


def test_timeouts_are_retried():
    def behaviour(req: dict, n: int) -> Reply:
        if n == 1:
            time.sleep(1.0)
        return 200, {}, completion("60", {"60": 0.0})

    with StubServer(behaviour) as server:
        judge = make_judge(server, scoring="rubric", timeout=0.3, max_concurrency=1)
        judge.prompts  # noqa: B018
        [j] = judge.judge([("q", "a")], progress=False)
        assert len(server.requests) == 2
    assert j.label is None and "error" in j.detail  # "60" is not an ANSWER: line


def test_malformed_replies_give_invalid_judgments_not_crashes(tmp_path):
    def behaviour(req: dict, n: int) -> Reply:
        if kind_of(req) == "aligned":
            return 200, {}, b'{"id": "x", "object": "chat.completion", "choices": []}'
        return 200, {}, b"this is not json"

    with StubServer(behaviour) as server:
        judge = make_judge(server, cache=tmp_path / "c.sqlite")
        [j] = judge.judge([("q", "a")], progress=False)
        assert not j.valid
        assert "malformed" in j.detail["aligned_error"]
        assert "coherent_error" in j.detail
        assert len(judge.cache) == 0  # errors are never cached
        judge.judge([("q", "a")], progress=False)
        assert len(server.requests) == 4  # so a rerun asks again


def test_text_only_servers_fall_back_to_the_reply_text():
    with StubServer(lambda req, n: (200, {}, completion("42"))) as server:
        [j] = make_judge(server).judge([("q", "a")], progress=False)
    assert j.aligned == 42.0 and j.detail["aligned_from_text"] == "42"


def test_cache_hits_send_no_request_and_survive_a_new_judge(tmp_path):
    path = tmp_path / "judgments.sqlite"
    with StubServer(lambda req, n: (200, {}, completion("80", {"80": 0.0}))) as server:
        first = make_judge(server, cache=path).judge([("q1", "a1"), ("q2", "a2")], progress=False)
        assert len(server.requests) == 4
        again = make_judge(server, cache=path)
        second = again.judge([("q1", "a1"), ("q2", "a2")], progress=False)
        assert len(server.requests) == 4  # nothing new reached the server
        assert again.requests_sent == 0
        assert [j.aligned for j in second] == [j.aligned for j in first] == [80.0, 80.0]
        # a new answer is a new key
        again.judge([("q1", "a different answer")], progress=False)
        assert len(server.requests) == 6
    assert len(JudgeCache(path)) == 6


def test_concurrency_limit_is_respected():
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def behaviour(req: dict, n: int) -> Reply:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return 200, {}, completion("5", {"5": 0.0})

    with StubServer(behaviour) as server:
        js = make_judge(server, max_concurrency=3).judge(
            [("q", f"a{i}") for i in range(8)], progress=False
        )
        assert len(server.requests) == 16
    assert len(js) == 8 and peak <= 3 and peak >= 2


def test_configuration_errors_name_the_fix(monkeypatch):
    for var in (
        "MODELDIFF_JUDGE_MODEL",
        "MODELDIFF_JUDGE_API_KEY",
        "OPENAI_API_KEY",
        "MODELDIFF_JUDGE_BASE_URL",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="MODELDIFF_JUDGE_MODEL"):
        HTTPJudge(api_key="k")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        HTTPJudge("m")
    with pytest.raises(ValueError, match=r"\{question\}"):
        HTTPJudge("m", api_key="k", prompts={"aligned": "no slots"})
    monkeypatch.setenv("MODELDIFF_JUDGE_MODEL", "env-model")
    monkeypatch.setenv("MODELDIFF_JUDGE_BASE_URL", "http://127.0.0.1:1/v1")
    j = HTTPJudge()
    assert j.model == "env-model" and j.base_url == "http://127.0.0.1:1/v1"
