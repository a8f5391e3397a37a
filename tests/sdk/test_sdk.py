"""The official openai and anthropic SDKs, pointed at abgate with base_url.

tests/sdk.rs starts two mock upstreams and the gateway on loopback, then runs
this file with ABGATE_URL and the expected models in the environment. The
expected arm of each user is recomputed here with the reference algorithm,
so these tests also check the gateway against Python's own hashlib.
"""

import hashlib
import os

import anthropic
import openai
import pytest

URL = os.environ["ABGATE_URL"]
FRACTION = float(os.environ["ABGATE_FRACTION"])
MODELS = {
    "control": os.environ["ABGATE_CONTROL_MODEL"],
    "treatment": os.environ["ABGATE_TREATMENT_MODEL"],
}
# The gateway requires a gateway key ([auth]); the SDKs send it as their api_key.
GATEWAY_KEY = os.environ.get("ABGATE_API_KEY", "sk-client")
NAMES = {
    "control": os.environ["ABGATE_CONTROL_NAME"],
    "treatment": os.environ["ABGATE_TREATMENT_NAME"],
}


def reference_variant(user_id: str) -> str:
    bucket = int(hashlib.md5(user_id.encode("utf-8")).hexdigest(), 16) % 1000
    return "treatment" if bucket / 1000.0 < FRACTION else "control"


def users_in(variant: str, count: int = 2) -> list:
    found = []
    i = 0
    while len(found) < count:
        uid = f"sdk-user-{i}"
        if reference_variant(uid) == variant:
            found.append(uid)
        i += 1
    return found


# Unicode IDs too: the header carries UTF-8 bytes, the hash is over UTF-8.
CASES = [(v, uid) for v in ("control", "treatment") for uid in users_in(v)]


def openai_client(**headers) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{URL}/v1", api_key=GATEWAY_KEY, default_headers=headers, max_retries=0, timeout=10
    )


def anthropic_client(**headers) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=URL, api_key=GATEWAY_KEY, default_headers=headers, max_retries=0, timeout=10
    )


@pytest.mark.parametrize("variant,user", CASES)
def test_openai_chat_is_served_by_the_users_arm(variant, user):
    client = openai_client(**{"x-user-id": user})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
    )
    assert raw.headers["x-abgate-variant"] == variant
    completion = raw.parse()
    assert completion.model == MODELS[variant]
    assert f"Hello from {NAMES[variant]}" in completion.choices[0].message.content
    assert completion.usage.total_tokens > 0


@pytest.mark.parametrize("variant,user", CASES)
def test_openai_user_field_assigns_without_a_header(variant, user):
    completion = openai_client().chat.completions.create(
        model="gpt-4o-mini", user=user, messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.model == MODELS[variant]


@pytest.mark.parametrize("variant,user", CASES)
def test_openai_safety_identifier_assigns_without_a_header(variant, user):
    completion = openai_client().chat.completions.create(
        model="gpt-4o-mini", safety_identifier=user, messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.model == MODELS[variant]


@pytest.mark.parametrize("variant,user", CASES)
def test_openai_stream_arrives_chunk_by_chunk(variant, user):
    stream = openai_client(**{"x-user-id": user}).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert all(c.model == MODELS[variant] for c in chunks)
    assert f"Hello from {NAMES[variant]}" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_embeddings_pass_through():
    result = openai_client(**{"x-user-id": "emb-user"}).embeddings.create(
        model="text-embedding-3-small", input=["a", "b", "c"]
    )
    assert len(result.data) == 3
    assert result.model == MODELS[reference_variant("emb-user")]


def test_openai_sdk_reads_gateway_errors():
    client = openai_client(**{"x-user-id": "u" * 600})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 400
    assert err.value.code == "invalid_user_id"
    assert "at most 512 bytes" in err.value.message


def test_openai_sdk_raises_an_authentication_error_for_a_wrong_gateway_key():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="not-a-gateway-key-0000", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_anthropic_sdk_raises_an_authentication_error_for_a_wrong_gateway_key():
    client = anthropic.Anthropic(base_url=URL, api_key="not-a-gateway-key-0000", max_retries=0, timeout=10)
    with pytest.raises(anthropic.AuthenticationError) as err:
        client.messages.create(model="claude-test-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401
    assert err.value.body["error"]["code"] == "invalid_api_key"


def test_openai_sdk_sees_upstream_errors_unchanged():
    client = openai_client(**{"x-user-id": "rate-limited", "x-mock-status": "429"})
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("variant,user", CASES)
def test_anthropic_messages_use_metadata_user_id(variant, user):
    raw = anthropic_client().messages.with_raw_response.create(
        model="claude-test-model",
        max_tokens=64,
        metadata={"user_id": user},
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert raw.headers["x-abgate-variant"] == variant
    message = raw.parse()
    assert message.model == MODELS[variant]
    assert f"Hello from {NAMES[variant]}" in message.content[0].text
    assert message.usage.output_tokens > 0


@pytest.mark.parametrize("variant,user", CASES)
def test_anthropic_stream(variant, user):
    client = anthropic_client(**{"x-user-id": user})
    with client.messages.stream(
        model="claude-test-model", max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert f"Hello from {NAMES[variant]}" in "".join(pieces)
    assert final.model == MODELS[variant]
    assert final.stop_reason == "end_turn"


def test_unicode_user_ids_in_the_header_follow_the_reference():
    # The SDKs refuse non-ASCII header values, so this one goes through
    # http.client, which sends a latin-1 str as its bytes: the UTF-8 of the ID.
    import http.client
    import json
    from urllib.parse import urlparse

    target = urlparse(URL)
    for user in ["ユーザー-1", "Zoë", "😀-user", "e\u0301"]:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
        headers = {
            "content-type": "application/json",
            "x-user-id": user.encode("utf-8").decode("latin-1"),
            "authorization": f"Bearer {GATEWAY_KEY}",
        }
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("x-abgate-variant") == reference_variant(user), user
        assert json.loads(response.read())["model"] == MODELS[reference_variant(user)]
        connection.close()


# tests/sdk.rs sets timeouts.idle_ms to 500; the mock pauses 3 s between
# events when asked, so the gateway ends the stream with its error event.
STALLING = {"x-user-id": "sdk-stalled", "x-mock-chunk-delay-ms": "3000"}


def test_openai_raises_the_gateways_error_event_when_a_stream_stalls():
    stream = openai_client(**STALLING).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], stream=True
    )
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            pass
    assert raised.value.body["code"] == "idle_timeout"
    assert "timeouts.idle_ms" in raised.value.message


def test_anthropic_raises_the_gateways_error_event_when_a_stream_stalls():
    stream = anthropic_client(**STALLING).messages.create(
        model="claude-test-model",
        max_tokens=64,
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
    )
    with pytest.raises(anthropic.APIStatusError) as raised:
        for _ in stream:
            pass
    assert raised.value.body["error"]["code"] == "idle_timeout"
