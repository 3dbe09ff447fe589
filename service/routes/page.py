"""GET /: the web page (service/static/, owned by the page; read from disk per request)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The single-page demo UI."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise HTTPException(status_code=404)
    return FileResponse(page, media_type="text/html")
