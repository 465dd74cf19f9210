"""The ``anomaly`` infer task: the requested study scored against the other studies of the datastore."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.engine import LABELS, CS3FError, Engine

logger = logging.getLogger(__name__)

# request keys the app sets for the task (not client parameters)
IMAGE_ID_KEY = "cs3f_image_id"
UPLOAD_KEY = "cs3f_uploaded"  # set only by the server's own /infer route, for a file it received (never by a client)


class CS3FAnomaly(InferTask):
    """Zero-shot, training-free anomaly map of one study, relative to the reference cohort in the datastore.

    Result: a uint8 label map on the study's own grid (0 background, 1 ``anomaly``: at or above the cohort's
    operating threshold, exactly the bundle's ``anomaly_mask``; 2 ``strong_anomaly``), or with the request
    parameter ``heatmap: true`` the float32 heat map; and a JSON summary (subject score, rank in the cohort,
    threshold, references, token-cache use).
    """

    def __init__(self, engine: Engine, datastore: Callable[[], Any], description: Optional[str] = None) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(LABELS),
            dimension=3,
            description=description
            or "CS3F zero-shot anomaly detection (no training): this study scored against the other studies of the "
            "datastore. 1 = anomaly (at or above the cohort threshold), 2 = strong anomaly.",
            config={},
        )
        self.engine = engine
        self._datastore = datastore

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict[str, Any]]:
        image = request.get("image")
        if not isinstance(image, str):
            raise CS3FError(400, "the anomaly task needs a study id or an image file, not an in-memory array")
        image_id = str(request.get(IMAGE_ID_KEY) or request.get("_image_id") or image)
        return self.engine.infer(self._datastore(), image_id, image, request)


class CS3FBatchInfer(BatchInferTask):
    """MONAI Label's batch inference, with each study's failure reported instead of ending the batch.

    The cohort scores are memoised by the engine, so a batch over N studies scores the cohort once.
    """

    def __call__(self, request, datastore, infer: Callable):
        import torch

        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False}  # MONAI Label 0.8.5 divides by the GPU count otherwise

        def safe_infer(req, ds):
            try:
                return infer(req, ds)
            except Exception as err:  # one bad study must not lose the others' results
                status = getattr(err, "status_code", getattr(err, "status", 500))
                message = getattr(err, "detail", None) or getattr(err, "message", None) or str(err)
                logger.error("batch: %s failed (%s): %s", req.get("image"), status, message)
                return {"error": message, "status": status}

        return super().__call__(request, datastore, safe_infer)
