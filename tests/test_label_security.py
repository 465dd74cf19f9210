"""The MONAI Label server under hostile and careless requests, on loopback (issue 11, "Server").

Every probe here broke the server before it got its HTTP policy (apps/cs3f_label/lib/http_policy.py): files
written, deleted and read outside the studies folder, a server deaf while it scores, bare 500s and tracebacks.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("monailabel", reason="monailabel is not installed (pip install -r requirements.txt)")
from label_server import REQUEST_TIMEOUT_S, TINY_VIT, Server, multipart  # noqa: E402

from scripts.phantoms import make_phantom_cohort  # noqa: E402

STUDIES = ["sub-01", "sub-02", "sub-03", "sub-04"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("label_security")
    records = make_phantom_cohort(
        root / "phantoms", n_subjects=5, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3
    )
    studies = root / "studies"
    studies.mkdir()
    for rec in records[:4]:
        (studies / f"{rec['subject']}.nii.gz").write_bytes(Path(rec["image"]).read_bytes())
    (root / "tmp").mkdir()  # the server's TMPDIR: what it leaves behind is seen here
    return {"root": root, "studies": studies, "outside": records[4]["image"], "tmp": root / "tmp"}


def start(cohort, name: str, conf: dict[str, str] | None = None, env: dict[str, str] | None = None) -> Server:
    srv = Server(
        cohort["studies"],
        {**TINY_VIT, "cache_dir": "none", **(conf or {})},
        cohort["root"] / f"{name}.log",
        env={"TMPDIR": str(cohort["tmp"]), **(env or {})},
    )
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def server(cohort):
    srv = start(cohort, "server")
    yield srv
    srv.stop()


def outside_files(cohort) -> set[str]:
    """Everything in the test's folder outside the studies folder and the server's own temporaries."""
    root = cohort["root"]
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if cohort["studies"] not in p.parents and p != cohort["studies"] and cohort["tmp"] not in p.parents
    }


def test_no_file_is_written_or_deleted_outside_the_studies_folder(server, cohort, tmp_path):
    before = outside_files(cohort)
    payload = tmp_path / "payload"
    payload.write_bytes(b"x")
    url = server.url
    put = requests.put(
        f"{url}/datastore/image",
        params={"image": "../written_outside"},
        files={"file": ("noext", payload.read_bytes())},
        timeout=30,
    )
    assert put.status_code == 403 and "datastore_write" in put.json()["detail"]
    delete = requests.delete(f"{url}/datastore/image", params={"id": "../server.log"}, timeout=30)
    assert delete.status_code == 403
    label = requests.put(
        f"{url}/datastore/label",
        params={"image": "sub-01", "tag": "../../label_outside"},
        files={"label": ("l.nii.gz", payload.read_bytes())},
        timeout=30,
    )
    assert label.status_code == 403
    saved = server.infer("sub-01", {"save_label": True, "label_tag": "../.."})
    assert saved.status_code == 400 and "label_tag must be a plain name" in saved.json()["detail"]
    read = requests.get(f"{url}/datastore/image", params={"image": "../../../etc/passwd"}, timeout=30)
    assert read.status_code == 400 and "image must be a plain name" in read.json()["detail"]
    assert outside_files(cohort) == before and (cohort["root"] / "server.log").is_file()


def test_datastore_writes_when_asked_for_still_stay_inside(cohort, tmp_path):
    srv = start(cohort, "writable", {"datastore_write": "true"})
    try:
        image = Path(cohort["outside"]).read_bytes()
        bad = requests.put(
            f"{srv.url}/datastore/image",
            params={"image": "../written_outside"},
            files={"file": ("a.nii.gz", image)},
            timeout=30,
        )
        assert bad.status_code == 400 and "plain name" in bad.json()["detail"]
        good = requests.put(
            f"{srv.url}/datastore/image", params={"image": "sub-09"}, files={"file": ("a.nii.gz", image)}, timeout=30
        )
        assert good.status_code == 200, good.text[:500]
        assert "sub-09" in requests.get(f"{srv.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        tag = requests.put(
            f"{srv.url}/datastore/label",
            params={"image": "sub-09", "tag": "../../x"},
            files={"label": ("l.nii.gz", image)},
            timeout=30,
        )
        assert tag.status_code == 400
        assert requests.delete(f"{srv.url}/datastore/image", params={"id": "sub-09"}, timeout=30).status_code == 200
    finally:
        srv.stop()
    assert not (cohort["root"] / "written_outside.nii.gz").exists() and not list(cohort["root"].glob("x*"))


def test_infer_takes_datastore_ids_or_an_upload_never_a_path(server, cohort):
    for image in (cohort["outside"], "/etc/shadow", "/no/such/file.nii.gz"):
        answer = server.infer(image)
        assert answer.status_code == 400, answer.text[:500]  # the same answer whether the path exists or not
        assert "image must be a plain name" in answer.json()["detail"]
    via_params = server.infer("sub-01", {"image": cohort["outside"]})
    assert via_params.status_code == 400 and "params may not set ['image']" in via_params.json()["detail"]
    upload = requests.post(
        f"{server.url}/infer/anomaly",
        params={"output": "json"},
        files={"file": ("study.nii.gz", Path(cohort["outside"]).read_bytes()), "params": (None, "{}")},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert upload.status_code == 200, upload.text[:1000]
    assert upload.json()["subject"] == "upload" and sorted(upload.json()["references"]) == STUDIES
    broken = requests.post(
        f"{server.url}/infer/anomaly",
        params={"output": "json"},
        files={"file": ("study.nii.gz", b"not an image"), "params": (None, "{}")},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert broken.status_code == 422, broken.text[:500]  # unreadable upload: a client error, and its folder goes too
    for _ in range(50):  # the upload is removed by a background task once the answer is sent
        if not [p for p in cohort["tmp"].rglob("*") if "upload" in p.name]:
            break
        time.sleep(0.1)
    assert not [p for p in cohort["tmp"].rglob("*") if "upload" in p.name]


def test_bad_requests_are_client_errors_with_a_message(server, cohort):
    url = f"{server.url}/infer/anomaly"
    for params, expected in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object, got list"),
        ('"text"', "got str"),
        ("null", "got NoneType"),
        ("[" * 100000 + "]" * 100000, ""),
    ]:
        answer = requests.post(url, params={"image": "sub-01"}, files={"params": (None, params)}, timeout=60)
        assert answer.status_code == 400 and expected in answer.json()["detail"], (params[:20], answer.text[:300])
    missing = requests.post(url, files={"params": (None, "{}")}, timeout=30)
    assert missing.status_code == 400 and "no study given" in missing.json()["detail"]
    unknown = requests.post(f"{server.url}/infer/segmentation", params={"image": "sub-01"}, timeout=30)
    assert unknown.status_code == 404 and "unknown model 'segmentation'" in unknown.json()["detail"]
    leftovers = set(cohort["tmp"].rglob("*"))
    dtype = server.infer("sub-01", {"result_dtype": "object"})
    assert dtype.status_code == 400 and "result_dtype must be one of" in dtype.json()["detail"]
    assert set(cohort["tmp"].rglob("*")) == leftovers  # no empty result file left behind
    for method, path in [
        ("POST", "/train/anomaly"),
        ("GET", "/train/"),
        ("GET", "/logs/"),
        ("POST", "/session/"),
        ("GET", "/model/anomaly"),
        ("POST", "/reload"),
    ]:
        answer = requests.request(method, f"{server.url}{path}", timeout=30)
        assert answer.status_code == 403 and "not available on the CS3F server" in answer.json()["detail"], path
        assert "site-packages" not in answer.text and "Traceback" not in answer.text


def test_host_header_and_origins_are_checked(server):
    rebound = requests.get(f"{server.url}/info/", headers={"Host": "attacker.example"}, timeout=30)
    assert rebound.status_code == 400 and "not served here" in rebound.json()["detail"]
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert requests.get(f"{server.url}/info/", headers={"Host": host}, timeout=30).status_code == 200
    page = {"Origin": "http://attacker.example"}
    answer = requests.get(f"{server.url}/info/", headers=page, timeout=30)
    assert "access-control-allow-origin" not in {k.lower() for k in answer.headers}
    preflight = requests.options(
        f"{server.url}/infer/anomaly", timeout=30, headers={**page, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in {k.lower() for k in preflight.headers}


def test_the_server_answers_while_a_study_is_scored(cohort):
    srv = start(cohort, "busy", {"grid_size": "128"})  # several seconds per request on 2 cores: long enough to probe
    try:
        answer = {}
        worker = threading.Thread(target=lambda: answer.update(r=srv.infer("sub-02", output="json")))
        worker.start()
        time.sleep(0.3)
        latencies = []  # of the /info requests answered while the inference was still running
        while worker.is_alive() and len(latencies) < 20:
            tick = time.monotonic()
            assert requests.get(f"{srv.url}/info/", timeout=30).status_code == 200
            if worker.is_alive():
                latencies.append(time.monotonic() - tick)
            time.sleep(0.1)
        worker.join(timeout=REQUEST_TIMEOUT_S)
        assert answer["r"].status_code == 200, answer["r"].text[:1000]
        assert len(latencies) >= 3, f"the inference ended before /info could be probed during it: {latencies}"
        assert max(latencies) < 1.0, latencies
    finally:
        srv.stop()


def test_a_nan_strong_factor_stops_the_server_at_start(cohort):
    srv = Server(cohort["studies"], {**TINY_VIT, "strong_factor": "nan"}, cohort["root"] / "nan.log")
    try:
        srv.proc.wait(timeout=120)
    finally:
        srv.stop()
    assert srv.proc.returncode != 0 and "strong_factor must be a finite number" in srv.tail()


class Realm(BaseHTTPRequestHandler):
    """A Keycloak realm as MONAI Label reads it: its public key at the realm URI."""

    public_key = ""

    def do_GET(self):  # noqa: N802
        body = json.dumps({"realm": "cs3f", "public_key": self.public_key}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_monai_label_authentication_guards_every_route(cohort):
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    Realm.public_key = base64.b64encode(der).decode()
    realm = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    threading.Thread(target=realm.serve_forever, daemon=True).start()
    env = {
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": f"http://127.0.0.1:{realm.server_port}/realms/cs3f",
    }
    srv = Server(cohort["studies"], {**TINY_VIT, "cache_dir": "none"}, cohort["root"] / "auth.log", env=env)
    try:
        for _ in range(240):
            if srv.proc.poll() is not None or srv.answers():
                break
            time.sleep(0.5)
        assert srv.answers(), srv.tail()

        def token(roles):
            claims = {"preferred_username": "reader", "realm_access": {"roles": roles}, "exp": int(time.time()) + 600}
            return {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='RS256')}"}

        assert requests.get(f"{srv.url}/info/", timeout=30).status_code == 401
        assert requests.get(f"{srv.url}/info/", headers=token(["monailabel-user"]), timeout=30).status_code == 200
        forged = requests.get(
            f"{srv.url}/info/",
            timeout=30,
            headers={
                "Authorization": "Bearer "
                + jwt.encode({"realm_access": {"roles": ["monailabel-user"]}}, "guess", algorithm="HS256")
            },
        )
        assert forged.status_code == 401
        url = f"{srv.url}/infer/anomaly"
        assert requests.post(url, params={"image": "sub-01"}, timeout=30).status_code == 401
        no_role = requests.post(url, params={"image": "sub-01"}, headers=token(["other"]), timeout=30)
        assert no_role.status_code == 403
        allowed = requests.post(
            url,
            params={"image": "sub-01", "output": "all"},
            headers=token(["monailabel-user"]),
            timeout=REQUEST_TIMEOUT_S,
        )
        multipart(allowed, cohort["root"], "auth.nii.gz")
    finally:
        srv.stop()
        realm.shutdown()
