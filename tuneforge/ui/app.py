"""`tuneforge ui`: pages over a runs root (Starlette, Jinja2 templates, Server-Sent Events).

Pages: Runs (every run under the root, live), Run (config, live curves, before/after, samples, log, stop,
resume, export), New run (YAML editor validated as `tuneforge validate` does, parameter count, the exact
command, saved configs), Compare (`tuneforge compare`'s report), Chat (base and tuned side by side).
Security rules: `tuneforge.ui.security`.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tuneforge.export import ADAPTER_DIR
from tuneforge.ui import launcher, runs_index
from tuneforge.ui.security import MAX_BODY, Guard, GuardMiddleware, Refused, inside, plain_name

HERE = Path(__file__).parent
EXAMPLES = HERE.parent.parent / "examples"  # the repository's examples, when run from a checkout
DEFAULT_EXAMPLE = "quickstart.yaml"
POLL_SECONDS = 0.5
NO_STORE = {"Cache-Control": "no-store"}
REPORT_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                 "frame-ancestors 'self'")
STREAM_SECONDS = 300  # an event stream ends after this; the browser reconnects where it left off


class Site:
    """The pages and actions over one runs root, under one `Guard`."""

    def __init__(self, root: Path, guard: Guard):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.guard = guard
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["count"] = _count
        self.templates.env.filters["num"] = _num

    def page(self, request: Request, name: str, **context) -> HTMLResponse:
        context = {"csrf": self.guard.csrf, "root": str(self.root), **context}
        return self.templates.TemplateResponse(request, name, context)

    async def posted(self, request: Request) -> dict:
        """The body of a POST (form or JSON) after its CSRF token is checked."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                raise Refused(400, "the request body is not JSON") from None
            data = body if isinstance(body, dict) else {}
        else:
            form = await request.form(max_files=0, max_fields=64, max_part_size=MAX_BODY)
            data = {key: form.getlist(key) if key.endswith("[]") else form.get(key) for key in form}
        self.guard.check_csrf(request.headers.get("x-csrf-token") or data.get("csrf"))
        return data

    def run_dir(self, run_id: str) -> Path:
        path = inside(self.root, run_id)
        if not (path / "config.yaml").is_file() and launcher.launch_state(path) is None:
            raise Refused(404, f"no such run: {run_id!r}")
        return path

    def summary(self, run_id: str) -> dict:
        """A run's row; a run this server started speaks through it until its own process does."""
        row = runs_index.summary(self.root, run_id)
        launched = launcher.launch_state(self.root / run_id)
        if launched is not None:
            row["state"], row["error"] = launched[0], launched[1] or row["error"]
        return row

    # ---- Runs ----
    def rows(self) -> list[dict]:
        launcher.reap()
        found = set(runs_index.find_runs(self.root)) | set(launcher.started_ids(self.root))
        return sorted((self.summary(r) for r in found), key=lambda row: -row["modified"])

    async def runs_page(self, request: Request):
        return self.page(request, "runs.html", rows=await run_in_threadpool(self.rows))

    async def runs_events(self, request: Request):
        async def stream():
            last, waited = None, 0.0
            while waited < STREAM_SECONDS and not await request.is_disconnected():
                table = await run_in_threadpool(self.rows)
                body = self.templates.get_template("runs_rows.html").render(rows=table)
                if body != last:
                    yield f"event: rows\ndata: {json.dumps({'html': body})}\n\n"
                    last = body
                if request.query_params.get("once"):
                    return
                await asyncio.sleep(2 * POLL_SECONDS)
                waited += 2 * POLL_SECONDS
        return StreamingResponse(stream(), media_type="text/event-stream", headers=NO_STORE)

    # ---- Run ----
    async def run_page(self, request: Request):
        run_id = request.path_params["run_id"]
        path = self.run_dir(run_id)
        results = runs_index.read_json(path / "results.json")
        row = self.summary(run_id)
        if row["state"] in ("running", "starting"):
            results = None
        metric_rows, cost_rows = [], []
        if results:
            from tuneforge.report import cost_rows as costs
            from tuneforge.report import metric_rows as metrics

            metric_rows, cost_rows = metrics(results), costs(results)
        samples = (results or {}).get("after", {}).get("samples", [])
        before_samples = (results or {}).get("before", {}).get("samples", [])
        config_file = path / "config.yaml"
        text = config_file.read_text(errors="replace") if config_file.is_file() else "(starting)"
        log = runs_index.log_tail(launcher.log_path(self.root, run_id))
        return self.page(request, "run.html", run=row, config_text=text, metric_rows=metric_rows,
                         cost_rows=cost_rows, samples=samples, before_samples=before_samples, log=log,
                         has_adapter=(path / ADAPTER_DIR).is_dir(), notice=request.query_params.get("notice"))

    async def run_events(self, request: Request):
        run_id = request.query_params.get("run", "")
        path = self.run_dir(run_id)
        offset = int(request.headers.get("last-event-id") or 0)
        once = bool(request.query_params.get("once"))

        async def stream():
            nonlocal offset
            last_status, waited = None, 0.0
            yield "retry: 2000\n\n"
            while waited < STREAM_SECONDS and not await request.is_disconnected():
                metrics = path / "metrics.jsonl"
                size = metrics.stat().st_size if metrics.exists() else 0
                if size < offset:  # rewritten by a resume: start over
                    offset = 0
                    yield "event: reset\ndata: {}\n\n"
                if offset == 0:  # the base model's evaluation is the curves' step 0
                    before = runs_index.read_json(path / "evaluation_before.json") or {}
                    yield f"event: before\ndata: {json.dumps(_point(before))}\n\n"
                records, offset_now = await run_in_threadpool(runs_index.read_records, metrics, offset)
                if records:
                    yield f"id: {offset_now}\nevent: metrics\ndata: {json.dumps(records)}\n\n"
                offset = offset_now
                row = await run_in_threadpool(self.summary, run_id)
                status = {key: row[key] for key in ("state", "step", "total_steps", "error", "reason")}
                status["log"] = runs_index.log_tail(launcher.log_path(self.root, run_id), 15)
                results = runs_index.read_json(path / "results.json") if row["state"] == "finished" else None
                status["after"] = {**_point(results["after"]), "step": results["steps"]} if results else None
                if status != last_status:
                    yield f"event: status\ndata: {json.dumps(status)}\n\n"
                    last_status = status
                if once or (row["state"] not in ("running", "starting") and waited > 4):
                    yield "event: done\ndata: {}\n\n"
                    return
                await asyncio.sleep(POLL_SECONDS)
                waited += POLL_SECONDS
        return StreamingResponse(stream(), media_type="text/event-stream", headers=NO_STORE)

    async def stop(self, request: Request):
        data = await self.posted(request)
        run_id = str(data.get("run", ""))
        said = launcher.stop_train(self.run_dir(run_id))
        return _back(run_id, said or "the run is not running")

    async def resume(self, request: Request):
        data = await self.posted(request)
        run_id = str(data.get("run", ""))
        path = self.run_dir(run_id)
        state = self.summary(run_id)["state"]
        if state in ("running", "starting"):
            return _back(run_id, "the run is already running")
        if state == "finished":
            return _back(run_id, "the run has finished: there is nothing to resume")
        if not (path / "checkpoints").is_dir():
            return _back(run_id, "no checkpoint to resume from")
        launcher.resume_train(self.root, run_id)
        return _back(run_id, "resumed: tuneforge train --resume started")

    async def adapter_zip(self, request: Request):
        run_id = request.query_params.get("run", "")
        adapter = self.run_dir(run_id) / ADAPTER_DIR
        if not adapter.is_dir():
            raise Refused(404, "this run has no adapter")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for file in sorted(adapter.iterdir()):
                if file.is_file() and not file.is_symlink():
                    archive.write(file, f"adapter/{file.name}")
        name = launcher.flat(run_id) + "-adapter.zip"
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def export(self, request: Request):
        data = await self.posted(request)
        run_id = str(data.get("run", ""))
        path = self.run_dir(run_id)
        if not (path / ADAPTER_DIR).is_dir():
            return JSONResponse({"ok": False, "message": "this run has no adapter to merge"}, status_code=400)
        kind = str(data.get("format", "merged"))
        if kind not in ("merged", "gguf"):
            return JSONResponse({"ok": False, "message": "format is merged or gguf"}, status_code=400)
        export = launcher.export_merged if kind == "merged" else launcher.export_gguf
        error, output = await run_in_threadpool(export, self.root, run_id)
        what = "merged model" if kind == "merged" else "GGUF (q8_0) and its Modelfile"
        return JSONResponse({"ok": error is None, "message": error or f"{what} written to {output}"})

    # ---- New run ----
    def examples(self) -> list[str]:
        return sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml")
                      if "accelerate" not in p.parts) if EXAMPLES.is_dir() else []

    def saved(self) -> list[str]:
        configs = self.root / launcher.CONFIGS
        return sorted(p.stem for p in configs.glob("*.yaml") if not p.name.startswith("."))

    def config_text(self, source: str) -> str:
        kind, _, name = source.partition(":")
        if kind == "example" and name in self.examples():
            return (EXAMPLES / name).read_text()
        if kind == "saved":
            path = inside(self.root / launcher.CONFIGS, plain_name(name, "config") + ".yaml", "config")
            if path.is_file():
                return path.read_text()
        if kind == "run":
            return (self.run_dir(name) / "config.yaml").read_text()
        raise Refused(404, f"no such config: {source[:100]!r}")

    async def new_page(self, request: Request):
        from tuneforge.strategies import REGISTRY

        source = request.query_params.get("load") or (f"example:{DEFAULT_EXAMPLE}" if
                                                      DEFAULT_EXAMPLE in self.examples() else "")
        text = self.config_text(source) if source else (
            "model: smollm2-135m\ndata: {train: builtin:chatterbot}\n")
        strategies = []
        for name, entry in sorted(REGISTRY.items()):
            options = {field: (f.default_factory() if f.default_factory else f.default)
                       for field, f in entry.options.model_fields.items()}
            strategies.append({"name": name, "family": entry.family, "summary": entry.summary,
                               "options": options, "snippet": _snippet(name, options)})
        return self.page(request, "new.html", text=text, source=source, examples=self.examples(),
                         saved=self.saved(), strategies=strategies)

    async def load_config(self, request: Request):
        return JSONResponse({"text": self.config_text(request.query_params.get("source", ""))})

    async def validate(self, request: Request):
        data = await self.posted(request)
        name = plain_name(str(data.get("config_name") or "config"), "config name")
        text = str(data.get("yaml", ""))
        return JSONResponse(await run_in_threadpool(launcher.check_config, self.root, text, name))

    async def inspect(self, request: Request):
        data = await self.posted(request)
        text = str(data.get("yaml", ""))
        return JSONResponse(await run_in_threadpool(launcher.inspect_config, self.root, text))

    def save_config(self, data: dict) -> Path:
        name = plain_name(str(data.get("config_name", "")), "config name")
        directory = self.root / launcher.CONFIGS
        directory.mkdir(parents=True, exist_ok=True)
        path = inside(directory, f"{name}.yaml", "config")
        from tuneforge.checkpoint import write_atomic

        write_atomic(path, str(data.get("yaml", "")))
        return path

    async def save(self, request: Request):
        path = self.save_config(await self.posted(request))
        return JSONResponse({"ok": True, "message": f"saved as {path}", "saved": self.saved()})

    async def start(self, request: Request):
        data = await self.posted(request)
        run_name = plain_name(str(data.get("run_name", "")), "run name")
        config_name = plain_name(str(data.get("config_name", "")), "config name")
        text = str(data.get("yaml", ""))
        check = await run_in_threadpool(launcher.check_config, self.root, text, config_name)
        if not check["ok"]:
            return JSONResponse(check, status_code=400)
        target = inside(self.root, run_name)
        if target.exists() and any(target.iterdir()):
            return JSONResponse({"ok": False, "line": None, "message": f"{target}: a run (or other files) is "
                                 "already there: choose another run name"}, status_code=400)
        path = self.save_config(data)
        launcher.start_train(self.root, run_name, path)
        return JSONResponse({"ok": True, "run": run_name, "url": f"/run/{run_name}",
                             "command": launcher.shown_command(self.root, config_name, run_name)})

    # ---- Compare ----
    async def compare_page(self, request: Request):
        table = await run_in_threadpool(self.rows)
        key = request.query_params.get("report")
        report = None
        if key:
            plain_name(key, "report")
            made = (self.root / launcher.UI_DIR / "compare" / key / "report.html").is_file()
            report = key if made else None
        return self.page(request, "compare.html", rows=[r for r in table if r["state"] == "finished"],
                         report=report, notice=request.query_params.get("notice"),
                         chosen=request.query_params.getlist("run"))

    async def compare(self, request: Request):
        data = await self.posted(request)
        chosen = [str(r) for r in data.get("run[]") or []]
        if not chosen:
            return RedirectResponse("/compare?notice=pick+at+least+one+finished+run", status_code=303)
        for run_id in chosen:
            if not (self.run_dir(run_id) / "results.json").is_file():
                raise Refused(400, f"{run_id}: not a finished run")
        key, error = await run_in_threadpool(launcher.compare_runs, self.root, chosen)
        if error:
            return RedirectResponse("/compare?" + _query(notice=f"compare failed: {error}"), status_code=303)
        return RedirectResponse("/compare?" + _query(report=key, run=chosen), status_code=303)

    async def compare_report(self, request: Request):
        key = plain_name(request.path_params["key"], "report")
        path = self.root / launcher.UI_DIR / "compare" / key / "report.html"
        if not path.is_file():
            raise Refused(404, "no such comparison")
        # the report is one self-contained file: its own inline style and sorting script, nothing fetched
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_POLICY})

    # ---- Chat ----
    async def chat_page(self, request: Request):
        table = await run_in_threadpool(self.rows)
        runs = [r for r in table if r["state"] == "finished" and (self.root / r["id"] / ADAPTER_DIR).is_dir()]
        return self.page(request, "chat.html", runs=runs, chosen=request.query_params.get("run"))

    async def chat(self, request: Request):
        data = await self.posted(request)
        run_id = str(data.get("run", ""))
        path = self.run_dir(run_id)
        prompt = str(data.get("text", "")).strip()
        if not prompt or len(prompt) > 4000:
            return JSONResponse({"ok": False, "message": "write a prompt (at most 4,000 characters)"},
                                status_code=400)
        try:
            tokens = max(1, min(int(data.get("max_new_tokens") or 64), 512))
        except (TypeError, ValueError):
            return JSONResponse({"ok": False, "message": "max new tokens: a whole number"}, status_code=400)
        model = str(runs_index.read_config(path).get("model", ""))
        base = await run_in_threadpool(launcher.generate, model, prompt, tokens)
        tuned = await run_in_threadpool(launcher.generate, str(path), prompt, tokens)
        return JSONResponse({"ok": True, "base": base, "tuned": tuned})

    async def refused(self, request: Request, exc: Refused):
        if request.url.path.startswith("/api/") or "json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": False, "message": exc.reason, "line": None}, status_code=exc.status)
        return Response(exc.reason, status_code=exc.status, media_type="text/plain")


