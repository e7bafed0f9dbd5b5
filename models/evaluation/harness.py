"""Evaluation harness: the protocol and the run (EvalConfig, evaluate): self-reenactment pairs
from head-turn clips and targets from synchronized multi-camera sets, each method's picture scored
per pair, contact sheets as the run goes. The methods are in runners.py, the metrics in scoring.py,
the statistics in aggregate.py and results.json / results.md / plots in report.py.

Protocol for clips, "reenactment (other frame of a clip)" (DESIGN.md section 7):

* Pairs: per clip, the most frontal frame is the reference s; targets t are
  other frames binned by |yaw(t) - yaw(s)| (models.evaluation.clips.pairs), with
  near-duplicates of s left out.
* Every picture lives in the reference's CROP camera (S x S): the target is
  frame t warped by ``framing.crop``; the baseline "reference frame unchanged"
  is ``framing.source_view()``; a method renders the avatar of s reenacted
  with the geometry of t, seen by the video camera.
* Scores inside the target's HEAD region (face oval grown upward for the
  hair, intersected with the person mask; models.face.analysis.head_region_mask)
  and, for comparison, the whole person mask. In a head-turn clip only the
  head rotates; the torso and background do not move like a camera orbit.

Protocol for sets, "multi-camera (same moment)" (models.evaluation.multiview):

* The reference is the set's most frontal view (or the one it names); the targets are every other
  view with a face (views without one are listed as skipped, with the reason), binned by the angle
  between the two view directions, from the cameras where the set gives them, else measured.
* Each target is first mapped into the reference camera (multiview.align_to_reference: its head
  origin where the reference's is, at the same pixels per metre); from there on it is scored
  exactly like a clip pair: same crop camera, methods, head and person masks, metrics.

Methods: "baseline" always; the others come from a :class:`MethodRunner`
(:class:`AvatarRunner` gives "raw" and, with a refiner, "refined";
:class:`CallableRunner` wraps plain functions, for tests and quick experiments).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation.aggregate import aggregate
from models.evaluation.clips import (
    DEFAULT_BINS,
    ClipIndex,
    ClipIndexConfig,
    VideoReadError,
    bin_label,
    index_clip,
    Pair,
    pairs,
    reference_frame,
)
from models.evaluation.figures import contact_sheet, label_tile, save_png
from models.evaluation.metrics import temporal_flicker
from models.evaluation.multiview import (
    MultiviewConfig,
    MultiviewSet,
    UnusableSetError,
    align_to_reference,
    analyse_set,
    read_set,
    reference_view,
    target_angles,
)
from models.evaluation.runners import BASELINE, CallableRunner, Framing, MethodRunner, PairCase
from models.evaluation.scoring import Scorer, score
from models.face.analysis import FaceAnalysisError, FaceAnalyzer, FaceConfig, NoFaceError, head_region_mask
from models.geometry.camera import OrbitPose
from models.runinfo import run_metadata

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "UnusableClipError", "EvalResult", "evaluate"]


class UnusableClipError(FaceAnalysisError):
    """The clip has faces but yields no evaluation pair (no near-frontal reference, no target in the bins)."""


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (saved in results.json)."""

    size: int = 256
    """Side S of the crop-camera pictures scored, pixels."""
    bins: tuple[tuple[float, float], ...] = DEFAULT_BINS
    """|yaw difference| bins, degrees, half-open [lo, hi)."""
    max_pairs_per_bin: int = 8
    """Pairs per bin per clip (evenly spread over the clip, or random with ``seed``)."""
    min_gap_frames: int = 5
    """Targets closer than this many frames to the reference are near-duplicates, left out."""
    min_yaw_diff_deg: float = 0.5
    """Targets whose |yaw difference| is below this are near-duplicates, left out."""
    seed: int | None = None
    """None: deterministic evenly spread pairs; an int: random pairs from that seed."""
    max_reference_yaw_deg: float = 20.0
    """A clip whose most frontal frame has |yaw| above this has no near-frontal reference: skipped."""
    index: ClipIndexConfig = ClipIndexConfig()
    """How clips are analysed (stride, max frames, mask size, fov)."""
    identity: bool = True
    """Compute dlib identity distances (needs the eval extra)."""
    landmarks: bool = True
    """Compute the landmark error (face mesh on every output)."""
    flicker: bool = True
    """Render a slow orbit per clip and measure temporal flicker (methods with an orbit only)."""
    flicker_yaw_deg: float = 15.0
    """The orbit goes from -flicker_yaw_deg to +flicker_yaw_deg ..."""
    flicker_step_deg: float = 0.5
    """... in steps of this many degrees (one frame each)."""
    sheet_pairs_per_bin: int = 1
    """Rows per bin in each clip's contact sheet."""
    multiview: MultiviewConfig = MultiviewConfig()
    """How multi-camera sets are analysed and binned (their own angle bins, up to 60+ degrees)."""

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 2048:
            raise ValueError(f"size: expected pixels in [32, 2048], got {self.size}")
        if self.max_pairs_per_bin < 1:
            raise ValueError(f"max_pairs_per_bin: expected >= 1, got {self.max_pairs_per_bin}")
        if not self.bins:
            raise ValueError("expected at least one yaw bin, got none")
        if self.flicker_step_deg <= 0 or self.flicker_yaw_deg <= 0:
            raise ValueError(
                f"expected positive flicker_yaw_deg and flicker_step_deg, got {self.flicker_yaw_deg}, {self.flicker_step_deg}"
            )


