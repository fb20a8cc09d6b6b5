"""Generate the bridge's protobuf modules from `proto/*.proto` (never edit the output by hand).

    python -m wpk.bridge.protogen          # rewrite wpk/bridge/_generated/
    python -m wpk.bridge.protogen --check  # exit 1 if the committed files are stale

Needs `grpcio-tools` (the `test` extra pins a version whose protobuf matches the runtime's).
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent
PROTO_DIR = REPO_ROOT / "proto"
OUTPUT_DIR = PACKAGE_DIR / "_generated"
PROTOS = ["sparkplug_b.proto"]


def generate(output_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on PROTOS; returns the written module paths."""
    from grpc_tools import protoc  # imported here: only needed to regenerate

    output_dir.mkdir(parents=True, exist_ok=True)
    for name in PROTOS:
        status = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={output_dir}",
                              str(PROTO_DIR / name)])
        if status != 0:
            raise SystemExit(f"protoc failed on {PROTO_DIR / name}")
    return [output_dir / (Path(name).stem + "_pb2.py") for name in PROTOS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wpk.bridge.protogen",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed modules instead of writing them")
    args = parser.parse_args(argv)
    if not args.check:
        for path in generate(OUTPUT_DIR):
            print(path.relative_to(REPO_ROOT))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        stale = [p.name for p in generate(Path(scratch))
                 if not (OUTPUT_DIR / p.name).exists()
                 or not filecmp.cmp(p, OUTPUT_DIR / p.name, shallow=False)]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python -m wpk.bridge.protogen",
              file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
