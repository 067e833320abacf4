"""Pages for people, public and served from the package (no CDN, nothing fetched at run time): the web page at `/`
(service/api/web/) and the interactive API docs at `/docs` (swagger-ui) and `/redoc` (ReDoc), whose scripts come
from the fastapi-offline package. The page calls the API like any client; with API keys it sends the key the
person pastes."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from service.api.errors import ProblemError

public_router = APIRouter(include_in_schema=False)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
DOCS_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# what each folder serves, by name: nothing else is reachable, whatever the path says
WEB_ASSETS = ("app.js", "style.css", "favicon.svg")
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
DOCS_ASSETS_PATH = "/docs/assets"
# the page's own policy: scripts, styles and fetches from this origin only; images also as data: / blob: URLs
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
CACHE = "public, max-age=3600"
# ReDoc's side menu always shows a logo from Redocly's CDN (there is no option to turn it off): the script is served
# with that one address pointed at an empty image, so that the docs page makes no request to another origin
REDOC_SCRIPT = "redoc.standalone.js"
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE = b"data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27 width=%271%27 height=%271%27/%3E"


def asset(folder: Path, allowed: tuple[str, ...], name: str) -> FileResponse:
    """One named file of `folder` (404 for any other name), with its media type."""
    if name not in allowed:
        raise ProblemError(404, "not_found", f"there is no asset {name[:80]!r}")
    path = folder / name
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": CACHE})


@public_router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    """The web page: screen a digit or an upload, its spectrum, an OSSA attack on it, the jobs."""
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})


@public_router.get("/web/{name}")
async def web_asset(name: str) -> FileResponse:
    return asset(WEB_DIR, WEB_ASSETS, name)


@lru_cache(maxsize=1)
def redoc_script() -> bytes:
    """fastapi-offline's ReDoc bundle with its one CDN address (the menu's logo) pointed at an empty image."""
    script = (DOCS_ASSETS_DIR / REDOC_SCRIPT).read_bytes()
    if REDOC_CDN_LOGO not in script:  # a ReDoc that no longer has it: nothing to do
        return script
    return script.replace(REDOC_CDN_LOGO, EMPTY_IMAGE)


@public_router.get(f"{DOCS_ASSETS_PATH}/{{name}}")
async def docs_asset(name: str) -> Response:
    if name == REDOC_SCRIPT:
        return Response(redoc_script(), media_type=MEDIA_TYPES[".js"], headers={"Cache-Control": CACHE})
    return asset(DOCS_ASSETS_DIR, DOCS_ASSETS, name)


@public_router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(openapi_url=f"{root}{request.app.openapi_url}",
                               title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
                               swagger_ui_parameters=request.app.swagger_ui_parameters)


@public_router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{root}{DOCS_ASSETS_PATH}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png", with_google_fonts=False)
