"""CS3F as a MONAI Label app: zero-shot 3D anomaly detection of a study against the other studies of the datastore.

    monailabel start_server --app apps/cs3f_label --studies /data/studies --conf models cs3f --host 127.0.0.1

Start-up is offline: no model-zoo, SAM or weight downloads. See the "MONAI Label app" section of the README.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict

import monailabel
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.utils.others.class_utils import get_class_names

import lib.configs  # noqa: F401  (imported while MONAI Label has the app folder on sys.path)
import lib.configs.cs3f  # noqa: F401
import lib.engine  # noqa: F401
import lib.infers  # noqa: F401
from lib import http_policy
from lib.dicomweb import CS3FDICOMWebDatastore
from lib.infers.anomaly import IMAGE_ID_KEY, UPLOAD_KEY, CS3FBatchInfer
from lib.request import CS3FError

logger = logging.getLogger(__name__)


class CS3FApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.model_dir = os.path.join(app_dir, "model")
        configs = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        wanted = [m.strip() for m in (conf.get("models") or "all").split(",") if m.strip()]
        invalid = [m for m in wanted if m != "all" and m not in configs]
        if invalid:
            raise ValueError(f"--conf models: unknown {invalid}; available: all, {', '.join(sorted(configs))}")
        self.studies_arg = studies
        # dcmqi's itkimage2segimage (a pip package's script, beside this Python) turns saved labels into DICOM SEG for
        # a DICOMweb datastore; MONAI Label finds it on PATH instead of downloading it
        scripts_dir = os.path.dirname(sys.executable)
        if scripts_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([scripts_dir, os.environ.get("PATH", "")])
        self.refresh_s = float(conf.get("refresh_s", 60))
        self._listed_at = -float("inf")
        server = sys.modules.get("monailabel.app")  # loaded when serving; absent in batch subprocesses and scripts
        if server is not None:
            http_policy.install(server.app, conf, UPLOAD_KEY)
        self.task_configs: Dict[str, TaskConfig] = {}
        for name, path in sorted(configs.items()):
            if "all" in wanted or name in wanted:
                module, cls = path.rsplit(".", 1)
                self.task_configs[name] = getattr(__import__(module, fromlist=[cls]), cls)()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"CS3F zero-shot anomaly detection (MONAI Label {monailabel.__version__})",
            description="Training-free, zero-shot 3D anomaly detection: each study is scored against the studies of "
            "the same kind in the datastore (CS3F bundle).",
            version="1.0",
        )

    def init_datastore(self):
        datastore = super().init_datastore()
        if type(datastore) is DICOMWebDatastore:  # the same datastore, saying why a label cannot be stored
            datastore.__class__ = CS3FDICOMWebDatastore
        return datastore

    def init_infers(self) -> Dict[str, InferTask]:
        remote = self.studies_arg.startswith(("http://", "https://"))
        infers: Dict[str, InferTask] = {}
        for name, config in self.task_configs.items():
            config.init(
                name,
                self.model_dir,
                self.conf,
                None,
                app_dir=self.app_dir,
                studies=self.studies_arg,
                datastore=self.datastore,
                local_datastore=not remote and not settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
            tasks = config.infer()
            for key, task in (tasks if isinstance(tasks, dict) else {name: tasks}).items():
                logger.info(f"+++ Adding Inferer:: {key} => {task}")
                infers[key] = task
        return infers

    def init_strategies(self) -> Dict[str, Strategy]:
        strategies: Dict[str, Strategy] = {}
        for config in self.task_configs.values():
            found = config.strategy()
            strategies.update(found if isinstance(found, dict) else {config.name: found} if found else {})
        return strategies

    def init_batch_infer(self):
        return CS3FBatchInfer()

    def _refresh(self, datastore) -> None:
        """Studies added a moment ago are seen: a local folder is read again; a DICOMweb server's series list is
        searched again once it is older than ``refresh_s`` (MONAI Label keeps it for
        MONAI_LABEL_DICOMWEB_CACHE_EXPIRY, two hours by default)."""
        try:
            if isinstance(datastore, DICOMWebDatastore):
                now = time.monotonic()
                if now - self._listed_at > self.refresh_s:
                    DICOMWebDatastore.list_images.cache_clear()
                    DICOMWebDatastore.get_labeled_images.cache_clear()
                    self._listed_at = now
            elif isinstance(datastore, LocalDatastore):
                datastore.refresh()
        except Exception as err:
            logger.warning(f"datastore refresh failed: {err}")

    def next_sample(self, request):
        self._refresh(self.datastore())
        return super().next_sample(request)

    def infer(self, request: Dict[str, Any], datastore=None):
        datastore = datastore if datastore else self.datastore()
        request = self._checked(dict(request), datastore)
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except CS3FError as err:
            logger.error(f"anomaly {request.get('image')!r}: {err.message}")
            raise HTTPException(status_code=err.status, detail=err.message) from err
        except Exception as err:
            logger.exception(f"anomaly {request.get('image')!r} failed")
            raise HTTPException(status_code=500, detail=f"CS3F inference failed: {type(err).__name__}: {err}") from err

    def _checked(self, request: Dict[str, Any], datastore) -> Dict[str, Any]:
        """The request with its study named by a datastore id (or the server's own upload), or an HTTP error."""
        model, image, tag = request.get("model"), request.get("image"), request.get("label_tag")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; this server has: {', '.join(sorted(self._infers))}"
            )
        problem = http_policy.plain_name_problem(tag, "label_tag") if tag is not None else None
        if request.get(UPLOAD_KEY) is True:  # a file the server's own route received into its private folder
            request[IMAGE_ID_KEY] = "upload"
            request["save_label"] = False  # an upload is not a datastore study: there is nothing to save a label to
        elif not isinstance(image, str):
            problem = problem or "the study must be given as an image id (?image=<id>)"
        elif not image:
            problem = problem or "no study given: pass ?image=<image id>"
        else:
            problem = problem or http_policy.plain_name_problem(image, "image")
            request[IMAGE_ID_KEY] = image
        if problem:
            raise HTTPException(status_code=400, detail=problem)
        if request.get(UPLOAD_KEY) is not True:
            self._refresh(datastore)
            known = datastore.list_images()
            if image not in known:  # ids only: a path, even one the server can read, is not a study
                shown = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
                raise HTTPException(
                    status_code=404,
                    detail=f"unknown image id {image!r}: the datastore has no such study ({len(known)} studies: {shown})",
                )
        if str(request.get("heatmap", "false")).lower() in ("1", "true", "yes"):
            request["save_label"] = False  # the float heat map is for API clients, never stored as a label
        return request
