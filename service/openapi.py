"""Write the app's OpenAPI document: `python -m service.openapi [--check]`.

The committed openapi/openapi.json is this output; a test fails when it is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.app import create_app
from service.settings import REPO_ROOT, Settings

OPENAPI_PATH = REPO_ROOT / "openapi" / "openapi.json"


def render_openapi() -> str:
    """The document as committed: indented JSON with a trailing newline."""
    app = create_app(Settings(RELOAD_INTERVAL_S=0))
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output", type=Path, default=OPENAPI_PATH, help=f"default: {OPENAPI_PATH}"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    document = render_openapi()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != document:
            print(f"{args.output} is stale; run: python -m service.openapi", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(document, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
