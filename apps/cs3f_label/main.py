"""CS3F as a MONAI Label app: zero-shot 3D anomaly detection of a study against the other studies of the datastore.

    monailabel start_server --app apps/cs3f_label --studies /data/studies --conf models cs3f --host 127.0.0.1

Start-up is offline: no model-zoo, SAM or weight downloads. See the "MONAI Label app" section of the README.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict

import monailabel
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.utils.others.class_utils import get_class_names

import lib.configs  # noqa: F401  (imported while MONAI Label has the app folder on sys.path)
import lib.configs.cs3f  # noqa: F401
import lib.engine  # noqa: F401
import lib.infers  # noqa: F401
from lib import http_policy
from lib.engine import CS3FError
from lib.infers.anomaly import IMAGE_ID_KEY, UPLOAD_KEY, CS3FBatchInfer

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
            description="Training-free, zero-shot 3D anomaly detection: each study is scored against the other studies "
            "of the datastore (CS3F bundle).",
            version="1.0",
        )

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

    def init_batch_infer(self):
        return CS3FBatchInfer()

    def _download_dcmqi_tools(self):
        # dcmqi only converts saved labels to DICOM SEG for a DICOMweb datastore; offline, start without it
        try:
            super()._download_dcmqi_tools()
        except Exception as err:
            logger.warning(f"dcmqi tools not available ({err}); labels cannot be saved back as DICOM SEG")

    def _refresh_local(self, datastore) -> None:
        if isinstance(datastore, LocalDatastore) and not isinstance(datastore, DICOMWebDatastore):
            try:
                datastore.refresh()  # studies copied in a moment ago are references too
            except Exception as err:
                logger.warning(f"datastore refresh failed: {err}")

    def infer(self, request: Dict[str, Any], datastore=None):
        datastore = datastore if datastore else self.datastore()
        request = dict(request)
        model = request.get("model")
        image = request.get("image")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; this server has: {', '.join(sorted(self._infers))}"
            )
        tag = request.get("label_tag")
        tag_problem = http_policy.plain_name_problem(tag, "label_tag") if tag is not None else None
        if tag_problem:
            raise HTTPException(status_code=400, detail=tag_problem)
        if request.get(UPLOAD_KEY) is True:  # a file the server's own route received into its private folder
            request[IMAGE_ID_KEY] = "upload"
            request["save_label"] = False  # an upload is not a datastore study: there is nothing to save a label to
        elif isinstance(image, str):
            self._refresh_local(datastore)
            if not image:
                raise HTTPException(status_code=400, detail="no study given: pass ?image=<image id>")
            problem = http_policy.plain_name_problem(image, "image")
            if problem:
                raise HTTPException(status_code=400, detail=problem)
            known = datastore.list_images()
            if image not in known:  # ids only: a path, even one the server can read, is not a study
                shown = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
                raise HTTPException(
                    status_code=404,
                    detail=f"unknown image id {image!r}: the datastore has no such study ({len(known)} studies: {shown})",
                )
            request[IMAGE_ID_KEY] = image
        else:
            raise HTTPException(status_code=400, detail="the study must be given as an image id (?image=<id>)")
        if str(request.get("heatmap", "false")).lower() in ("1", "true", "yes"):
            request["save_label"] = False  # the float heat map is for API clients, never stored as a label
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except CS3FError as err:
            logger.error(f"anomaly {image!r}: {err.message}")
            raise HTTPException(status_code=err.status, detail=err.message) from err
        except Exception as err:
            logger.exception(f"anomaly {image!r} failed")
            raise HTTPException(status_code=500, detail=f"CS3F inference failed: {type(err).__name__}: {err}") from err
