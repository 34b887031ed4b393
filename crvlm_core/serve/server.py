"""``crvlm serve``: an OpenAI-compatible HTTP server (chat completions, SSE streaming, token logprobs) in front of a
model, unsteered and steered by a ``crvlm fit`` artifact or a fitted policy. The entry points live here.

One worker thread owns the model and runs concurrent requests as left-padded micro-batches
(:mod:`~crvlm_core.serve.batcher`); FastAPI + uvicorn handle HTTP (:mod:`~crvlm_core.serve.api`). Model names:
``<spec>`` is the plain model and ``<spec>:steered`` the steered one (:mod:`~crvlm_core.serve.variants`). Decoding is
greedy: ``temperature``, ``top_p`` and ``seed`` are accepted and ignored.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from crvlm_core.core.artifacts import read_manifest
from crvlm_core.serve.api import create_app
from crvlm_core.serve.batcher import ModelServer
from crvlm_core.serve.limits import ServeLimits
from crvlm_core.serve.variants import load_variants

__all__ = ["run_server", "running"]


@contextmanager
def running(model_server: ModelServer, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
            start_timeout: float = 60.0) -> Iterator[str]:
    """Run the HTTP app in a background thread (tests, benchmarks, notebooks); yields its base URL and stops the
    server and the model worker on exit. ``port=None`` picks a free port."""
    import socket

    import uvicorn

    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model_server), host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, name="crvlm-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        model_server.stop()


def run_server(model: str | None = None, artifact: str | Path | None = None, policy: str | Path | None = None,
               host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
               log_level: str = "info", load=None) -> None:
    """Load the model (the artifact's, unless ``model`` is given), build the served variants and run uvicorn until
    interrupted. ``policy`` is a policy YAML whose fitted artifact folder it names (see
    :mod:`crvlm_core.methods.policies.artifact`). ``load(spec) -> handle`` places the model (default
    :func:`~crvlm_core.models.loading.load_model`: a GPU when one is visible)."""
    import uvicorn

    from crvlm_core.models.loading import load_model
    from crvlm_core.models.specs import DEFAULT_MODEL

    if policy is not None:
        if artifact is not None:
            raise ValueError("give --artifact or --policy, not both")
        from crvlm_core.methods.policies.artifact import fitted_artifact

        artifact = fitted_artifact(policy)
    if artifact is not None:  # the model it was fitted on (after checking the folder whole)
        model = model or read_manifest(artifact)["model"]["spec"]
    handle = (load or load_model)(model or DEFAULT_MODEL)
    server = ModelServer(handle, load_variants(handle, artifact), limits)
    print(f"[serve] {handle.spec}: models {sorted(server.variants)} on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level=log_level)
    finally:
        server.stop()
