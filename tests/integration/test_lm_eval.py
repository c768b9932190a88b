"""lm-eval-harness's `local-completions` against the live endpoint, with tokenized requests and no tokenizer
files on the client: its remote tokenizer reads /tokenizer_info and /tokenize, its requests carry token ids
and ask for echo log-probs. A small multiple-choice task written here (no hub); each question's
log-likelihoods must equal what the endpoint itself reports for the same context and continuation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is in the test extra")

TASK = "consort_tiny_mc"
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Berlin"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["Eight", "Six"], "answer": 0},
    {"question": "Which colour is the sky on a clear day?", "choices": ["Blue", "Green", "Red"], "answer": 0},
]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_task")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def _evaluate(base: str, model: str, task_dir: Path) -> list[dict[str, Any]]:
    """lm-eval's Python API, as `lm_eval --model local-completions --model_args ...` runs it."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": model,
            "base_url": f"{base}/v1/completions",
            "tokenizer_backend": "remote",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    assert results is not None
    samples: list[dict[str, Any]] = results["samples"][TASK]
    return samples


def _endpoint_loglikelihood(
    http: httpx.Client, base: str, model: str, context: str, continuation: str
) -> float:
    """The endpoint's own log-likelihood: its tokens of the context and of the whole text, then the echo
    log-probs of the ids that follow the context (how a causal scorer splits a pair: the whole text's
    tokens past the context's)."""

    def ids(text: str) -> list[int]:
        reply = http.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert reply.status_code == 200, reply.text
        return list(reply.json()["tokens"])

    whole, head = ids(context + continuation), ids(context)
    body = {"model": model, "prompt": whole, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    reply = http.post(f"{base}/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(logprobs) == len(whole) + 1  # one per prompt id, then the generated token
    return math.fsum(logprobs[len(head) : len(whole)])


# The ensemble (mean over two vocabularies: ids in its main member's), its main member, and a member with
# a vocabulary of its own, whose tokenizer routes live under /models/gemma3/.
@pytest.mark.parametrize(("model", "scoped"), [("consort", False), ("gemma3", True)])
def test_lm_eval_loglikelihoods_equal_the_endpoints(
    openai_app: str, task_dir: Path, model: str, scoped: bool
) -> None:
    base = f"{openai_app}/models/{model}" if scoped else openai_app
    samples = _evaluate(base, model, task_dir)
    assert len(samples) == len(QUESTIONS)
    with httpx.Client(timeout=120) as http:
        info = http.get(f"{base}/tokenizer_info").json()
        assert info["model"] == model and info["eos_token"]
        for sample in samples:
            pairs = [tuple(argument) for argument in sample["arguments"]]
            choices = QUESTIONS[sample["doc_id"]]["choices"]
            # lm-eval puts its target delimiter, a space, before each choice.
            assert [continuation for _, continuation in pairs] == [f" {choice}" for choice in choices]
            for (context, continuation), response in zip(pairs, sample["resps"], strict=True):
                loglik = float(response[0][0])
                assert math.isfinite(loglik) and loglik < 0
                expected = _endpoint_loglikelihood(http, base, model, context, continuation)
                assert loglik == pytest.approx(expected, abs=TOLERANCE), (context, continuation)


def test_scoped_routes_speak_for_their_model(openai_app: str) -> None:
    with httpx.Client(base_url=openai_app, timeout=120) as http:
        text = "The capital of France is"
        gemma = http.post(
            "/models/gemma3/tokenize", json={"prompt": text, "add_special_tokens": False}
        ).json()
        named = http.post(
            "/tokenize", json={"model": "gemma3", "prompt": text, "add_special_tokens": False}
        ).json()
        ensemble = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert gemma["tokens"] == named["tokens"] != ensemble["tokens"]
        clash = http.post("/models/gemma3/tokenize", json={"model": "smollm2", "prompt": text})
        assert clash.status_code == 400 and clash.json()["error"]["code"] == "conflicting_options"
        body = {"model": "smollm2", "prompt": [1, 2], "max_tokens": 1}
        assert http.post("/models/gemma3/v1/completions", json=body).status_code == 400
        assert http.get("/models/nope/tokenizer_info").status_code == 404
        sizes = {
            m: http.get("/tokenizer_info", params={"model": m}).json()["vocab_size"]
            for m in ("consort", "gemma3")
        }
        assert sizes == {"consort": 49152, "gemma3": 262144}  # the ensemble's: its main member's (SmolLM2)
