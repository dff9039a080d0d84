"""The Starlette app: three static pages (``static/``) and a JSON API they call.

Pages: ``/search``, ``/corpus``, ``/runs``. API (GET only; the app has no route that writes):

- ``/api/config``                 datasets (shards and their splits), models, runs, reports
- ``/api/search``                 ``model, ds, split, q, k``: a sentence's top-k images
- ``/api/search_image``           ``model, ds, split, key, k``: an image's top-k texts
- ``/api/corpus``                 ``ds, split, verdict, source, score, lo, hi, key, page, size``
- ``/api/corpus_stats``           ``ds, split``: verdict counts and score histograms
- ``/api/image``                  ``ds, split, key``: the image bytes as stored
- ``/api/runs``                   ``reference``: bench results side by side
- ``/api/file``                   ``root, path``: a file under one of the roots (report figures)

Every refusal or failure answers ``{"error": message}`` with a 4xx / 5xx status (plain text for
``/api/file`` and images, which a browser opens directly); no stack trace reaches the page.
"""

from __future__ import annotations

import logging
import mimetypes
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from .config import UIConfig, UIError
from .corpus import CorpusFilter, ImageFolder, ShardDir
from .paths import Roots
from .runs import runs_view
from .search import EmbeddingCache, engine_for, image_to_texts, models_of, text_to_images

log = logging.getLogger(__name__)

PAGES = ("search", "corpus", "runs")
# the pages load nothing from anywhere but this app (inline styles: the charts' and colours' own)
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
MAX_K = 100
MAX_PAGE_SIZE = 200


class State:
    """What the app holds between requests (all of it read-only but the embedding cache)."""

    def __init__(self, cfg: UIConfig):
        self.cfg = cfg
        self.roots = Roots(cfg.roots())
        self.datasets: dict[str, ShardDir | ImageFolder] = {n.name: ShardDir(n.name, n.path) for n in cfg.shards}
        self.datasets.update({n.name: ImageFolder(n.name, n.path) for n in cfg.images})
        self.models = models_of(cfg)
        self.cache = EmbeddingCache(cfg.cache_dir)

    def dataset(self, name: str) -> ShardDir | ImageFolder:
        if name not in self.datasets:
            raise UIError(f"ds {name!r}: no such shard directory or image folder; known: {sorted(self.datasets)}", 404)
        return self.datasets[name]

    def model(self, name: str):
        if name not in self.models:
            raise UIError(f"model {name!r}: no such model; known: {sorted(self.models)}", 404)
        return self.models[name]

    def embedded(self, model: str, ds: str, split: str):
        return self.cache.get(self.model(model), self.dataset(ds), split)


def _arg(request: Request, name: str, default: str | None = None) -> str:
    v = request.query_params.get(name, default)
    if v is None:
        raise UIError(f"{name}: required", 400)
    return v


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise UIError(f"{name}: expected an integer, got {raw!r}", 400) from None
    if not lo <= v <= hi:
        raise UIError(f"{name}: {v} is outside [{lo}, {hi}]", 400)
    return v


def _float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise UIError(f"{name}: expected a number, got {raw!r}", 400) from None


