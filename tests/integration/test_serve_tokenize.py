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
