"""`tiny:<alias>[@seed]` references: a saved folder in the model cache, written by the test fixture builder.

Serving only loads that folder (in any process); the builder is imported to prepare it,
never to load it. The folder holds exactly the model build_tiny gives in process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from consort.cli import main
from consort.runtime import models
from consort.runtime.errors import ModelNotFound
from consort.runtime.testing import tiny
from consort.runtime.testing.tiny import build_tiny, fingerprint, save_tiny

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Hello world, ünïcödé 日本語 🤖", "  spaces\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]


def _config(model: Any) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from
    return config


@pytest.mark.parametrize(
    "reference", ["tiny:smollm2-135m-instruct", "tiny:gemma3-270m", "tiny:smollm2-135m-instruct@1"]
)
def test_the_saved_folder_holds_exactly_what_build_tiny_gives(reference: str) -> None:
    alias, seed = models.parse_tiny(reference)
    save_tiny(reference)
    built, built_tokenizer = build_tiny(alias, seed=seed)
    loaded, loaded_tokenizer = models.load(reference)
    expected, actual = built.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "weights differ"
    assert _config(built) == _config(loaded)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert built.config._attn_implementation == loaded.config._attn_implementation
    assert built.generation_config.to_dict() == loaded.generation_config.to_dict()
    ids = torch.tensor([built_tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, loaded(ids).logits)
    assert type(built_tokenizer) is type(loaded_tokenizer)
    assert built_tokenizer.backend_tokenizer.to_str() == loaded_tokenizer.backend_tokenizer.to_str()
    assert built_tokenizer.chat_template == loaded_tokenizer.chat_template
    assert built_tokenizer.all_special_ids == loaded_tokenizer.all_special_ids
    for text in TEXTS:
        assert built_tokenizer(text)["input_ids"] == loaded_tokenizer(text)["input_ids"], text


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first, _ = build_tiny("smollm2-135m-instruct", seed=0)
    again, _ = build_tiny("smollm2-135m-instruct", seed=0)
    other, _ = build_tiny("smollm2-135m-instruct", seed=1)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_references_name_one_folder_per_alias_and_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.parse_tiny("tiny:gemma3-270m") == ("gemma3-270m", 0)
    assert models.tiny_dir("tiny:gemma3-270m") == models.tiny_dir("tiny:gemma3-270m@0")
    assert models.tiny_dir("tiny:gemma3-270m@2") == tmp_path / "tiny" / "gemma3-270m@2"
    for bad, message in [
        ("tiny:gpt-9", "unknown alias 'gpt-9'"),
        ("tiny:gemma3-270m@x", "must be an integer"),
        ("tiny:gemma3-270m@-1", "must be >= 0"),
    ]:
        with pytest.raises(ModelNotFound, match=message):
            models.load(bad)


def test_a_missing_folder_says_how_to_prepare_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    with pytest.raises(ModelNotFound, match=r"run `consort prepare tiny:gemma3-270m@3`"):
        models.load("tiny:gemma3-270m@3")
    with pytest.raises(ModelNotFound, match="consort prepare tiny:smollm2-135m-instruct"):
        models.load_tokenizer("tiny:smollm2-135m-instruct")
    assert not (tmp_path / "tiny").exists(), "loading never builds"


def test_prepare_writes_once_and_rebuilds_a_stale_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the tiny folder moves to tmp_path: the real tokenizer still comes from the real cache.
    folder = tmp_path / "tiny" / "smollm2-135m-instruct@5"
    monkeypatch.setattr(models, "tiny_dir", lambda reference: folder)
    reference = "tiny:smollm2-135m-instruct@5"
    assert main(["prepare", reference]) == 0
    assert str(folder) in capsys.readouterr().out
    marker = folder / "consort.json"
    assert json.loads(marker.read_text()) == fingerprint("smollm2-135m-instruct", 5)
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert models.prepare(reference) == folder and weights.stat().st_mtime_ns == written, "kept as it is"
    marker.write_text(json.dumps({**fingerprint("smollm2-135m-instruct", 5), "torch": "1.0"}))
    assert not tiny.is_saved(reference)
    assert models.prepare(reference) == folder
    assert tiny.is_saved(reference) and weights.stat().st_mtime_ns != written, "rebuilt"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "no temporary folders left"


def test_serving_never_imports_the_builder() -> None:
    """The member actors and the Serve app load `tiny:` members without the test fixture module."""
    code = (
        "import sys\n"
        "from consort.runtime import models\n"
        "import consort.actors.member, consort.deploy.app\n"
        "from consort.runtime.config import parse_config\n"
        "from consort.runtime.loop import EnsembleLoop\n"
        "config = parse_config({'members': [{'name': 'a', 'model': 'tiny:smollm2-135m-instruct'},"
        " {'name': 'b', 'model': 'tiny:gemma3-270m'}]})\n"
        "EnsembleLoop.from_config(config, device='cpu')\n"
        "loaded = sorted(n for n in sys.modules if n.startswith('consort.runtime.testing'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