@dataclass
class EvalResult:
    """Everything models.evaluation.report.write_results writes."""

    config: EvalConfig
    methods: tuple[str, ...]
    records: list[dict[str, Any]]
    flicker: dict[str, dict[str, float | None]]
    skipped: list[dict[str, str]]
    clips: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    sheets: dict[str, str] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    """Multi-camera sets evaluated (their records are ``set_records``, kept apart from the clips' ``records``)."""
    set_records: list[dict[str, Any]] = field(default_factory=list)
    set_skipped: list[dict[str, str]] = field(default_factory=list)
    """Sets left out whole: {"set", "path", "reason"}."""
    skipped_views: list[dict[str, str]] = field(default_factory=list)
    """Views of evaluated sets that are not targets: {"set", "view", "reason"}."""
    set_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per set: its reference view, view counts and where its angles come from."""
    set_sheets: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Statistics of the clip pairs (reenactment)."""
        return aggregate(self.records, self.methods, self.config.bins)

    def set_summary(self) -> dict[str, Any]:
        """Statistics of the multi-camera targets, per angle bin and per set ("per_set")."""
        return aggregate(self.set_records, self.methods, self.config.multiview.bins, group_key="set")


def _reference_view(framing: Framing, scorer: Scorer) -> tuple[np.ndarray, np.ndarray | None]:
    view = framing.source_view()
    return view, scorer.embed(view, scorer.face(view)) if scorer.embedder is not None else None


@dataclass(frozen=True)
class _Scored:
    outputs: dict[str, np.ndarray]  # method -> [S, S, 3] float in [0, 1]
    target: np.ndarray  # [S, S, 3] float in [0, 1]
    head: np.ndarray  # [S, S] float32 in {0, 1}
    fields: dict[str, Any]  # the record's head_px, person_px, target_face_found and methods


class MethodOutputError(RuntimeError):
    """A method drew a picture that cannot be scored (values that are not finite): a fault of the method, which
    would otherwise leave its metrics empty and its bins at n=0 without a word."""


def _score_case(case: PairCase, runner: MethodRunner, scorer: Scorer, ref_view: np.ndarray,
                ref_emb: np.ndarray | None) -> _Scored:
    """Every method's picture of one case, scored against the target in the reference's crop camera,
    inside the target's head region and person mask. Raises FaceAnalysisError when a method cannot render it,
    MethodOutputError when a picture it drew is not finite."""
    framing, obs = case.framing, case.tgt_obs
    target = framing.crop(case.tgt_frame)
    head_full = head_region_mask(obs.landmarks_px, obs.image_size, obs.mask)
    head = (framing.crop(head_full) > 0.5).astype(np.float32)
    person = (framing.crop(obs.mask) > 0.5).astype(np.float32)
    tgt_lms = scorer.face(target)
    tgt_emb = scorer.embed(target, tgt_lms)
    outputs = {BASELINE: ref_view, **runner.render(case)}
    for name, picture in outputs.items():
        if not np.isfinite(picture).all():
            raise MethodOutputError(f"method '{name}' drew a picture with values that are not finite for "
                                    f"'{case.clip}' (reference {case.pair.ref}, target {case.pair.tgt}): nothing scored")
    fields = {
        "head_px": int(head.sum()),
        "person_px": int(person.sum()),
        "target_face_found": tgt_lms is not None if scorer.analyzer is not None else None,
        "methods": {m: score(pic, target, head, person, scorer, tgt_lms, tgt_emb, ref_emb) for m, pic in outputs.items()},
    }
    return _Scored(outputs, target, head, fields)


