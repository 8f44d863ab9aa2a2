"""`tunelab serve` against a web page that is not its own (issue 26 §2): a Host allow-list (no DNS
rebinding), no cross-origin state changes, and JSON bodies only, so no page can run generations."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.routing import Router
from tunelab.serve.security import allowed_hosts, host_name

LOCAL = "http://127.0.0.1:8000"
CHAT = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client() -> TestClient:
    """A keyless server on loopback with nothing to serve: every request that passes the guard is
    answered by the routes (404 unknown model), so a 403 or 415 is the guard's."""
    return TestClient(create_app(None, Router(None, []), ServeSettings()), base_url=LOCAL)


def test_a_json_body_passes_the_guard(client):
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/feedback"])
def test_bodies_other_than_json_are_refused_with_415(client, path, kind):
    headers = {"Content-Type": kind} if kind else {}
    response = client.post(path, content=json.dumps(CHAT), headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_a_rebound_host_is_refused(client):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        response = client.get("/v1/models", headers={"Host": host})
        assert response.status_code == 403, host
        assert "--allow-host" in response.json()["error"]["message"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_a_cross_origin_post_is_refused_even_as_json(client):
    response = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "cross_origin"
    same = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": LOCAL})
    assert same.status_code == 404


def test_the_allow_list_has_loopback_the_bind_and_what_the_user_adds():
    assert allowed_hosts("127.0.0.1") >= {"localhost", "127.0.0.1", "::1"}
    assert "my.lan" in allowed_hosts("127.0.0.1", ["My.Lan:8000"])
    assert "*" in allowed_hosts("0.0.0.0")  # a network bind has a key, which protects it
    assert "*" not in allowed_hosts("localhost")
    assert [host_name(h) for h in ("[::1]:80", "LOCALHOST.", "a.b:1")] == ["::1", "localhost", "a.b"]
    settings = ServeSettings(allowed_hosts=allowed_hosts("127.0.0.1", ["my.lan"]))
    lan = TestClient(create_app(None, Router(None, []), settings), base_url="http://my.lan:8000")
    assert lan.get("/health").status_code == 200


@pytest.mark.parametrize("method", ["DELETE", "POST"])
def test_a_bodiless_request_needs_no_content_type_but_one_with_a_body_does(client, method):
    # admin is off without a key: 403 is the route's word, past the guard
    assert client.request(method, "/admin/adapters/x").status_code in (403, 405)
    with_body = client.request(
        method, "/admin/adapters/x", content="x", headers={"Content-Type": "text/plain"}
    )
    assert with_body.status_code == 415
