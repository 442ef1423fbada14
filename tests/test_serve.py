"""The OpenAI-compatible server, for real: a subprocess on loopback, called with the openai client."""

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ftkit.server_process import ServerProcess

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    srv = ServerProcess(tiny_path, api_key=KEY, log_path=log, extra_args=["--max-tokens-cap", "64"]).start()
    yield srv
    code = srv.stop()
    assert code == 0, log.read_text()[-2000:]
    assert "server stopped" in log.read_text()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body: bytes, key=KEY):
    req = urllib.request.Request(f"http://{server.host}:{server.port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_models_and_chat(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-random"]
    resp = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 0
    assert isinstance(resp.choices[0].message.content, str)


def test_streaming_equals_plain(client):
    msgs = [{"role": "user", "content": "Where is my order?"}]
    plain = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text.strip() == plain.choices[0].message.content.strip()


def test_completions_endpoint(client):
    resp = client.completions.create(model="tiny-random", prompt="Hello", max_tokens=5)
    assert resp.object == "text_completion" and resp.usage.completion_tokens <= 5


def test_errors_in_openai_shape(server, client):
    import openai

    status, body = _post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 64"):
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.chat.completions.create(model="tiny-random", max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 2100}])
    status, body = _post(server, "/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"


def test_api_key_required(server):
    status, body = _post(server, "/v1/chat/completions", b"{}", key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(f"http://{server.host}:{server.port}/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"  # health needs no key


def test_client_disconnect_mid_stream(server, client):
    body = json.dumps({"model": "tiny-random", "stream": True, "max_tokens": 64,
                       "messages": [{"role": "user", "content": "Tell me a story"}]}).encode()
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200" in s.recv(64)
    # the server survives and still answers
    resp = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4)
    assert resp.choices[0].message.content is not None


def test_refuses_public_bind_without_key(tiny_path):
    out = subprocess.run([sys.executable, "-m", "ftkit", "serve", tiny_path, "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=120, env={"FTKIT_API_KEY": "", "PATH": ""})
    assert out.returncode == 2
    assert "refusing to bind to 0.0.0.0 without an API key" in out.stderr
