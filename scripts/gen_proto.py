#!/usr/bin/env python3
"""Regenerate the Python gRPC modules from ``proto/`` into ``mfh_client/_generated/``.

Usage::

    python scripts/gen_proto.py            # regenerate in place
    python scripts/gen_proto.py --check    # CI: fail if the committed files are stale

Paths are relative to the repository root, found from this script's location, so it works from
any working directory (``--root`` points it at another tree, e.g. a copy in a test).

How the import problem is solved
--------------------------------
``protoc`` names Python modules after the proto path, so ``proto/mfh/v1/memory_fusion.proto``
becomes ``mfh/v1/memory_fusion_pb2.py``, and the generated ``memory_fusion_pb2_grpc.py`` says
``from mfh.v1 import memory_fusion_pb2 as ...``, an absolute import of a top-level ``mfh``
package that does not exist here. Rather than adding ``mfh_client/_generated`` to ``sys.path`` or
making the proto package path mirror the Python package (``package mfh_api._generated`` would
leak a Python layout into the wire contract), we:

1. run ``grpc_tools.protoc`` with ``--python_out``, ``--pyi_out`` and ``--grpc_python_out`` into
   a temporary directory, keeping the ``mfh/v1/`` layout and the proto file names unchanged (so
   the descriptors registered in the protobuf pool keep their canonical name
   ``mfh/v1/memory_fusion.proto``);
2. rewrite every generated ``from mfh.v1 import X`` line (only that exact prefix, anchored at
   the start of a line) to the relative ``from . import X``; the script fails if a generated
   file still mentions an ``mfh.v1`` import afterwards, so a change in protoc's output cannot
   slip through silently;
3. copy the ``mfh/v1/`` files flat into ``mfh_client/_generated/`` next to a fixed ``__init__.py``,
   and (in write mode) remove generated-looking files there that are no longer produced.

``--check`` runs steps 1-2 into a temporary directory and compares bytes with the committed
files; it exits 1 listing every stale, missing or unexpected file. Output is deterministic for a
given ``grpcio-tools`` version (protoc writes a version header and a serialized descriptor into
the modules), so CI must use the same ``grpcio-tools`` version as the developer who regenerated.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "proto"  # relative to the root; the protoc include path
PROTO_PACKAGE_DIR = "mfh/v1"  # relative to PROTO_DIR; every *.proto in it is generated
OUT_DIR = "mfh_client/_generated"  # relative to the root

INIT_TEXT = '''"""Python modules generated from proto/mfh/v1/*.proto: generated; do not edit.

Regenerate with ``python scripts/gen_proto.py``; import them through ``mfh_client.proto``.
"""
'''

_ABS_IMPORT = re.compile(r"^from mfh\.v1 import ", re.MULTILINE)
_LEFTOVER = re.compile(r"^\s*(from|import) mfh\b", re.MULTILINE)
_GENERATED_NAME = re.compile(r".*_pb2(_grpc)?\.pyi?$")


def generate(root: Path) -> dict[str, bytes]:
    """Run protoc on ``root``'s protos and return ``{file name: content}`` for the output dir."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("gen_proto: grpcio-tools is not installed (pip install -e '.[dev]')") from None

    # grpcio-tools ships the well-known google/protobuf/*.proto files next to its protoc module.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    proto_root = root / PROTO_DIR
    protos = sorted(p.relative_to(proto_root).as_posix() for p in (proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"gen_proto: no .proto files under {proto_root / PROTO_PACKAGE_DIR}")

    files: dict[str, bytes] = {"__init__.py": INIT_TEXT.encode()}
    with tempfile.TemporaryDirectory(prefix="mfh-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"gen_proto: protoc failed with exit code {rc} (see the messages above)")
        gen_dir = Path(tmp) / PROTO_PACKAGE_DIR
        for path in sorted(gen_dir.iterdir()):
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            text = _ABS_IMPORT.sub("from . import ", text)
            if _LEFTOVER.search(text):
                raise SystemExit(f"gen_proto: {path.name} still imports the mfh package after the rewrite")
            files[path.name] = text.encode("utf-8")
    if not any(name.endswith("_pb2_grpc.py") for name in files):
        raise SystemExit("gen_proto: protoc produced no *_pb2_grpc.py module")
    return files


def _existing(out: Path) -> dict[str, bytes]:
    """The files in the output dir that this script owns: ``__init__.py`` and ``*_pb2*``."""
    if not out.is_dir():
        return {}
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.is_file() and (p.name == "__init__.py" or _GENERATED_NAME.fullmatch(p.name))
    }


def check(root: Path) -> int:
    out = root / OUT_DIR
    want = generate(root)
    have = _existing(out)
    problems = []
    for name in sorted(want.keys() | have.keys()):
        rel = f"{OUT_DIR}/{name}"
        if name not in have:
            problems.append(f"  missing:    {rel}")
        elif name not in want:
            problems.append(f"  unexpected: {rel}")
        elif want[name] != have[name]:
            problems.append(f"  stale:      {rel}")
    if problems:
        print(
            f"gen_proto --check: the generated modules do not match {PROTO_DIR}/{PROTO_PACKAGE_DIR}/*.proto:",
            *problems,
            "Regenerate with `python scripts/gen_proto.py` and commit the result "
            "(use the grpcio-tools version from the dev dependencies).",
            sep="\n",
            file=sys.stderr,
        )
        return 1
    print(f"gen_proto --check: {OUT_DIR} is up to date ({len(want)} files)")
    return 0


def write(root: Path) -> int:
    out = root / OUT_DIR
    want = generate(root)
    out.mkdir(parents=True, exist_ok=True)
    for name in _existing(out).keys() - want.keys():
        (out / name).unlink()
        print(f"removed {OUT_DIR}/{name}")
    for name, content in sorted(want.items()):
        target = out / name
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
            print(f"wrote   {OUT_DIR}/{name}")
    print(f"gen_proto: {OUT_DIR} is up to date ({len(want)} files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 if the committed files differ",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO_ROOT,
        help=f"tree holding {PROTO_DIR}/ and {OUT_DIR}/ (default: this repository, {REPO_ROOT})",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    return check(root) if args.check else write(root)


if __name__ == "__main__":
    sys.exit(main())
