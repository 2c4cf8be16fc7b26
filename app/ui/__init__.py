"""The dashboard at /ui: a static page (HTML, CSS, vanilla JS) that ships in the package.

The shell carries no data, so it is open; every byte of data comes from the JSON API with
the operator's token and its scopes. The files are read once at start-up and served from
memory with a Content-Security-Policy that allows only this origin's own scripts and
connections: no inline script, no eval, no framing.
"""

from importlib import resources

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

CSP = "default-src 'self'; connect-src 'self'; frame-ancestors 'none'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: revalidate each time, so an upgraded server never runs an old script.
    "Cache-Control": "no-cache",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file under static/, by name, with its media type."""
    folder = resources.files("app.ui").joinpath("static")
    assets: dict[str, tuple[bytes, str]] = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in TYPES:
            assets[item.name] = (item.read_bytes(), TYPES[suffix])
    return assets


def mount(app: FastAPI) -> None:
    """Serve the page at /ui and /ui/, and its files at /ui/<name>; outside the spec."""
    assets = load_assets()

    async def page(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        request.scope["bgjobs.route"] = "/ui" if name == "index.html" else "/ui/{name}"
        found = assets.get(name)
        if found is None:
            return JSONResponse({"detail": f"no such dashboard file: {name!r}"}, 404)
        body, media_type = found
        return Response(body, media_type=media_type, headers=HEADERS)

    for path in ("/ui", "/ui/", "/ui/{name}"):
        app.add_route(path, page, methods=["GET", "HEAD"], include_in_schema=False)
