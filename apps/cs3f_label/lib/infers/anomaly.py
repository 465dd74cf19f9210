"""The ``anomaly`` infer task: a MONAI Label ``BasicInferTask`` made of the bundle's own components.

``BasicInferTask`` runs pre-transforms, the inferer, the post-transforms and MONAI Label's writer. For CS3F:

* pre-transforms: the study as the bundle's encoding pass left it (``RestoreStudyd``): the geometry its preprocessing
  recorded (``scripts.geometry``), so the study is never preprocessed twice, and only read or encoded when the
  token cache does not have it;
* inferer: the bundle's cohort inferer, scoring the study's tokens against the bank of its references;
* post-transforms: the bundle's postprocessing (token scores to voxels, ``Invertd`` to the study's own grid, the
  foreground mask, the operating threshold, the subject's score), then the label map the viewers show
  (``AnomalyLabelsd``: 1 ``anomaly``, 2 ``strong_anomaly``) or, with ``heatmap``, the float heat map;
* writer: MONAI Label's (NIfTI, NRRD or MHA, the requested dtype).

What a cohort method adds (the references and their bank) is the engine's (``lib/engine.py``); an unchanged request
is answered from its stored answer (``lib/stored_answers.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from monai.transforms import MapTransform, Transform
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.engine import LABELS, Engine
from lib.request import CS3FError, Request

logger = logging.getLogger(__name__)

# request keys the app sets for the task (not client parameters)
IMAGE_ID_KEY = "cs3f_image_id"
UPLOAD_KEY = "cs3f_uploaded"  # set only by the server's own /infer route, for a file it received (never by a client)


class RestoreStudyd(Transform):
    """The study as the encoding pass left it: its geometry (for ``Invertd``), id and path, from ``request``."""

    def __init__(self, request: Request, writing_input: Callable) -> None:
        self.request = request
        self.writing_input = writing_input

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        query = self.request.query
        return {
            **data,
            **self.writing_input(query.entry["geometry"]),
            "subject": query.subject["subject"],
            "source": query.subject["image"],
        }


class AnomalyLabelsd(MapTransform):
    """``pred`` for MONAI Label's writer: the label map of ``keys`` at ``levels`` (0 background, 1 ``anomaly`` at
    or above the operating threshold, exactly the bundle's ``anomaly_mask``, 2 ``strong_anomaly``), or the float heat
    map with ``heatmap``; and the JSON answer under ``result``."""

    def __init__(self, keys: str, levels: Mapping[str, float], heatmap: bool, answer: Callable[[dict], dict]) -> None:
        super().__init__(keys)
        self.levels = dict(levels)
        self.heatmap = heatmap
        self.answer = answer

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        heat = d[self.keys[0]]
        values = heat.as_tensor()[0].numpy().astype(np.float32)
        if self.heatmap:
            d["pred"] = values
        else:
            flagged = d["anomaly_mask"].as_tensor()[0].numpy() > 0  # the bundle's mask: class 1 and up
            d["pred"] = flagged.astype(np.uint8) + (flagged & (values >= self.levels["strong_anomaly"])).astype(
                np.uint8
            )
        d["pred_meta_dict"] = {"affine": np.asarray(heat.affine, dtype=np.float64)}
        d["result"] = self.answer(d)
        return d


class CS3FAnomaly(BasicInferTask):
    """Zero-shot, training-free anomaly map of one study, against the studies of the same kind in the datastore.

    Result: a uint8 label map on the study's own grid (0 background, 1 ``anomaly``, 2 ``strong_anomaly``), or with the
    request parameter ``heatmap: true`` the float32 heat map; and a JSON summary (subject score, rank among the
    references, threshold, references, token cache and bank use).
    """

    def __init__(self, engine: Engine, datastore: Callable[[], Any], description: Optional[str] = None) -> None:
        super().__init__(
            path=None,
            network=None,
            type=InferType.SEGMENTATION,
            labels=dict(LABELS),
            dimension=3,
            description=description
            or "CS3F zero-shot anomaly detection (no training): this study scored against the studies of the same kind in "
            "the datastore. 1 = anomaly (at or above the references' threshold), 2 = strong anomaly.",
            input_key="image",
            output_label_key="pred",
            output_json_key="result",
            config={},
        )
        self.engine = engine
        self._datastore = datastore
        self._request: Request | None = None
        self._token_scores: Any = None

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Dict[str, Any], callbacks=None) -> Tuple[Union[str, None], Dict[str, Any]]:
        image = request.get("image")
        if not isinstance(image, str):
            raise CS3FError(400, "the anomaly task needs a study id or an image file, not an in-memory array")
        image_id = str(request.get(IMAGE_ID_KEY) or request.get("_image_id") or image)
        with self.engine.lock:
            resolved = self.engine.request(self._datastore(), image_id, image, request)
            stored = self.engine.answers.get(resolved.key, resolved.extension)
            if stored is not None:
                return stored
            self._request = self.engine.prepare(resolved)
            try:
                options = {
                    "result_extension": resolved.extension,
                    "result_dtype": resolved.dtype,
                    "result_compress": resolved.compress,
                }
                result_file, params = super().__call__({**request, **options}, callbacks)
            finally:
                self._request = None
            self.engine.answers.put(resolved.key, resolved.extension, result_file, params)
            return result_file, params

    # ------------------------------------------------------------------ the BasicInferTask stages
    def pre_transforms(self, data=None):
        return [RestoreStudyd(self._request, self.engine.scripts.geometry.writing_input)]

    def inferer(self, data=None):
        return self.engine.evaluator.inferer

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda") -> Dict[str, Any]:
        """The study's tokens against the bank of its references: token scores under ``anomaly``."""
        self._token_scores = self.engine.token_scores(self._request)
        data["anomaly"] = self._token_scores[None]
        data["threshold"] = self.engine.levels(self._request)["anomaly"]
        data["heat_scale"] = self.engine.statistics(self._request)["max"]
        return data

    def inverse_transforms(self, data=None):
        return None  # the bundle's postprocessing maps back to the study's grid itself (Invertd)

    def post_transforms(self, data=None):
        postprocessing = self.engine.scripts.postprocessing.in_memory(self.engine.evaluator.postprocessing)
        return [
            *postprocessing.transforms,
            AnomalyLabelsd("anomaly", self.engine.levels(self._request), self._request.heatmap, self._answer),
        ]

    def _answer(self, data: Dict[str, Any]) -> Dict[str, Any]:
        row = {"subject_score": data["subject_score"], "lesion_volume_ml": data["lesion_volume_ml"]}
        answer = self.engine.summary(self._request, self.engine.token_score(self._token_scores), row)
        if not self._request.heatmap:
            answer["label_names"] = dict(LABELS)
        return answer


class CS3FBatchInfer(BatchInferTask):
    """MONAI Label's batch inference, with each study's failure reported instead of ending the batch.

    The banks and every study's tokens are kept by the engine, so a batch encodes each study once.
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
