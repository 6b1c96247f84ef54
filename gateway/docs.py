"""`GET /docs`: the browsable API reference, Swagger UI over /openapi.json. Its assets come
from the `swagger-ui-py` wheel (Swagger UI 5) and are served from here: nothing is
fetched from a CDN, so it works on a machine with no internet."""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ALL-USE Account Engine · API reference</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" href="/console/static/favicon.svg">
<style>body{margin:0} .topbar{display:none}</style></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/swagger-initializer-alluse.js"></script>
</body></html>"""

# In a file of its own (not inline): the console's Content-Security-Policy allows only
# scripts from this origin.
INITIALIZER = """window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, persistAuthorization: false, tryItOutEnabled: false, docExpansion: "list",
  defaultModelsExpandDepth: 0});"""

ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js")


def _assets_dir() -> Path:
    import swagger_ui

    return Path(swagger_ui.__file__).parent / "static"


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def initializer(request: web.Request) -> web.Response:
    return web.Response(text=INITIALIZER, content_type="application/javascript")


def setup(app: web.Application) -> None:
    directory = _assets_dir()
    app.router.add_get("/docs", page)
    app.router.add_get("/docs/assets/swagger-initializer-alluse.js", initializer)
    for name in ASSETS:
        path = directory / name
        app.router.add_get(f"/docs/assets/{name}", _file(path))


def _file(path: Path):
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    return serve
