"""The OpenAI-compatible server, for real: a subprocess on loopback, called with the openai client."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ftkit.server_process import ServerProcess

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    srv = ServerProcess(tiny_path, api_key=KEY, log_path=log, extra_args=["--max-tokens-cap", "64", "--max-prompt-tokens", "256",
                                                                         "--kv-cache-tokens", "8192"]).start()
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


def test_sampling(client):
    """temperature > 0 goes to the sampling engine: per-request temperature/top_p, different draws."""
    msgs = [{"role": "user", "content": "hi"}]
    replies = {client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=8, temperature=1.2,
                                              top_p=0.9).choices[0].message.content for _ in range(3)}
    assert len(replies) > 1
    chunks = list(client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=6, temperature=0.9,
                                                 stream=True))
    assert chunks[-1].usage.completion_tokens <= 6


def test_completions_endpoint(client):
    resp = client.completions.create(model="tiny-random", prompt="Hello", max_tokens=5)
    assert resp.object == "text_completion" and resp.usage.completion_tokens <= 5


def test_errors_in_openai_shape(server, client):
    import openai

    status, body = _post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 64"):
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="more than the 256 this server accepts") as e:  # --max-prompt-tokens
        client.chat.completions.create(model="tiny-random", max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="more than the 256"):
        client.completions.create(model="tiny-random", prompt="word " * 2100, max_tokens=8)  # over the context too
    status, body = _post(server, "/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _post(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "8"}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode())
    assert status == 400 and "must be numbers" in body["error"]["message"]


def test_prompt_over_context_is_refused(tiny_path, tmp_path):
    """Without --max-prompt-tokens the limit is the model's context (2,048 for tiny-random)."""
    with ServerProcess(tiny_path, log_path=tmp_path / "s.log") as srv:
        status, body = _post(srv, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "word " * 2100}], "max_tokens": 8}).encode())
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert "2048" in body["error"]["message"]
        status, body = _post(srv, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 200}).encode())
        assert status == 400 and "exceeds the model's context of 2048" in body["error"]["message"]


def test_prompt_token_ids_are_the_training_rendering(server, client, tiny_path):
    from ftkit.masking import build_example, encode_prompt
    from ftkit.modeling import load_tokenizer

    tok = load_tokenizer(tiny_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is AC-123456?"}]
    resp = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=5,
                                          extra_body={"return_token_ids": True})
    assert resp.model_extra["prompt_token_ids"] == encode_prompt(tok, msgs)
    # ...which is the prefix of the training tokens of the same conversation with its reply
    train = build_example(tok, [*msgs, {"role": "assistant", "content": "It ships today."}]).input_ids
    assert train[:len(resp.model_extra["prompt_token_ids"])] == resp.model_extra["prompt_token_ids"]
    ids = resp.choices[0].model_extra["token_ids"]
    assert len(ids) == resp.usage.completion_tokens and tok.decode(ids, skip_special_tokens=True) == \
        resp.choices[0].message.content


def test_api_key_required(server):
    status, body = _post(server, "/v1/chat/completions", b"{}", key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = _post(server, "/v1/models", b"", key="")
    assert status == 401 and body["error"]["type"] == "authentication_error"
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


def test_64_concurrent_requests(server, client):
    """64 requests at once: all answered, no 5xx, each the same reply as when sent alone (greedy decoding
    under continuous batching equals one-at-a-time decoding)."""
    prompts = [[{"role": "user", "content": f"Order AC-{100000 + i}: where is it?"}] for i in range(8)]
    alone = [client.chat.completions.create(model="tiny-random", messages=p, max_tokens=12).choices[0].message.content
             for p in prompts]

    def ask(i):
        body = json.dumps({"model": "tiny-random", "messages": prompts[i % 8], "max_tokens": 12}).encode()
        return i, *_post(server, "/v1/chat/completions", body)

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(ask, range(64)))
    assert [status for _, status, _ in results] == [200] * 64
    for i, _, body in results:
        assert body["choices"][0]["message"]["content"] == alone[i % 8], i


def _open_stream(srv, max_tokens):
    body = json.dumps({"model": "tiny-random", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Tell me a long story"}]}).encode()
    s = socket.create_connection((srv.host, srv.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"200" in s.recv(64)
    return s


def _in_flight(srv) -> int:
    with urllib.request.urlopen(f"http://{srv.host}:{srv.port}/health", timeout=10) as r:
        return json.load(r)["requests_in_flight"]


def test_disconnect_cancels_and_shutdown_is_clean(tiny_path, tmp_path):
    """A client that goes away mid-stream has its request cancelled (not generated to the end); SIGTERM
    with a stream in flight stops the server promptly with exit code 0."""
    log = tmp_path / "s.log"
    srv = ServerProcess(tiny_path, log_path=log, extra_args=["--max-tokens-cap", "2000"]).start()
    try:
        s = _open_stream(srv, 2000)  # 2,000 tokens: far longer than the few seconds waited below
        s.recv(4096)
        assert (n := _in_flight(srv)) == 1, (n, log.read_text()[-3000:])
        s.close()
        deadline = time.monotonic() + 10
        while _in_flight(srv) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _in_flight(srv) == 0, "the request of a disconnected client kept running"
        with _open_stream(srv, 2000):
            t0 = time.monotonic()
            assert srv.stop(timeout=30) == 0, log.read_text()[-2000:]
            assert time.monotonic() - t0 < 20
    finally:
        srv.stop()  # a failed assertion must not leave the server running
    assert "server stopped" in log.read_text()


def test_serves_base_plus_adapter(tiny_path, tmp_path):
    """An adapter directory is served as base + adapter: replies equal the merged model's greedy ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftkit.masking import encode_prompt
    from ftkit.modeling import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok = load_tokenizer(tiny_path)
    tok.save_pretrained(adapter)
    msgs = [{"role": "user", "content": "Where is my order?"}]
    ids = torch.tensor([encode_prompt(tok, msgs)])
    merged = peft_model.merge_and_unload().eval()
    want = merged.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=2)[0, ids.shape[1]:]
    with ServerProcess(adapter, log_path=tmp_path / "s.log") as srv:
        status, body = _post(srv, "/v1/chat/completions", json.dumps(
            {"messages": msgs, "max_tokens": 8, "return_token_ids": True}).encode())
    assert status == 200 and body["model"] == "adapter"
    assert body["choices"][0]["token_ids"] == want.tolist()[:len(body["choices"][0]["token_ids"])]
    assert len(body["choices"][0]["token_ids"]) == 8 or body["choices"][0]["token_ids"][-1] == 2


def test_refuses_public_bind_without_key(tiny_path):
    out = subprocess.run([sys.executable, "-m", "ftkit", "serve", tiny_path, "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=120, env={"FTKIT_API_KEY": "", "PATH": ""})
    assert out.returncode == 2
    assert "refusing to bind to 0.0.0.0 without an API key" in out.stderr
