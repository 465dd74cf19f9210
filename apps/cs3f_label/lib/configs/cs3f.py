"""Task config ``cs3f`` (``--conf models cs3f``): the bundle-backed engine, its ``anomaly`` infer task and its
"most anomalous first" strategy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning import MostAnomalousFirst
from lib.engine import Engine
from lib.infers.anomaly import CS3FAnomaly
from lib.references import kinds_of_dicomweb, kinds_of_local

logger = logging.getLogger(__name__)


def study_kinds(studies: str):
    """How the kind of each study is read: DICOM metadata from a DICOMweb server, sidecars in a local folder."""

    def kinds(datastore: Any, image_ids: list[str]) -> dict[str, tuple[str, ...]]:
        client = getattr(datastore, "_client", None)  # MONAI Label's DICOMweb datastore keeps its client there
        if client is not None and hasattr(client, "search_for_series"):
            return kinds_of_dicomweb(client, getattr(datastore, "_search_filter", None))
        return kinds_of_local(Path(studies), image_ids)

    return kinds


class CS3F(TaskConfig):
    """CS3F needs no training and no model file: the "model" is the bundle config plus a frozen 2D backbone."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.engine = Engine(
            kwargs["app_dir"],
            kwargs["studies"],
            conf,
            local_datastore=kwargs.get("local_datastore", True),
            kinds=study_kinds(kwargs["studies"]),
        )
        self.datastore = kwargs["datastore"]
        logger.info(self.engine.describe())
        self.engine.config.startup_check()

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        return {"anomaly": CS3FAnomaly(self.engine, self.datastore)}

    def strategy(self) -> Union[None, Strategy, Dict[str, Strategy]]:
        return {"most_anomalous": MostAnomalousFirst(self.engine)}

    def trainer(self) -> Optional[TrainTask]:
        return None
