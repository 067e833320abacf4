"""The jobs' model cache: model bundles (service.serving) loaded once per process, in the workers and the
in-process backend; jobs run the same use-case functions over them as the API does.

Where models come from (folders, device, whether legacy pickled detectors may load) is set by the entry point
that runs jobs (`configure`, from its settings); until then, the shipped models on 'auto'.

A model stays loaded; its detector follows the active card on disk: each `get_bundle` stats the card, and when
it changed (an activation or a rollback, by any process) the new detector is loaded with every check and handed
out in a NEW bundle object (the same model), so a job that already holds its bundle keeps one detector from
start to end, and jobs that start after the activation use the new one (service.serving.changed_detector)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from service.serving import ModelBundle, changed_detector, load_bundle
from service.zoo.registry import SHIPPED_MODELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where the cache loads from."""

    folders: tuple[Path, ...] = (SHIPPED_MODELS,)
    device: str = "auto"
    allow_pickled_detectors: bool = False


_lock = threading.Lock()
_source = Source()
_bundles: dict[str, ModelBundle] = {}


def configure(folders: Sequence[Path], device: str, allow_pickled_detectors: bool = False) -> None:
    """Load from these folders on this device from now on (what was cached from elsewhere is dropped)."""
    global _source
    source = Source(tuple(Path(f) for f in folders), device, allow_pickled_detectors)
    with _lock:
        if source != _source:
            _source = source
            _bundles.clear()


def get_bundle(name: str) -> ModelBundle:
    """The model bundle (model and detector, service.serving.load_bundle) by registry name, loaded on first use
    and then kept for the life of the process, with the detector that is active on disk now (a changed active
    card gives a new bundle with the new detector; the one handed out before is left as it was)."""
    with _lock:
        if name not in _bundles:
            bundle = _bundles[name] = load_bundle(name, _source.device, _source.folders,
                                                  _source.allow_pickled_detectors)
            log.info("model %s loaded on %s (sha256 %s, detector %s)", name, bundle.device, bundle.sha256[:12],
                     bundle.detector_state.id or f"none: {bundle.detector_error or 'no file'}")
        else:
            state = changed_detector(_bundles[name])
            if state is not None:
                _bundles[name] = replace(_bundles[name], detector_state=state)
        return _bundles[name]


def source() -> Source:
    """Where the cache loads from now."""
    return _source


def forget(model_name: str | None = None) -> None:
    """Drop cached bundles (all, or one model's): they are loaded again at their next use (an activated detector
    needs no forgetting: `get_bundle` follows the active card)."""
    with _lock:
        if model_name is None:
            _bundles.clear()
        else:
            _bundles.pop(model_name, None)
