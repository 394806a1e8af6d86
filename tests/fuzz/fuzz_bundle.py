"""Coverage-guided fuzzing of bundle verification with atheris (not part of ``make test``).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_bundle.py -atheris_runs=200000 [corpus_dir]

Seeds: a real bundle is built once into ``tests/fuzz/corpus-bundle`` if the directory is
empty, with the hostile variants of ``tests/hostile.py`` beside it (so the walk after the
tar end-of-archive and after the gzip trailer is explored from the start). A crash is any
exception outside ``BundleError`` (edgefleet's refusals).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from edgefleet.contract.bundle import Limits, verify_bundle
    from edgefleet.contract.errors import BundleError
    from edgefleet.contract.signing import generate_key, trust_from_mapping

TRUST = trust_from_mapping({"fuzz": generate_key().public_key()})
LIMITS = Limits(max_bundle_bytes=1 << 20, max_member_bytes=1 << 18, max_total_bytes=1 << 19)


def one(data: bytes) -> None:
    with contextlib.suppress(BundleError):
        verify_bundle(data, TRUST, limits=LIMITS)


def _seed(corpus: Path) -> None:
    if corpus.exists() and any(corpus.iterdir()):
        return
    corpus.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import tempfile

    from tests.bundles import BundleFactory, make_keys
    from tests.hostile import HOSTILE

    with tempfile.TemporaryDirectory() as tmp:
        factory = BundleFactory(Path(tmp) / "b", make_keys(Path(tmp) / "k"))
        valid = factory.build("1.0.0").read_bytes()
        (corpus / "sensor.edgebundle").write_bytes(valid)
        for case in HOSTILE:
            (corpus / f"hostile-{case.id}.edgebundle").write_bytes(case.build(valid))


if __name__ == "__main__":
    corpus = Path(__file__).with_name("corpus-bundle")
    _seed(corpus)
    args = sys.argv + ([str(corpus)] if not any(not a.startswith("-") for a in sys.argv[1:])
                       else [])
    atheris.Setup(args, one)
    atheris.Fuzz()