def _write_sheet(out_dir: Path | None, name: str, rows: list, titles: list[str]) -> str | None:
    """Contact sheet out_dir/sheets/<name> of the rows, if any; its path."""
    if not rows or out_dir is None:
        return None
    path = out_dir / "sheets" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, contact_sheet(rows, row_titles=titles))
    return str(path)


def _evaluate_clip(
    index: ClipIndex, runner: MethodRunner, config: EvalConfig, scorer: Scorer, progress: bool, out_dir: Path | None
) -> tuple[list[dict[str, Any]], dict[str, float | None] | None, str | None]:
    """Records of one clip, its flicker, and its contact sheet path (or raises FaceAnalysisError to skip it)."""
    from tqdm.auto import tqdm

    name = index.name
    ref = reference_frame(index)
    if abs(index.yaw_deg(ref)) > config.max_reference_yaw_deg:
        raise UnusableClipError(
            f"no near-frontal reference in '{name}': its most frontal frame {ref} has yaw "
            f"{index.yaw_deg(ref):+.1f} deg (limit {config.max_reference_yaw_deg:g})"
        )
    chosen = pairs(index, bins=config.bins, max_per_bin=config.max_pairs_per_bin, min_gap_frames=config.min_gap_frames,
                   min_yaw_diff_deg=config.min_yaw_diff_deg, ref=ref, rng=config.seed)
    if not chosen:
        raise UnusableClipError(
            f"no target frame of '{name}' falls in the yaw bins "
            f"(yaw range {np.nanmin(index.pose_deg[:, 0]):.1f}..{np.nanmax(index.pose_deg[:, 0]):.1f} deg)"
        )
    frames = index.read_frames([ref] + [p.tgt for p in chosen])
    if hasattr(runner, "add_clip"):  # a runner that needs the clip's other frames (models.evaluation.memory)
        runner.add_clip(index)
    ref_obs = index.observation(ref)
    framing = runner.framing(frames[ref], ref_obs, config.size)
    ref_view, ref_emb = _reference_view(framing, scorer)
    yaw_ref = index.yaw_deg(ref)
    pitch_ref = float(index.pose_deg[index.position(ref), 1])

    sheet_rows, sheet_titles, per_bin_rows = [], [], {}
    records = []
    for pair in tqdm(chosen, desc=f"pairs {name}", unit="pair", disable=not progress, leave=False):
        case = PairCase(name, pair, frames[ref], ref_obs, frames[pair.tgt], index.observation(pair.tgt), framing)
        try:
            scored = _score_case(case, runner, scorer, ref_view, ref_emb)
        except FaceAnalysisError as exc:
            log.warning("clip '%s' pair %d->%d skipped: %s", name, pair.ref, pair.tgt, exc)
            continue
        rec: dict[str, Any] = {
            "clip": name,
            "ref": pair.ref,
            "tgt": pair.tgt,
            "bin": bin_label(pair.bin),
            "yaw_ref_deg": yaw_ref,
            "yaw_tgt_deg": index.yaw_deg(pair.tgt),
            "yaw_diff_deg": pair.yaw_diff_deg,
            "abs_yaw_diff_deg": abs(pair.yaw_diff_deg),
            "pitch_diff_deg": float(index.pose_deg[index.position(pair.tgt), 1]) - pitch_ref,
            **scored.fields,
        }
        records.append(rec)

        rows_in_bin = per_bin_rows.setdefault(pair.bin, 0)
        if rows_in_bin < config.sheet_pairs_per_bin and out_dir is not None:
            per_bin_rows[pair.bin] = rows_in_bin + 1
            sheet_rows.append(_sheet_row(scored.outputs, scored.target, scored.head, rec, runner.methods))
            sheet_titles.append(
                f"bin {rec['bin']} deg: ref frame {pair.ref} (yaw {yaw_ref:+.1f}) -> target frame {pair.tgt} "
                f"(yaw {rec['yaw_tgt_deg']:+.1f}), diff {pair.yaw_diff_deg:+.1f} deg"
            )

    sheet_path = _write_sheet(out_dir, f"{name}.png", sheet_rows, sheet_titles)

    flicker = None
    if config.flicker:
        flicker = _clip_flicker(runner, framing, config)
    return records, flicker, sheet_path


def _fmt(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.2f}{unit}"


