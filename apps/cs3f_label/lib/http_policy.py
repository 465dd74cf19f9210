"""What the CS3F server lets a client do: MONAI Label's server, narrowed to a zero-shot inference service.

MONAI Label serves every route to every origin with credentials, trusts any Host header, and takes image ids,
label tags and ``params`` as given, so a web page open in a browser on the same machine can write, delete or
read files anywhere on the host. ``install`` narrows the running FastAPI app, once the app is built:

* **Routes**: an allow-list. Reading the datastore, inference, batch inference, active learning, OHIF and the
  DICOMweb proxy (GET) stay; writing to the datastore (``PUT``/``DELETE``/``POST`` under ``/datastore``, DICOM
  STOW through the proxy) only with ``--conf datastore_write true``; training, model upload and download,
  sessions, logs and reload (a training-free app has no use for them) answer 403 with the reason.
* **Names**: ``image``, ``id``, ``tag`` and ``label`` query parameters must be plain names (no path separators,
  no leading dot, no control characters), everywhere; otherwise 400.
* **Host and origin**: the Host header must name this machine (loopback names and its hostname, or
  ``--conf allowed_hosts``), which stops DNS rebinding; cross-origin requests are allowed only from
  ``--conf cors_origins`` (or MONAI Label's ``MONAI_LABEL_CORS_ORIGINS``), none by default: the OHIF viewer the
  server serves itself is same-origin.
* **Inference**: ``POST /infer/{model}`` is replaced by ``infer_route``: a synchronous handler, so FastAPI runs it
  in its thread pool and ``/info`` and every other request are answered while a study is being scored; it
  parses ``params`` strictly (400), never lets a client name a file, and keeps uploads in a private folder.
* **Errors**: an unexpected exception is a 500 with a one-line message, never a traceback or install paths.

Authentication is MONAI Label's own (``MONAI_LABEL_AUTH_ENABLE`` and the Keycloak realm settings): the routes
keep their role checks, and the replaced inference route checks the same user role. MONAI Label 0.8.5 decodes
tokens without naming the algorithm, which PyJWT 2 (its own requirement) refuses, so every token, valid or
not, answers 401; ``install`` makes it decode RS256, what a Keycloak realm signs with (and only that, so a
token signed with the realm's public key as an HMAC secret is refused too).
"""

# no ``from __future__ import annotations``: FastAPI reads the inference route's annotations at run time

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

logger = logging.getLogger(__name__)

POLICY_KEYS = {
    "datastore_write": "allow clients to add, change and delete datastore images and labels (default false)",
    "allowed_hosts": "comma-separated Host names the server answers besides loopback and this machine's name ('*': any)",
    "cors_origins": "comma-separated origins allowed to call the server from a browser page (default: none)",
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ALWAYS = [
    ("GET", r"/"),
    ("GET", r"/favicon\.ico"),
    ("GET", r"/openapi\.json"),
    ("GET", r"/docs"),
    ("GET", r"/static/.+"),
    ("GET", r"/info/?"),
    ("POST", r"/infer/[^/]+"),
    ("GET", r"/batch/infer/?"),
    ("POST", r"/batch/infer/[^/]+"),
    ("DELETE", r"/batch/infer/?"),
    ("POST", r"/activelearning/[^/]+"),
    ("GET", r"/datastore/?"),
    ("GET", r"/datastore/(image|label)(/info)?"),
    ("GET", r"/datastore/dataset"),
    ("GET", r"/ohif(/.*)?"),
    ("GET", r"/proxy/dicom/.+"),
    ("POST", r"/auth/token"),
    ("GET", r"/auth/?"),
    ("GET", r"/auth/token/valid"),
]
DATASTORE_WRITES = [("PUT", r"/datastore/.+"), ("DELETE", r"/datastore/.+"), ("POST", r"/proxy/dicom/stow/.+")]
NAMED_PARAMETERS = ("image", "id", "tag", "label")
# request keys a client may not set in params: the image comes from ?image= or an upload, the rest is the app's own
RESERVED_PARAMS = ("image", "label", "session", "model", "_image_id")
MAX_PARAMS_BYTES = 64 * 1024
PLAIN_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,255}")


