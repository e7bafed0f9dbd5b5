"""Scoring one picture against its target: the per-pair metrics (METRICS), the face mesh and
identity embedder a run shares (Scorer), and score(), which fills one method's record."""
from __future__ import annotations

from typing import Any

import numpy as np

from models.evaluation.metrics import (
    gain_matched,
    masked_psnr,
    masked_ssim,
    output_landmark_error,
)
from models.face.analysis import LEFT_EYE_OUTER, RIGHT_EYE_OUTER, FaceAnalyzer, FaceConfig, NoFaceError
from models.face.identity import IdentityEmbedder, identity_distance
from models.pictures import to_uint8

__all__ = ["METRICS", "Scorer", "score"]

METRICS: dict[str, str] = {
    "psnr_head": "PSNR (dB) inside the target's head region",
    "ssim_head": "SSIM inside the target's head region",
    "psnr_head_gain": "PSNR (dB) inside the target's head region with each colour channel's gain fitted to the target "
                      "there (a diagnostic: the error left without the cameras' colour balance, which no avatar can know)",
    "psnr_person": "PSNR (dB) inside the target's person mask",
    "ssim_person": "SSIM inside the target's person mask",
    "id_dist_target": "dlib identity distance to the target (lower = same person; < 0.6 same by dlib's rule)",
    "id_dist_ref": "dlib identity distance to the reference",
    "lmk_err_pct": "landmark error, % of the target's inter-ocular distance (face mesh on output vs on target)",
}
"""Per-pair metrics of every method, with what they mean (higher is better for PSNR/SSIM only)."""


class Scorer:
    """Face mesh and identity embedder shared by all pairs of a run.

    identity: compute dlib identity distances (needs the eval extra); landmarks: report the
    landmark error (the face mesh also runs for identity alone: it places the face box).
    """

    def __init__(self, identity: bool = True, landmarks: bool = True):
        self.identity = identity
        self.landmarks = landmarks
        self.analyzer = FaceAnalyzer(FaceConfig(static_image=True, max_faces=1, segmentation=False)) \
            if (landmarks or identity) else None
        self.embedder = IdentityEmbedder() if identity else None

    def close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()

    def face(self, picture: np.ndarray) -> np.ndarray | None:
        """Landmarks [478, 3] of a picture [S, S, 3] float, or None when no face is found."""
        if self.analyzer is None:
            return None
        try:
            return self.analyzer.landmarks(to_uint8(picture))
        except NoFaceError:
            return None

    def embed(self, picture: np.ndarray, lms: np.ndarray | None) -> np.ndarray | None:
        if self.embedder is None or lms is None:
            return None
        return self.embedder.embed(to_uint8(picture), lms)


def score(
    out: np.ndarray,
    target: np.ndarray,
    head: np.ndarray,
    person: np.ndarray,
    scorer: Scorer,
    tgt_lms: np.ndarray | None,
    tgt_emb: np.ndarray | None,
    ref_emb: np.ndarray | None,
) -> dict[str, Any]:
    """Metrics of one method's picture for one pair (None where not computable)."""
    rec: dict[str, Any] = {k: None for k in METRICS}
    if head.sum() > 0:
        rec["psnr_head"] = masked_psnr(out, target, head)
        rec["ssim_head"] = masked_ssim(out, target, head)
        rec["psnr_head_gain"] = masked_psnr(gain_matched(out, target, head), target, head)
    if person.sum() > 0:
        rec["psnr_person"] = masked_psnr(out, target, person)
        rec["ssim_person"] = masked_ssim(out, target, person)
    if scorer.analyzer is not None and tgt_lms is not None:
        iod = float(np.hypot(*(tgt_lms[LEFT_EYE_OUTER, :2] - tgt_lms[RIGHT_EYE_OUTER, :2])))
        err, lms = output_landmark_error(scorer.analyzer, out, tgt_lms, iod)
        rec["lmk_failed"] = err is None
        if scorer.landmarks:
            rec["lmk_err_pct"] = err
        emb = scorer.embed(out, lms)
        if emb is not None:
            rec["id_dist_target"] = identity_distance(emb, tgt_emb) if tgt_emb is not None else None
            rec["id_dist_ref"] = identity_distance(emb, ref_emb) if ref_emb is not None else None
    return rec
