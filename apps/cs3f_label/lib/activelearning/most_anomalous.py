"""The "most anomalous first" strategy: Slicer's and OHIF's "Next Sample" opens the study CS3F ranks highest.

A zero-shot anomaly detector already ranks every study, so the natural next study to look at (and label) is the
one that differs most from the studies of its kind. The ranking statistic is the mean of a study's highest token
scores against its references (the ``token_score`` of the anomaly task); studies not encoded yet are encoded
first, once (their tokens are cached), so the first call on a new datastore takes as long as encoding it.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.engine import Engine

logger = logging.getLogger(__name__)


class MostAnomalousFirst(Strategy):
    """The unlabelled study with the highest CS3F token score."""

    def __init__(self, engine: Engine) -> None:
        super().__init__("Most anomalous first: the unlabelled study CS3F ranks highest against studies of its kind")
        self.engine = engine

    def __call__(self, request: dict[str, Any], datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        with self.engine.lock:
            scores = self.engine.anomaly_ranking(datastore, sorted(images))
        if not scores:
            logger.info("most anomalous first: no unlabelled study could be scored")
            return None
        image = max(scores, key=lambda i: (scores[i], i))
        logger.info("most anomalous first: %s (token score %.4g of %d studies)", image, scores[image], len(scores))
        return {"id": image, "cs3f_token_score": scores[image]}
