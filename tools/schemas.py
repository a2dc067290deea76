"""Typed data passed between layers, and the JSON answer contract (shared/DESIGN.md).

Geometry conventions (never mixed):
- ``*_mm`` coordinates are DICOM patient coordinates (LPS, millimetres): x to the patient's left,
  y posterior, z head-ward. Boxes in mm are ``[x0, y0, z0, x1, y1, z1]``.
- ``bbox_vox`` boxes are voxel indices ``[i0, j0, k0, i1, j1, k1]`` with i = column, j = row,
  k = slice (in the series' own slice order, sorted along the slice normal); upper bounds inclusive.
- ``bbox_px`` boxes are 2-D pixel boxes ``[x0, y0, x1, y1]`` (column, row) on the image named by
  ``slice_index`` (or the radiograph itself).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ChangeStatus = Literal["grew", "shrank", "stable", "new", "resolved"]
Level = Literal["high", "medium", "low"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Change(_Model):
    status: ChangeStatus
    prior_diameter_mm: float | None = None
    prior_center_mm: list[float] | None = None
    interval_days: int | None = None
    doubling_time_days: float | None = None
    prior_volume_mm3: float | None = None
    diameter_change_mm: float | None = None
    prior_finding_id: str | None = None


class Finding(_Model):
    id: str
    kind: str  # "nodule" | "mass" | "opacity" | "anatomy" | ...
    label: str = ""
    region: str | None = None
    side: Literal["right", "left"] | None = None
    zone: Literal["upper", "middle", "lower"] | None = None
    center_mm: list[float] | None = None
    bbox_mm: list[float] | None = None
    bbox_vox: list[int] | None = None
    bbox_px: list[float] | None = None
    diameter_mm: float | None = None  # mean axial diameter (Lung-RADS) for lesions
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    volume_mm3: float | None = None
    attenuation: Literal["solid", "part-solid", "ground-glass"] | None = None
    mean_hu: float | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    slice_index: int | None = None
    reliability: float | None = None
    confidence: float | None = None  # detector's own score for the candidate, 0-1
    units: Literal["mm", "px"] = "mm"
    change: Change | None = None
    notes: list[str] = Field(default_factory=list)
    source: Literal["vlm"] | None = None  # "vlm": boxed by a served vision-language model, not measured


class Evidence(_Model):
    kind: Literal["image", "plot", "file"]
    path: str
    caption: str
    finding_ids: list[str] = Field(default_factory=list)
    role: str | None = None  # "key-image" | "overview" | "before-after" | "subtraction" | ...


class Reliability(_Model):
    score: float
    level: Level
    method: str
    details: dict[str, Any] = Field(default_factory=dict)


class ReportSentence(_Model):
    text: str
    finding_ids: list[str] = Field(default_factory=list)
    section: str = "findings"


class Report(_Model):
    sections: dict[str, str]
    sentences: list[ReportSentence]
    lung_rads: str | None = None  # chest CT only (Lung-RADS does not grade a film)
    title: str = "Chest CT report"
    files: dict[str, str] = Field(default_factory=dict)


class Step(_Model):
    """One tool agent's run, as shown (collapsed) in the chat."""

    tool: str
    title: str
    status: Literal["done", "error", "skipped"] = "done"
    detail: str = ""
    duration_s: float = 0.0


class Answer(_Model):
    answer: str
    tools: list[str]
    findings: list[Finding]
    evidence: list[Evidence]
    reliability: Reliability
    report: Report | None = None
    prognosis: dict[str, Any] | None = None
    backend: dict[str, str]
    thread_id: str
    steps: list[Step] = Field(default_factory=list)
    study_uid: str | None = None
    prior_study_uid: str | None = None
    comparison: dict[str, Any] | None = None
    notes: list[str] = Field(default_factory=list)


def level_for(score: float) -> Level:
    """The one mapping from a reliability score to its level."""
    if score >= 0.8:
        return "high"
    if score >= 0.5:
        return "medium"
    return "low"
