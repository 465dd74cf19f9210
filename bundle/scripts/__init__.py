"""CS3F bundle code: one module per stage, wired together by ``configs/inference.json``."""

from . import (  # noqa: F401  (config expressions refer to them as ``scripts.<module>``)
    backbones,
    bank,
    cohort,
    cohort_report,
    command_line,
    data,
    demo,
    distributed,
    engines,
    evaluation,
    geometry,
    handlers,
    inferer,
    input_limits,
    metrics,
    outputs,
    overview,
    phantoms,
    postprocessing,
    registration,
    run_folder,
    run_report,
    scoring,
    token_cache,
    tokenizer,
    transforms,
    values,
    weights,
)


def bundle_root() -> str:
    """The bundle folder (the one holding ``scripts/``), wherever the run starts: ``configs/inference.json``'s
    ``bundle_root``, under which ``models/`` is found."""
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