def _sheet_row(outputs, target, head, rec, methods) -> list[np.ndarray]:
    """reference | raw | refined | target, with head-mask PSNR on each method tile."""
    S = target.shape[0]
    tiles = []
    for method in [BASELINE, "raw", "refined"] + [m for m in methods if m not in ("raw", "refined")]:
        title = "reference" if method == BASELINE else method
        if method in outputs:
            m = rec["methods"][method]
            lines = [f"PSNR {_fmt(m['psnr_head'])} dB", f"SSIM {_fmt(m['ssim_head'])}"]
            tiles.append(label_tile(outputs[method], title, lines))
        else:
            blank = np.full((S, S, 3), 0.85, np.float32)
            tiles.append(label_tile(blank, title, ["not run"]))
    tiles.append(label_tile(target, "target", outline=head))
    return tiles


def _clip_flicker(runner: MethodRunner, framing: Framing, config: EvalConfig) -> dict[str, float | None] | None:
    n = int(round(2 * config.flicker_yaw_deg / config.flicker_step_deg)) + 1
    yaws = np.linspace(-config.flicker_yaw_deg, config.flicker_yaw_deg, n)
    orbit = runner.orbit(framing, [OrbitPose(yaw_deg=float(y)) for y in yaws])
    if orbit is None:
        return None
    alpha = orbit.get("alpha")
    masks = None if alpha is None else (alpha > 0.5).astype(np.float32)
    motion = orbit.get("raw")
    out: dict[str, float | None] = {}
    for method, frames in orbit.items():
        if method == "alpha":
            continue
        value = temporal_flicker(frames, masks, flow_frames=motion if motion is not None else None)
        out[method] = value if math.isfinite(value) else None
    if out.get("raw") is not None and out.get("refined") is not None:
        out["refined_minus_raw"] = out["refined"] - out["raw"]
    return out


def _evaluate_set(
    mvset: MultiviewSet, analyzer: FaceAnalyzer, runner: MethodRunner, config: EvalConfig, scorer: Scorer,
    out_dir: Path | None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any], str | None]:
    """Records of one multi-camera set, its skipped views, its description and contact sheet path
    (or raises FaceAnalysisError to skip the whole set)."""
    mv = config.multiview
    name = mvset.name
    analysis = analyse_set(mvset, analyzer)
    ref = reference_view(analysis, mv.pitch_weight)
    skipped = [{"set": name, "view": f, "reason": reason} for f, reason in analysis.missing.items()]
    angles, angle_note = target_angles(analysis, ref, mv.max_angle_disagreement_deg)
    if not angles:
        raise UnusableSetError(f"only one view of set '{name}' has a face ({ref})")
    ref_frame, ref_obs = analysis.images[ref], analysis.observations[ref]
    framing = runner.framing(ref_frame, ref_obs, config.size)
    ref_view, ref_emb = _reference_view(framing, scorer)
    files = [v.file for v in mvset.views]
    records, sheet_rows, sheet_titles = [], [], []
    for tgt, angle in sorted(angles.items(), key=lambda kv: kv[1].angle_deg):
        b = next((b for b in mv.bins if b[0] <= angle.angle_deg < b[1]), None)
        if b is None:
            skipped.append({"set": name, "view": tgt, "reason": f"view angle {angle.angle_deg:.1f} deg is in no bin"})
            continue
        frame, obs = align_to_reference(analysis.images[tgt], analysis.observations[tgt], ref_obs)
        # A set's pair holds view indices where a clip's holds frame ids.
        case = PairCase(name, Pair(files.index(ref), files.index(tgt), angle.yaw_diff_deg, b), ref_frame, ref_obs,
                        frame, obs, framing)
        try:
            scored = _score_case(case, runner, scorer, ref_view, ref_emb)
        except FaceAnalysisError as exc:
            log.warning("set '%s' view %s skipped: %s", name, tgt, exc)
            skipped.append({"set": name, "view": tgt, "reason": f"not rendered: {exc}"})
            continue
        r_pose, t_pose = ref_obs.pose, analysis.observations[tgt].pose
        rec: dict[str, Any] = {
            "set": name,
            "ref": ref,
            "tgt": tgt,
            "bin": bin_label(b),
            "angle_deg": angle.angle_deg,
            "yaw_diff_deg": angle.yaw_diff_deg,
            "pitch_diff_deg": angle.pitch_diff_deg,
            "abs_yaw_diff_deg": abs(angle.yaw_diff_deg),
            "yaw_source": angle.yaw_source,
            "pitch_source": angle.pitch_source,
            "yaw_diff_measured_deg": angle.yaw_diff_measured_deg,
            "pitch_diff_measured_deg": angle.pitch_diff_measured_deg,
            "yaw_ref_deg": r_pose.yaw_deg,
            "pitch_ref_deg": r_pose.pitch_deg,
            "yaw_tgt_deg": t_pose.yaw_deg,
            "pitch_tgt_deg": t_pose.pitch_deg,
            **scored.fields,
        }
        records.append(rec)
        if out_dir is not None:
            sheet_rows.append(_sheet_row(scored.outputs, scored.target, scored.head, rec, runner.methods))
            sheet_titles.append(
                f"{tgt}: {angle.angle_deg:.0f} deg from {ref} (yaw {angle.yaw_diff_deg:+.0f} {angle.yaw_source}, "
                f"pitch {angle.pitch_diff_deg:+.0f} {angle.pitch_source})"
            )
    info = {"path": str(mvset.path), "views": len(mvset.views), "views_with_face": len(analysis.observations),
            "reference": ref, "reference_named_by_set": mvset.reference is not None, "angles": angle_note}
    return records, skipped, info, _write_sheet(out_dir, f"multiview/{name}.png", sheet_rows, sheet_titles)


