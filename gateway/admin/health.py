"""``GET /`` and ``GET /health``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.response import Redirect

from engine.models import ModelManager
from gateway import __version__


@get("/", summary="Service information", tags=["Service"])
async def index(
    request: Request[Any, Any, Any], model_manager: NamedDependency[ModelManager]
) -> Response[dict[str, Any]]:
    """Service name, version and models; a browser (``Accept`` preferring ``text/html``) is sent to the
    web console at ``/ui/`` instead."""
    preferred = request.accept.best_match(["application/json", "text/html"], default="application/json")
    if preferred == "text/html":
        return Redirect("/ui/")  # a Response: the documented 200 stays the JSON object
    return Response(
        {
            "service": "PocketLLM Gateway",
            "version": __version__,
            "models": [r.id for r in model_manager.runtimes],
            "docs": "/docs",
            "console": "/ui/",
            "openapi": "/schema/openapi.json",
        }
    )


@get("/health", summary="Health", tags=["Service"])
async def health(model_manager: NamedDependency[ModelManager]) -> Response[dict[str, Any]]:
    """200 when every model is loaded, 503 otherwise; per-model state, and for an upstream model each
    replica's state by index and host (an upstream with every replica ejected is still ``ready``: the
    gateway serves its other models, and the replicas' health checks bring it back)."""
    states = {
        r.id: {
            "state": r.state,
            **({"error": r.error} if r.error else {}),
            **({"slots": r.pool.slots, "busy": r.pool.busy, "queued": r.pool.waiting} if r.pool else {}),
            **(
                {"busy": r.upstream.running, "queued": 0, "replicas": r.upstream.status()}
                if r.upstream is not None
                else {}
            ),
        }
        for r in model_manager.runtimes
    }
    ok = model_manager.all_ready
    return Response(
        {"status": "ok" if ok else "unavailable", "models": states}, status_code=200 if ok else 503
    )
