"""CS3F bundle code: one module per stage, wired together by ``configs/inference.json``."""

from . import (  # noqa: F401  (config expressions refer to them as ``scripts.<module>``)
    backbones,
    cohort,
    demo,
    distributed,
    evaluation,
    inferer,
    metrics,
    outputs,
    overview,
    phantoms,
    postprocessing,
    reporting,
    scoring,
    token_cache,
    tokenizer,
    transforms,
    weights,
    workflow,
)