def evaluate(
    clips: Sequence[str | Path],
    runner: MethodRunner | None = None,
    config: EvalConfig = EvalConfig(),
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    sets: Sequence[str | Path] = (),
) -> EvalResult:
    """Evaluate every clip and every multi-camera set folder (models.evaluation.multiview); clips and
    sets that cannot be read, hold no face or yield no pair are logged, listed in ``skipped`` /
    ``set_skipped`` and left out. With ``out_dir``, contact sheets are written there as the run goes
    (see models.evaluation.report.write_results for the rest). The result's meta is
    models.runinfo.run_metadata on the runner's device, plus ``meta``."""
    from tqdm.auto import tqdm

    runner = runner if runner is not None else CallableRunner()
    methods = (BASELINE,) + tuple(runner.methods)
    out_path = Path(out_dir) if out_dir is not None else None
    result = EvalResult(config, methods, [], {}, [], [])
    scorer = Scorer(identity=config.identity, landmarks=config.landmarks)
    try:
        for path in tqdm(list(clips), desc="clips", unit="clip", disable=not progress):
            path = Path(path)
            try:
                index = index_clip(path, config.index, cache_dir=cache_dir, progress=progress)
                if not index.found.any():
                    raise NoFaceError(f"no face found in any of the {len(index)} analysed frames")
                clip_records, clip_flicker, sheet = _evaluate_clip(index, runner, config, scorer, progress, out_path)
            except (FaceAnalysisError, VideoReadError) as exc:
                reason = str(exc)
                log.warning("skipping clip '%s': %s", path.name, reason)
                result.skipped.append({"clip": path.stem, "path": str(path), "reason": reason})
                continue
            result.records.extend(clip_records)
            result.clips.append(path.stem)
            if clip_flicker is not None:
                result.flicker[path.stem] = clip_flicker
            if sheet:
                result.sheets[path.stem] = sheet
        if sets:
            _evaluate_sets(sets, runner, config, scorer, out_path, progress, result)
    finally:
        scorer.close()
    result.meta = run_metadata(getattr(runner, "device", "cpu"), **(meta or {}))
    return result


def _evaluate_sets(sets: Sequence[str | Path], runner: MethodRunner, config: EvalConfig, scorer: Scorer,
                   out_dir: Path | None, progress: bool, result: EvalResult) -> None:
    from tqdm.auto import tqdm

    face = FaceConfig(static_image=True, max_faces=1, segmentation=True, fov_deg=config.multiview.fov_deg)
    with FaceAnalyzer(face) as analyzer:
        for path in tqdm(list(sets), desc="sets", unit="set", disable=not progress):
            path = Path(path)
            try:
                records, skipped_views, info, sheet = _evaluate_set(read_set(path), analyzer, runner, config, scorer,
                                                                    out_dir)
            except FaceAnalysisError as exc:
                log.warning("skipping set '%s': %s", path.name, exc)
                result.set_skipped.append({"set": path.name, "path": str(path), "reason": str(exc)})
                continue
            result.sets.append(path.name)
            result.set_records.extend(records)
            result.skipped_views.extend(skipped_views)
            result.set_info[path.name] = info
            if sheet:
                result.set_sheets[path.name] = sheet