def create_app(root: Path, guard: Guard) -> Starlette:
    site = Site(root, guard)
    routes = [
        Route("/", site.runs_page), Route("/events/runs", site.runs_events),
        Route("/run/{run_id:path}", site.run_page), Route("/events/run", site.run_events),
        Route("/download/adapter", site.adapter_zip),
        Route("/new", site.new_page), Route("/api/config", site.load_config),
        Route("/api/validate", site.validate, methods=["POST"]),
        Route("/api/inspect", site.inspect, methods=["POST"]),
        Route("/api/save", site.save, methods=["POST"]), Route("/api/start", site.start, methods=["POST"]),
        Route("/api/stop", site.stop, methods=["POST"]), Route("/api/resume", site.resume, methods=["POST"]),
        Route("/api/export", site.export, methods=["POST"]),
        Route("/compare", site.compare_page), Route("/api/compare", site.compare, methods=["POST"]),
        Route("/compare/report/{key}", site.compare_report),
        Route("/chat", site.chat_page), Route("/api/chat", site.chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard)],
                     exception_handlers={Refused: site.refused})


def _point(evaluation: dict) -> dict:
    """Eval and retain loss of a before or after evaluation."""
    return {split: (evaluation.get(split) or {}).get("loss") for split in ("eval", "retain")}


def _back(run_id: str, notice: str) -> RedirectResponse:
    return RedirectResponse(f"/run/{run_id}?" + _query(notice=notice), status_code=303)


def _query(**params) -> str:
    from urllib.parse import urlencode

    return urlencode(params, doseq=True)


def _snippet(name: str, options: dict) -> str:
    """A strategies list item with every option at its default, as YAML flow style."""
    import yaml

    shown = {k: v for k, v in options.items() if v is not None}
    text = yaml.safe_dump({name: shown}, default_flow_style=True, width=10_000).strip()
    return f"  - {text[1:-1]}"


def _count(value) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"


def _num(value, digits: int = 4) -> str:
    from tuneforge.formatting import significant

    return "–" if value is None else significant(value, digits)
