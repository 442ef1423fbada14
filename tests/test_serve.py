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

from ftkit.host.server_process import ServerProcess

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
    from ftkit.core.masking import build_example, encode_prompt
    from ftkit.core.modeling import load_tokenizer

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

    from ftkit.core.masking import encode_prompt
    from ftkit.core.modeling import load_tokenizer

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


# --- the engine's settings under each transformers spelling ----------------------------------------

def _fake_config(*names: str, dataclass: bool = True):
    """A stand-in for transformers' ContinuousBatchingConfig taking the keywords ``names``."""
    import dataclasses

    if dataclass:
        return dataclasses.make_dataclass("CB", [(n, object, None) for n in names])
    ns: dict = {}
    exec(f"def __init__(self, *, {', '.join(n + '=None' for n in names)}): pass", ns)  # noqa: S102
    return type("CB", (), {"__init__": ns["__init__"]})


REST = ("num_blocks", "max_batch_tokens", "per_request_processors", "max_blocks_per_request")


def test_engine_config_kwargs_for_page_size_and_block_size():
    """5.24 calls the tokens per KV block page_size (block_size kept as a deprecated alias), 5.17 block_size
    (page_size is a TypeError there): each gets its own name, and every keyword built is accepted."""
    from ftkit.host.engine import EngineConfigError, engine_config_kwargs

    common = {"num_blocks": 32, "max_batch_tokens": 512, "max_blocks_per_request": 0}
    for cls, name in ((_fake_config("page_size", *REST, "block_size"), "page_size"),  # 5.24
                      (_fake_config("block_size", *REST), "block_size"),  # 5.17
                      (_fake_config("block_size", *REST, dataclass=False), "block_size"),
                      (_fake_config("page_size", *REST, dataclass=False), "page_size")):
        kw = engine_config_kwargs(cls, kv_cache_tokens=8000, max_batch_tokens=512, per_request_processors=False)
        assert kw == {name: 256, **common}, cls
        cls(**kw)  # no unexpected keyword
        kw = engine_config_kwargs(cls, kv_cache_tokens=8192, max_batch_tokens=512, per_request_processors=True)
        assert kw == {name: 256, **common, "per_request_processors": True}
        cls(**kw)
    # the decode fast path switch is an optimisation: not passed where the version lacks it
    kw = engine_config_kwargs(_fake_config("block_size", *REST[:3]), kv_cache_tokens=256, max_batch_tokens=64,
                              per_request_processors=False)
    assert kw == {"block_size": 256, "num_blocks": 1, "max_batch_tokens": 64}
    # per-request temperature is not: a version without it cannot serve sampled requests
    no_processors = _fake_config("page_size", "num_blocks", "max_batch_tokens")
    assert engine_config_kwargs(no_processors, kv_cache_tokens=256, max_batch_tokens=64,
                                per_request_processors=False) == {"page_size": 256, "num_blocks": 1, "max_batch_tokens": 64}
    with pytest.raises(EngineConfigError, match="no per_request_processors"):
        engine_config_kwargs(no_processors, kv_cache_tokens=256, max_batch_tokens=64, per_request_processors=True)
    with pytest.raises(EngineConfigError, match="no page_size/block_size"):
        engine_config_kwargs(_fake_config("tokens_per_block", *REST), kv_cache_tokens=256, max_batch_tokens=64,
                             per_request_processors=False)


def test_engine_config_kwargs_for_the_installed_transformers():
    from transformers import ContinuousBatchingConfig

    from ftkit.host.engine import engine_config_kwargs

    kw = engine_config_kwargs(ContinuousBatchingConfig, kv_cache_tokens=8192, max_batch_tokens=512,
                              per_request_processors=True)
    cb = ContinuousBatchingConfig(**kw)
    assert cb.num_blocks == 32 and cb.per_request_processors is True


# --- malformed Content-Length, over raw sockets ----------------------------------------------------

