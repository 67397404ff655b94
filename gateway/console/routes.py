"""The web console: plain HTML, CSS and ES modules shipped in the package, served under ``/ui``.

Every response carries a strict Content-Security-Policy: scripts, styles and connections only from this
origin, no inline script or style, no framing. The console holds its bearer token in memory and sends it
as a header, so no cookie is involved and there is no CSRF surface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Response
from litestar.router import Router
from litestar.static_files import create_static_files_router

STATIC_DIR = Path(__file__).parent / "static"
"""The console's files (package data)."""

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    # small files that change with the package: revalidate rather than serve a stale module
    "cache-control": "no-cache",
}
"""Headers on every console response."""


async def _secure(response: Response[Any]) -> Response[Any]:
    response.headers.update(SECURITY_HEADERS)
    return response


def console_router() -> Router:
    """``GET /ui`` (the console's page) and its static assets under ``/ui/``."""
    return create_static_files_router(
        "/ui",
        directories=[STATIC_DIR],
        html_mode=True,
        name="console",
        after_request=_secure,
        include_in_schema=False,
    )
