"""`tuneforge ui`: a local web page over a runs root to start runs, watch them learn and forget, and
compare them (`tuneforge.ui.app`); the security rules are in `tuneforge.ui.security`."""

from __future__ import annotations

from pathlib import Path


def serve(runs: Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page until Ctrl-C. Runs it started keep running after it stops."""
    import uvicorn

    from tuneforge.ui.app import create_app
    from tuneforge.ui.security import Guard

    guard = Guard.for_host(host)
    app = create_app(runs, guard)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={guard.token}" if guard.token else "")
    print(f"tuneforge ui: serving {Path(runs).resolve()} at {url}", flush=True)
    if guard.token:
        print("tuneforge ui: bound beyond this machine: every request needs the token above", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