def _raw(srv, head: bytes, body: bytes = b"", wait: float = 30) -> tuple[str, dict | None, bool]:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; returns (status
    line, JSON body or None, whether the server then closed the connection)."""
    with socket.create_connection((srv.host, srv.port), timeout=wait) as s:
        s.sendall(head + f"\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return data.decode(errors="replace"), None, True
            data += chunk
        head_text, _, rest = data.partition(b"\r\n\r\n")
        lines = head_text.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        while len(rest) < n:
            rest += s.recv(4096)
        s.settimeout(0.5)  # well inside the server's 2 s read timeout
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        return lines[0], json.loads(rest[:n]) if n else None, closed


def _still_serves(srv) -> None:
    status, body = _post(srv, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode())
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def quick_server(tiny_path, tmp_path_factory):
    """A server whose connections time out after 2 s of silence (--read-timeout)."""
    log = tmp_path_factory.mktemp("quick") / "server.log"
    srv = ServerProcess(tiny_path, api_key=KEY, log_path=log, extra_args=["--read-timeout", "2"]).start()
    yield srv
    assert srv.stop() == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _openai_error(body: dict, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == code


@pytest.mark.parametrize(("length", "fragment"), [(b"abc", "whole number"), (b"1_000", "whole number"),
                                                  (b"+12", "whole number"), (b"-5", "must not be negative")])
def test_content_length_not_a_size_is_400(quick_server, length, fragment):
    status, body, closed = _raw(quick_server, POST + b"\r\nContent-Length: " + length, GOOD)
    assert status == "HTTP/1.1 400 Bad Request", status
    _openai_error(body, "invalid_content_length")
    assert fragment in body["error"]["message"]
    assert closed  # the body was not read: it must not be taken for the next request
    _still_serves(quick_server)


def test_post_without_content_length_is_411(quick_server):
    status, body, closed = _raw(quick_server, POST, GOOD)
    assert status == "HTTP/1.1 411 Length Required", status
    _openai_error(body, "length_required")
    assert closed
    status, body, closed = _raw(quick_server, POST + b"\r\nTransfer-Encoding: chunked",
                                f"{len(GOOD):x}\r\n".encode() + GOOD + b"\r\n0\r\n\r\n")
    assert status == "HTTP/1.1 411 Length Required" and closed
    _still_serves(quick_server)


def test_body_shorter_than_content_length_times_out(quick_server):
    """A Content-Length larger than the body sent: answered 400 once nothing more arrives for the read
    timeout (2 s here), not a thread waiting for good and never a 500."""
    t0 = time.monotonic()
    status, body, closed = _raw(quick_server, POST + f"\r\nContent-Length: {len(GOOD) + 100}".encode(), GOOD)
    assert status == "HTTP/1.1 400 Bad Request", status
    _openai_error(body, "incomplete_body")
    assert "Content-Length of" in body["error"]["message"] and closed
    assert 1.5 < time.monotonic() - t0 < 15
    _still_serves(quick_server)
    with urllib.request.urlopen(f"http://{quick_server.host}:{quick_server.port}/health", timeout=10) as r:
        assert json.load(r)["requests_in_flight"] == 0


def test_silent_client_is_disconnected(quick_server):
    """A connection that sends half a request line and nothing more is closed after the read timeout."""
    with socket.create_connection((quick_server.host, quick_server.port), timeout=15) as s:
        s.sendall(b"POST /v1/chat")
        t0 = time.monotonic()
        assert s.recv(4096) == b""  # closed by the server, no answer owed to half a request line
        assert time.monotonic() - t0 < 10
    _still_serves(quick_server)


def test_good_request_over_raw_socket_keeps_the_connection(quick_server):
    status, body, closed = _raw(quick_server, POST + f"\r\nContent-Length: {len(GOOD)}".encode(), GOOD)
    assert status == "HTTP/1.1 200 OK" and body["object"] == "chat.completion" and not closed