def plain_name_problem(value: Any, what: str) -> str | None:
    """Why ``value`` is not a plain name (an id or tag that can only name something inside the datastore)."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value) or value.startswith("."):
        return (
            f"{what} must be a plain name (no '/', '\\', leading '.' or control characters, at most 255 characters), "
            f"got {value!r}"[:300]
        )
    return None


def _csv(value: Any) -> list[str]:
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def _compile(rules: Iterable[tuple[str, str]]) -> list[tuple[str, re.Pattern[str]]]:
    return [(method, re.compile(pattern)) for method, pattern in rules]


class PolicyMiddleware:
    """ASGI middleware: Host check, route allow-list and plain-name check of the query (see the module docstring)."""

    def __init__(self, app, allowed_hosts: list[str], datastore_write: bool, api_prefix: str = "") -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower() for h in allowed_hosts}
        self.rules = _compile(ALWAYS + (DATASTORE_WRITES if datastore_write else []))
        self.writes = _compile(DATASTORE_WRITES)
        self.prefix = api_prefix.rstrip("/")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflights are the CORS middleware's
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, detail = problem
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def problem(self, scope) -> tuple[int, str] | None:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        name = (
            host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        )
        if not self.any_host and name not in self.hosts:
            return 400, (
                f"Host {host!r} is not served here (DNS rebinding protection); start the server with "
                "--conf allowed_hosts <name> to serve it under that name"
            )
        method, path = scope["method"], scope["path"]
        path = path[len(self.prefix) :] or "/" if self.prefix and path.startswith(self.prefix) else path
        allowed = lambda rules: any(m == method and p.fullmatch(path) for m, p in rules)  # noqa: E731
        if not allowed(self.rules):
            if allowed(self.writes):
                return (
                    403,
                    f"{method} {path}: writing to the datastore is off on this server (start it with --conf datastore_write true)",
                )
            return 403, f"{method} {path} is not available on the CS3F server (a training-free inference service)"
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in NAMED_PARAMETERS and (value or key != "image"):
                why = plain_name_problem(value, key)
                if why:
                    return 400, why
        return None


def parse_params(text: Any) -> dict[str, Any]:
    """The ``params`` form field of an inference request: a JSON object, or a 400 that says what is wrong."""
    from fastapi import HTTPException

    if text is None or text == "":
        return {}
    if not isinstance(text, str) or len(text) > MAX_PARAMS_BYTES:
        raise HTTPException(status_code=400, detail=f"params must be a JSON object of at most {MAX_PARAMS_BYTES} bytes")
    try:
        params = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise HTTPException(status_code=400, detail=f"params is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(params, dict):
        raise HTTPException(status_code=400, detail=f"params must be a JSON object, got {type(params).__name__}")
    reserved = sorted(k for k in params if k in RESERVED_PARAMS or k.startswith("cs3f_"))
    if reserved:
        raise HTTPException(
            status_code=400,
            detail=f"params may not set {reserved}: pass the study as ?image=<id> or upload it as 'file'",
        )
    return params


def make_infer_route(upload_key: str):
    """``POST /infer/{model}`` of the CS3F server (see the module docstring); ``upload_key`` marks an uploaded file's
    path in the request, the only path the app accepts instead of a datastore id."""
    from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
    from monailabel.config import settings
    from monailabel.endpoints.infer import send_response
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.interfaces.utils.app import app_instance

    def infer_route(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),  # noqa: B008 (FastAPI declares form fields and dependencies as defaults)
        file: UploadFile = File(None),  # noqa: B008
        label: UploadFile = File(None),  # noqa: B008
        output: str | None = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),  # noqa: B008
    ):
        instance = app_instance()
        info = instance.info()
        if model not in info.get("models", {}):  # before an upload is stored
            raise HTTPException(
                status_code=404,
                detail=f"unknown model {model!r}; this server has: {', '.join(sorted(info.get('models', {})))}",
            )
        if output not in (None, "image", "json", "all"):
            raise HTTPException(status_code=400, detail=f"output must be one of image, json, all; got {output!r}")
        if session_id or label:
            raise HTTPException(status_code=400, detail="sessions and label uploads are not used by the CS3F server")
        request: dict[str, Any] = {**info.get("config", {}).get("infer", {}), **parse_params(params)}
        request["model"] = model
        folder = None
        if file:
            folder = tempfile.mkdtemp(prefix="cs3f_upload_")  # 0700: private to the server's user
            suffix = "".join(s for s in os.path.basename(file.filename or "").split(".", 1)[1:2])
            path = os.path.join(
                folder, f"upload.{suffix}" if re.fullmatch(r"[A-Za-z0-9.]{1,16}", suffix) else "upload.nii.gz"
            )
            with open(path, "wb") as out:
                shutil.copyfileobj(file.file, out)
            request.update({"image": path, upload_key: True})
        elif image:
            request["image"] = image
        else:
            raise HTTPException(
                status_code=400, detail="no study given: pass ?image=<image id> or upload the image as 'file'"
            )
        try:
            result = instance.infer(request)
            if result is None:
                raise HTTPException(status_code=500, detail="inference returned no result")
            response = send_response(
                instance.datastore(), result, output, background_tasks
            )  # it removes the result file
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)  # no answer, so no background task will run
            raise
        if folder is not None:
            background_tasks.add_task(shutil.rmtree, folder, True)  # once the answer is sent
        return response

    return infer_route


class RS256Tokens:
    """PyJWT as MONAI Label's ``auth`` module calls it, with ``algorithms=["RS256"]`` when the caller names none."""

    def __init__(self, jwt_module) -> None:
        self._jwt = jwt_module

    def __getattr__(self, name: str):
        return getattr(self._jwt, name)

    def decode(self, token, key=None, **kwargs):
        kwargs.setdefault("algorithms", ["RS256"])
        return self._jwt.decode(token, key, **kwargs)


