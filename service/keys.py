"""Make and list API keys: `python -m service.keys create --scopes infer [--file PATH]`.

`create` makes a 256-bit random key. The key itself is printed once (stdout, or --key-file) and
stored nowhere; the keys file gets only its line `<key_id> <scope,...> sha256:<hex>`, which
API_KEYS_FILE points at (a Docker or Kubernetes secret in a deployment; docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from service.auth import (
    KEY_ID_PATTERN,
    KEY_PREFIX,
    SCOPES,
    AccessConfigError,
    keys_file_line,
    parse_keys,
)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def create(args: argparse.Namespace) -> int:
    scopes = [s for s in args.scopes.split(",") if s]
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        print(f"unknown scope {unknown}; choose from {', '.join(SCOPES)}", file=sys.stderr)
        return 2
    key_id = args.id or f"key-{secrets.token_hex(4)}"
    if not KEY_ID_PATTERN.fullmatch(key_id):
        print("--id: 1-64 of A-Z a-z 0-9 . _ -", file=sys.stderr)
        return 2
    key = new_key()
    line = keys_file_line(key_id, scopes, key)
    if args.file:
        existing = args.file.read_text(encoding="utf-8") if args.file.exists() else ""
        try:
            ids = {k.key_id for k in parse_keys(existing)}
        except AccessConfigError as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        if key_id in ids:
            print(f"{args.file} already has a key {key_id}", file=sys.stderr)
            return 1
        # Digests only, so the file may be readable by the service's user (another uid in a
        # container); keep it in a folder only you can enter.
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as out:
            if existing and not existing.endswith("\n"):
                out.write("\n")
            out.write(line + "\n")
        print(f"added key {key_id} ({','.join(scopes)}) to {args.file}", file=sys.stderr)
    else:
        print(f"keys-file line (add it to API_KEYS_FILE):\n{line}", file=sys.stderr)
    if args.key_file:
        _write_private(args.key_file, key + "\n")
        print(f"the key is in {args.key_file} (0600); it is shown nowhere else", file=sys.stderr)
    else:
        print("the key (shown once; send it as Authorization: Bearer <key>):", file=sys.stderr)
        print(key)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    try:
        keys = parse_keys(args.file.read_text(encoding="utf-8"))
    except (OSError, AccessConfigError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    for key in keys:
        print(f"{key.key_id}\t{','.join(sorted(key.scopes))}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("create", help="make a key")
    make.add_argument("--scopes", required=True, help=f"comma-separated, of: {', '.join(SCOPES)}")
    make.add_argument("--id", help="key id, named in logs and the audit log (default: random)")
    make.add_argument("--file", type=Path, help="keys file to append the line to (default: print)")
    make.add_argument(
        "--key-file", type=Path, help="write the key to this file, 0600 (default: stdout)"
    )
    make.set_defaults(run=create)
    show = commands.add_parser("list", help="key ids and scopes of a keys file")
    show.add_argument("--file", type=Path, required=True)
    show.set_defaults(run=list_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
