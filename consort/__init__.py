"""Consort: several language models answering as one.

The installed distribution maps the source tree's layer folders under this one name
(`runtime/` → `consort.runtime`, `actors/` → `consort.actors`, `deploy/` →
`consort.deploy`), so installing it adds exactly one top-level import name.

Run from a source tree instead (a checkout on `sys.path`, or the folder that
`ray job submit --working-dir .` unpacks on a cluster), this folder shadows the
installed package; the layers then sit beside it, not inside it, and the package
path reaches them there, so the code that runs is the code that was shipped.
"""

from pathlib import Path

_LAYERS = ("runtime", "actors", "deploy")
_here = Path(__file__).resolve().parent
if not (_here / "runtime").is_dir() and all((_here.parent / layer / "__init__.py").is_file() for layer in _LAYERS):
    __path__.append(str(_here.parent))
