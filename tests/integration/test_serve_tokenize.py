"""vLLM's /tokenize and /detokenize on the live endpoint (real Ray and Serve, tiny members)."""

from __future__ import annotations

import httpx
import openai


def test_tokenize_detokenize_round_trip_and_usage(openai_app: str) -> None:
    text = "The capital of France is"
    with httpx.Client(base_url=openai_app, timeout=120) as http:
        out = http.post("/tokenize", json={"model": "consort", "prompt": text}).json()
        assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] > 0
        back = http.post("/detokenize", json={"model": "consort", "tokens": out["tokens"]}).json()
        assert back["prompt"].endswith(text)
        gemma = http.post(
            "/tokenize", json={"model": "gemma3", "prompt": text, "add_special_tokens": False}
        ).json()
        assert gemma["tokens"] != out["tokens"]  # each member's own tokenizer
        missing = http.post("/tokenize", json={"model": "nope", "prompt": text})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        bad = http.post("/detokenize", json={"model": "consort", "tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        # The ensemble's usage counts the main member's tokens of the same prompt.
        chat = [{"role": "user", "content": "Hello"}]
        counted = http.post("/tokenize", json={"model": "consort", "messages": chat}).json()["count"]
    client = openai.OpenAI(base_url=f"{openai_app}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="consort", messages=chat, max_tokens=2)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens == counted


def test_token_id_prompts_with_the_official_client(openai_app: str) -> None:
    """Prompts as token ids (one list, or a list of lists) in the named model's vocabulary; bad ids are 400s."""
    client = openai.OpenAI(base_url=f"{openai_app}/v1", api_key="unused", max_retries=0, timeout=120)
    with httpx.Client(base_url=openai_app, timeout=120) as http:
        ids = {
            model: http.post(
                "/tokenize", json={"model": model, "prompt": "Hello there", "add_special_tokens": False}
            ).json()["tokens"]
            for model in ("consort", "gemma3")
        }
        for model, prompt in (("consort", ids["consort"]), ("gemma3", [ids["gemma3"], ids["gemma3"][:1]])):
            reply = client.completions.create(
                model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True
            )
            assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
            assert reply.choices[0].text.startswith("Hello there")
            assert reply.usage is not None and reply.usage.completion_tokens > 0
        for bad in ([49152], [], ["Hello", 1], [[1], []]):
            answer = http.post("/v1/completions", json={"model": "consort", "prompt": bad, "max_tokens": 1})
            assert answer.status_code == 400, (bad, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"].startswith("prompt"), error
        # gemma3's ids go further than the ensemble's (its main member's vocabulary is SmolLM2's).
        big = {"model": "gemma3", "prompt": [262000], "max_tokens": 1}
        assert http.post("/v1/completions", json=big).status_code == 200