def install(app, conf: dict[str, str], upload_key: str) -> None:
    """Narrow the running MONAI Label FastAPI ``app`` as the module docstring says; takes effect at the next request."""
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from monailabel.config import settings
    from starlette.middleware import Middleware

    datastore_write = str(conf.get("datastore_write", "false")).strip().lower()
    if datastore_write not in ("true", "false"):
        raise ValueError(f"--conf datastore_write must be true or false, got {conf.get('datastore_write')!r}")
    hosts = [*LOOPBACK_HOSTS, socket.gethostname(), socket.getfqdn(), *_csv(conf.get("allowed_hosts"))]
    origins = _csv(conf.get("cors_origins")) or [str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS or []]

    kept = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.user_middleware[:] = [
        Middleware(
            PolicyMiddleware,
            allowed_hosts=hosts,
            datastore_write=datastore_write == "true",
            api_prefix=settings.MONAI_LABEL_API_STR,
        ),
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=bool(origins) and "*" not in origins,
            allow_methods=["*"],
            allow_headers=["*"],
        ),
        *kept,
    ]

    async def unexpected(request, err: Exception):
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(
            status_code=500, content={"detail": f"internal error ({type(err).__name__}); see the server log"}
        )

    app.exception_handlers[Exception] = unexpected
    from monailabel.endpoints.user import auth

    if not isinstance(auth.jwt, RS256Tokens):
        auth.jwt = RS256Tokens(auth.jwt)
    app.router.add_api_route(
        f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}",
        make_infer_route(upload_key),
        methods=["POST"],
        summary="CS3F anomaly inference of a datastore study (or an uploaded image)",
    )
    app.router.routes.insert(0, app.router.routes.pop())  # matched before MONAI Label's own /infer/{model}
    app.openapi_schema = None
    app.middleware_stack = None  # rebuilt with the new middleware at the next request
    logger.info(
        "CS3F server policy: hosts %s, CORS origins %s, datastore writes %s", hosts, origins or "none", datastore_write
    )