def build_app(cfg: UIConfig) -> Starlette:
    st = State(cfg)

    def page(name: str):
        def endpoint(request: Request) -> Response:
            html = resources.files("d2s_ui").joinpath("static", f"{name}.html").read_text()
            return Response(html, media_type="text/html", headers={"Content-Security-Policy": CSP})

        return endpoint

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ("app.js", "style.css"):
            raise UIError(f"static file {name!r}: no such file", 404)
        text = resources.files("d2s_ui").joinpath("static", name).read_text()
        return Response(text, media_type=mimetypes.guess_type(name)[0] or "text/plain")

    def config(request: Request) -> dict[str, Any]:
        datasets = []
        for name, d in st.datasets.items():
            kind = "images" if isinstance(d, ImageFolder) else "shards"
            try:
                datasets.append({"name": name, "kind": kind, "path": str(d.path), "splits": d.splits()})
            except UIError as exc:
                datasets.append({"name": name, "kind": kind, "path": str(d.path), "splits": {}, "problem": str(exc)})
        reports = []
        for n in cfg.reports:
            figs = sorted(p.name for p in n.path.glob("*.png"))
            where = st.roots.root_of(n.path / "x")
            reports.append({"name": n.name, "root": where[0] if where else "", "figures": figs})
        return {
            "datasets": datasets,
            "models": [{"name": m.name, "kind": m.kind, "path": m.path} for m in st.models.values()],
            "runs": [n.name for n in cfg.results],
            "reports": reports,
            "roots": st.roots.names(),
            "read_only": True,
        }

    def search(request: Request) -> dict[str, Any]:
        q = request.query_params.get("q", "").strip()
        if not q:
            raise UIError("q: type a sentence to search for", 400)
        k = _int(request, "k", 10, 1, MAX_K)
        model = st.model(_arg(request, "model"))
        t0 = time.perf_counter()
        emb = st.embedded(model.name, _arg(request, "ds"), _arg(request, "split"))
        engine = engine_for(cfg, len(emb.keys))
        results = text_to_images(model, emb, q, k, engine)
        return {
            "model": model.name,
            "engine": engine,
            "images": len(emb.keys),
            "cached": emb.cached,
            "seconds": round(time.perf_counter() - t0, 4),
            "results": results,
        }

    def search_image(request: Request) -> dict[str, Any]:
        k = _int(request, "k", 10, 1, MAX_K)
        model = st.model(_arg(request, "model"))
        t0 = time.perf_counter()
        emb = st.embedded(model.name, _arg(request, "ds"), _arg(request, "split"))
        results = image_to_texts(emb, _arg(request, "key"), k)
        return {"model": model.name, "seconds": round(time.perf_counter() - t0, 4), "results": results}

    def corpus(request: Request) -> dict[str, Any]:
        d = st.dataset(_arg(request, "ds"))
        f = CorpusFilter(
            verdict=request.query_params.get("verdict", ""),
            source=request.query_params.get("source", ""),
            score=request.query_params.get("score", ""),
            lo=_float(request, "lo"),
            hi=_float(request, "hi"),
            key=request.query_params.get("key", ""),
        )
        page_no = _int(request, "page", 0, 0, 10**9)
        size = _int(request, "size", 12, 1, MAX_PAGE_SIZE)
        return d.query(_arg(request, "split"), f, page_no, size)

    def corpus_stats(request: Request) -> dict[str, Any]:
        return st.dataset(_arg(request, "ds")).stats(_arg(request, "split"))

    def image(request: Request) -> Response:
        data, media = st.dataset(_arg(request, "ds")).image(_arg(request, "split"), _arg(request, "key"))
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    def runs(request: Request) -> dict[str, Any]:
        return runs_view(cfg.results, request.query_params.get("reference", ""))

    def file(request: Request) -> Response:
        path = st.roots.resolve(_arg(request, "root"), _arg(request, "path"))
        return FileResponse(path)

    def api(fn, plain: bool = False):
        def endpoint(request: Request) -> Response:
            try:
                out = fn(request)
            except UIError as exc:
                log.info("%s %s: %s", request.url.path, exc.status, exc)
                return _error(str(exc), exc.status, plain)
            except Exception as exc:  # noqa: BLE001 - never a stack trace on the page
                log.exception("%s failed", request.url.path)
                return _error(f"internal error: {type(exc).__name__}: {exc}", 500, plain)
            return out if isinstance(out, Response) else JSONResponse(out)

        return endpoint

    routes = [
        Route("/", lambda request: RedirectResponse("/search")),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        *[Route(f"/{p}", api(page(p), plain=True)) for p in PAGES],
        Route("/static/{name}", api(static, plain=True)),
        Route("/api/config", api(config)),
        Route("/api/search", api(search)),
        Route("/api/search_image", api(search_image)),
        Route("/api/corpus", api(corpus)),
        Route("/api/corpus_stats", api(corpus_stats)),
        Route("/api/image", api(image, plain=True)),
        Route("/api/runs", api(runs)),
        Route("/api/file", api(file, plain=True)),
    ]
    app = Starlette(routes=routes)
    app.state.ui = st
    return app


def _error(message: str, status: int, plain: bool) -> Response:
    if plain:
        return PlainTextResponse(f"d2s ui: {message}\n", status_code=status)
    return JSONResponse({"error": message}, status_code=status)
