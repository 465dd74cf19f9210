"""A real `monailabel start_server` of apps/cs3f_label on loopback, for the tests that talk to it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder  # a monailabel dependency

from helpers import TINY_VIT_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "cs3f_label"
# the tests' tiny random ViT as command-line values; JSON without spaces because the `monailabel` launcher
# script re-splits its arguments on spaces
TINY_VIT = {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in TINY_VIT_SETTINGS.items()}
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(proc: subprocess.Popen, url: str, timeout_s: float, name: str, tail) -> float:
    """Seconds until ``url`` answers 200; the test fails with the log's ``tail()`` if ``proc`` exits or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{tail()}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return time.monotonic() - start
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{name} did not answer {url} within {timeout_s} s:\n{tail()}")


def launcher() -> list[str]:
    script = Path(sys.executable).parent / "monailabel"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "monailabel.main"]


class Server:
    """A `monailabel start_server` subprocess in its own process group, stopped by its PID."""

    def __init__(self, studies: Path, conf: dict[str, str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [*launcher(), "start_server", "--app", str(APP), "--studies", str(studies), "--conf", "models", "cs3f"]
        for key, value in conf.items():
            args += ["--conf", key, value]
        args += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONAILABEL_PYEXE": sys.executable, **(env or {})}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self) -> float:
        return wait_until_answers(self.proc, f"{self.url}/info/", START_TIMEOUT_S, "monailabel", self.tail)

    def answers(self) -> bool:
        """Whether the server answers HTTP at all (with authentication on, /info answers 401)."""
        try:
            requests.get(f"{self.url}/info/", timeout=5)
            return True
        except requests.ConnectionError:
            return False

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own group: batch-infer children go too
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def infer(self, image: str, params: dict | None = None, output: str = "all") -> requests.Response:
        return requests.post(
            f"{self.url}/infer/anomaly",
            params={"image": image, "output": output},
            files={"params": (None, json.dumps(params or {}))},
            timeout=REQUEST_TIMEOUT_S,
        )


def multipart(response: requests.Response, tmp: Path, name: str) -> tuple[Path, dict]:
    """The result image and JSON of a default (multipart) /infer answer."""
    assert response.status_code == 200, response.text[:2000]
    image, params = None, None
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            image = tmp / name
            image.write_bytes(part.content)
    assert image is not None and params is not None
    return image, params
