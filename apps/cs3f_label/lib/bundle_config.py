"""The CS3F bundle as the app runs it: ``bundle/configs/inference.json``, presets and ``--conf`` overrides, read with
MONAI's ``ConfigParser``. One source of truth for every default: the app adds only the keys it owns (``APP_KEYS``)
and refuses any other key the bundle does not have, at start-up."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lib.http_policy import POLICY_KEYS

logger = logging.getLogger(__name__)

# --conf keys that belong to the app; every other key must be a key of the bundle config.
APP_KEYS = {
    "models": "which lib/configs to load (default: all, i.e. cs3f)",
    "preset": "comma-separated JSON/YAML files merged over bundle/configs/inference.json (e.g. configs/ct.json)",
    "bundle_dir": "the CS3F bundle folder (default: <repo>/bundle, found relative to this app)",
    "cache_dir": "token cache, banks and stored answers ('none' disables them; default <studies>/.cs3f_cache, or "
    "<app>/model/cs3f_cache)",
    "reference": "reference studies: 'auto' (same modality and series description), 'all', or comma-separated glob "
    "patterns over image ids (default: auto)",
    "min_reference": "minimum number of usable reference studies (default 2)",
    "strong_factor": "class 2 level = median + strong_factor x (threshold - median) of the references' token scores "
    "(default 2)",
    "refresh_s": "how often the datastore's list of studies and their kinds are read again, in seconds (default 60)",
    **POLICY_KEYS,
}
# MONAI Label's own conf keys that may reach the app; accepted silently.
MONAI_LABEL_KEYS = {"server_mode", "auth_token", "preload", "skip_scoring", "skip_strategies", "skip_trainers"}
# bundle keys the app owns: it runs requests, not a cohort folder, and answers over HTTP
FORCED = {"progress": False, "write_overview": False, "overwrite": True, "distributed": False}


def parse_value(text: Any) -> Any:
    """A ``--conf`` value: JSON when it parses (numbers, booleans, null, lists, objects), else the plain string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def default_bundle_dir(app_dir: str | os.PathLike) -> Path:
    """``<repo>/bundle`` for an app at ``<repo>/apps/cs3f_label``."""
    return Path(app_dir).resolve().parents[1] / "bundle"


def import_bundle(bundle_dir: Path):
    """Make the bundle's ``scripts`` package importable (as ``monai.bundle run`` does) and import it."""
    config = bundle_dir / "configs" / "inference.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"CS3F bundle not found: {config} does not exist. Run the app from the CS3F repository "
            "(apps/cs3f_label next to bundle/) or pass --conf bundle_dir /path/to/bundle."
        )
    if str(bundle_dir) not in sys.path:
        sys.path.insert(0, str(bundle_dir))
    import scripts  # noqa: F401  (the bundle's own package)

    loaded = Path(scripts.__file__).resolve().parent
    if loaded != (bundle_dir / "scripts").resolve():
        raise ImportError(
            f"a different 'scripts' package is already imported ({loaded}); expected {bundle_dir / 'scripts'}"
        )
    return scripts


class BundleConfig:
    """The bundle's config parser for this app, with the app's own settings split off.

    Args:
        app_dir: the MONAI Label app folder.
        studies: the datastore location given to ``monailabel start_server --studies``.
        conf: the ``--conf`` key/value strings.
        local_datastore: whether the datastore is a writable folder (then the cache lives in it).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str], local_datastore: bool = True) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.bundle_dir = (
            Path(conf["bundle_dir"]).expanduser().resolve() if conf.get("bundle_dir") else default_bundle_dir(app_dir)
        )
        self.scripts = import_bundle(self.bundle_dir)
        self.files = [self.bundle_dir / "configs" / "inference.json", *self._presets(conf.get("preset", ""))]
        self.cache_dir = self._cache_dir(conf.get("cache_dir"), studies, local_datastore)
        # the bundle's dataset_dir: never searched by the app (it names the subjects itself), but relative paths in
        # bundle settings are best resolved in the studies folder
        self.dataset_dir = Path(studies).resolve() if local_datastore else self.app_dir
        self.overrides = {k: parse_value(v) for k, v in conf.items() if k not in APP_KEYS and k not in MONAI_LABEL_KEYS}
        self.parser = self._make_parser()  # bad presets or overrides fail here, at start-up

    def _presets(self, value: str) -> list[Path]:
        files = []
        for item in [p.strip() for p in str(value or "").split(",") if p.strip()]:
            path = Path(item).expanduser()
            candidates = (
                [path]
                if path.is_absolute()
                else [Path.cwd() / path, self.bundle_dir.parent / path, self.app_dir / path]
            )
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"--conf preset: {item} not found (looked at {', '.join(map(str, candidates))})"
                )
            files.append(found.resolve())
        return files

    def _cache_dir(self, value: str | None, studies: str, local_datastore: bool) -> Path | None:
        if value is not None and str(value).strip().lower() in ("", "none", "null", "false", "off"):
            return None
        if value:
            return Path(value).expanduser().resolve()
        if local_datastore:
            return Path(studies).resolve() / ".cs3f_cache"
        return self.app_dir / "model" / "cs3f_cache"

    def _make_parser(self):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(f) for f in self.files])
        unknown = sorted(k for k in self.overrides if k not in parser)
        if unknown:
            raise ValueError(
                f"unknown --conf key(s) {unknown}: not a key of {self.files[0]} nor of the app "
                f"({', '.join(sorted(APP_KEYS))})"
            )
        owned = sorted(k for k in self.overrides if k in FORCED or k in ("bundle_root", "dataset_dir", "output_dir"))
        if owned:
            logger.warning("CS3F: --conf %s ignored: the MONAI Label app sets these itself", owned)
        parser.update({k: v for k, v in self.overrides.items() if k not in owned})
        parser.update(
            {
                **FORCED,
                "bundle_root": str(self.bundle_dir),
                "dataset_dir": str(self.dataset_dir),
                "output_dir": str(self.app_dir / "model" / "outputs"),  # unused: results are answered from memory
                "cache_dir": str(self.cache_dir) if self.cache_dir else "",
            }
        )
        # evaluate what is cheap now so that a bad value stops the server at start-up, not at the first request
        for key in ("inferer", "settings"):
            parser.get_parsed_content(key, instantiate=True, lazy=True)
        return parser

    def __getitem__(self, key: str) -> Any:
        """A setting of the bundle, resolved (``config["grid_size"]``)."""
        return self.parser.get_parsed_content(key, instantiate=True, lazy=True)

    def describe(self) -> str:
        presets = ", ".join(str(p) for p in self.files[1:]) or "none"
        return (
            f"CS3F bundle {self.bundle_dir} (presets: {presets}); backbone {self['backbone']!r}, grid "
            f"{self['grid_size']}, matching {self['matching']!r}, device {self['device']}; cache {self.cache_dir or 'off'}"
        )

    def startup_check(self) -> str | None:
        """A clear log line when the backbone's weights are not on this machine (no download is tried here)."""
        weights = self.scripts.weights
        name = self["backbone"]
        if name not in weights.SOURCES or self["fallback_backbone"]:
            return None
        try:
            found = weights.find_weights(name, self["weights_path"], self["models_dir"])
            logger.info("CS3F: backbone %s, weights %s", name, found.describe())
        except weights.WeightsNotFoundError as err:
            message = (
                f"CS3F: no weights for backbone {name!r} on this machine; every 'anomaly' request will fail with this "
                f"error until they are provided. To try the app offline, restart it with --conf backbone intensity.\n{err}"
            )
            logger.warning(message)
            return message
        return None
