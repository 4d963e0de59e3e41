"""The face analyzers of an import, loaded once per process and kept.

Images are detected as generated images are verified (faces.pack.detection_settings:
640x640 for images of 256 px or more, their own size below that), so an analyzer is kept
per detection size; aligned crops are embedded without detection by any of them. Model
libraries load when the first analyzer is built, not when this module is imported.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from arc2face_engine.faces.pack import detection_settings

if TYPE_CHECKING:
    from arc2face_engine.faces.records import AnalyzerBase

_CACHE: dict[tuple, AnalyzerBase] = {}
_LOCK = threading.Lock()


class ImportAnalyzers:
    """Analyzers for one models directory, device and detection threshold."""

    def __init__(self, models_dir: str, device: str, min_det_score: float) -> None:
        self.models_dir, self.device, self.min_det_score = str(models_dir), device, min_det_score

    def for_size(self, height: int, width: int) -> AnalyzerBase:
        """The analyzer that detects an image of this size as generated ones are."""
        det_size, det_thresh = detection_settings(height, width, self.min_det_score)
        return self._analyzer(det_size, det_thresh)

    def aligned(self) -> AnalyzerBase:
        """An analyzer for aligned crops (detection settings do not matter there)."""
        return self.for_size(112, 112)

    def _analyzer(self, det_size: int, det_thresh: float) -> AnalyzerBase:
        from arc2face_engine.faces.loading import load_face_analyzer

        key = (self.models_dir, self.device, det_size, det_thresh)
        with _LOCK:
            if key not in _CACHE:
                device = None if self.device == "cpu" else self.device
                _CACHE[key] = load_face_analyzer(
                    self.models_dir, device=device, det_size=det_size, det_thresh=det_thresh
                )
            return _CACHE[key]
