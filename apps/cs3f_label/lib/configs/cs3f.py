"""Task config ``cs3f`` (``--conf models cs3f``): the bundle-backed engine and its ``anomaly`` infer task."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.engine import Engine
from lib.infers.anomaly import CS3FAnomaly

logger = logging.getLogger(__name__)


class CS3F(TaskConfig):
    """CS3F needs no training and no model file: the "model" is the bundle config plus a frozen 2D backbone."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.engine = Engine(
            kwargs["app_dir"], kwargs["studies"], conf, local_datastore=kwargs.get("local_datastore", True)
        )
        self.datastore = kwargs["datastore"]
        logger.info(self.engine.describe())
        self.engine.startup_check()

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        return {"anomaly": CS3FAnomaly(self.engine, self.datastore)}

    def trainer(self) -> Optional[TrainTask]:
        return None
