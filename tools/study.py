"""The study model: pixels plus the geometry that places them in the patient (LPS, mm).

A :class:`Series` holds one image stack as a numpy array indexed ``[k, j, i]`` (slice, row, column),
the spacing of each axis, and a direction matrix whose columns are the patient-frame unit vectors of
increasing i (along a row), increasing j (down a column) and increasing k (the slice normal, in the
order the slices were sorted). ``affine`` maps ``(i, j, k, 1)`` to LPS millimetres.

For radiographs (CR/DX/PNG) the stack has one slice. When the pixel spacing is unknown (missing or
``0`` in the header, or a PNG), ``spacing_known`` is False and measurements are in pixels.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

VOLUME_MODALITIES = {"CT", "MR", "PT"}
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "PX", "MG", "OT"}


@dataclass
class Series:
    series_uid: str
    modality: str
    pixels: np.ndarray  # float32, [k, j, i]; CT in HU after the modality LUT
    spacing: tuple[float, float, float]  # (di, dj, dk) in mm: column spacing, row spacing, slice step
    origin: np.ndarray  # LPS mm of voxel (0, 0, 0)
    direction: np.ndarray  # 3x3, columns = unit vectors of i, j, k in LPS
    description: str = ""
    spacing_known: bool = True
    photometric: str = "MONOCHROME2"
    window: tuple[float, float] | None = None  # (center, width) from the header, first value
    instance_uids: list[str] = field(default_factory=list)  # per slice, in sorted order
    number: int | None = None
    header: dict[str, Any] = field(default_factory=dict)  # selected non-identifying fields
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.pixels.shape)  # type: ignore[return-value]

    @cached_property
    def cache_key(self) -> str:
        """The series UID plus a fingerprint of its geometry and pixels: results cached under it are
        never shared by two series that merely carry the same UID (a bad export, two patients)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((self.shape, tuple(round(float(v), 4) for v in self.spacing),
                       np.round(np.asarray(self.origin, dtype=float), 3).tolist(),
                       np.round(np.asarray(self.direction, dtype=float), 4).ravel().tolist())).encode())
        flat = self.pixels.reshape(-1)
        step = max(1, flat.size // 65536)
        h.update(np.ascontiguousarray(flat[::step], dtype=np.float32).tobytes())
        return f"{self.series_uid}:{h.hexdigest()}"

    @property
    def is_volume(self) -> bool:
        return self.pixels.shape[0] > 1 and self.modality in VOLUME_MODALITIES

    @property
    def is_radiograph(self) -> bool:
        return self.pixels.shape[0] == 1 and not (self.modality in VOLUME_MODALITIES)

    @property
    def affine(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    def vox_to_mm(self, ijk: np.ndarray | list[float]) -> np.ndarray:
        """(..., 3) voxel indices (i, j, k) -> (..., 3) LPS mm."""
        p = np.asarray(ijk, dtype=float)
        return p @ (self.direction * np.asarray(self.spacing)[None, :]).T + self.origin

    def mm_to_vox(self, xyz: np.ndarray | list[float]) -> np.ndarray:
        """(..., 3) LPS mm -> (..., 3) continuous voxel indices (i, j, k)."""
        p = np.asarray(xyz, dtype=float) - self.origin
        m = self.direction * np.asarray(self.spacing)[None, :]
        return p @ np.linalg.inv(m).T

    def box_vox_to_mm(self, box: list[int] | np.ndarray) -> list[float]:
        """Voxel box [i0, j0, k0, i1, j1, k1] (inclusive) -> mm box covering the voxels' extent."""
        b = np.asarray(box, dtype=float)
        lo, hi = b[:3] - 0.5, b[3:] + 0.5
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        pts = self.vox_to_mm(corners)
        return [round(float(v), 2) for v in np.concatenate([pts.min(0), pts.max(0)])]

    def box_mm_to_vox(self, box: list[float]) -> list[int]:
        """mm box -> voxel box [i0, j0, k0, i1, j1, k1] clipped to the series."""
        b = np.asarray(box, dtype=float)
        corners = np.array([[x, y, z] for x in (b[0], b[3]) for y in (b[1], b[4]) for z in (b[2], b[5])])
        v = self.mm_to_vox(corners)
        lo = np.floor(v.min(0) + 0.5).astype(int)
        hi = np.floor(v.max(0) + 0.5).astype(int)
        nk, nj, ni = self.pixels.shape
        upper = np.array([ni - 1, nj - 1, nk - 1])
        lo = np.clip(lo, 0, upper)
        hi = np.clip(hi, 0, upper)
        return [int(x) for x in (*lo, *hi)]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.direction * np.asarray(self.spacing)[None, :])))


@dataclass
class Study:
    study_uid: str
    patient_id: str  # kept in memory for matching priors; never logged
    study_date: dt.date | None
    modality: str
    series: list[Series]
    description: str = ""
    accession: str = ""
    patient_name: str = ""  # never logged, never sent out unless configured
    patient_sex: str = ""
    patient_age: str = ""
    body_part: str = ""
    source: str = ""  # where it was loaded from
    notes: list[str] = field(default_factory=list)
    identifiers: Any = field(default=None, repr=False)  # tools.deid.Identifiers: scrubbed from requests/logs

    @property
    def primary(self) -> Series:
        """The series the tools work on: the largest volume for CT/MR, else the first image."""
        if not self.series:
            from tools.errors import StudyError

            raise StudyError("This study has no image series to work on.")
        vols = [s for s in self.series if s.is_volume]
        if vols:
            return max(vols, key=lambda s: (s.modality == "CT", s.pixels.shape[0], s.pixels.size))
        return max(self.series, key=lambda s: s.pixels.size)

    @property
    def date_str(self) -> str:
        return self.study_date.isoformat() if self.study_date else "unknown date"

    def summary(self) -> dict[str, Any]:
        """A small, non-identifying description of the study."""
        s = self.primary
        return {
            "study_uid": self.study_uid,
            "date": self.date_str,
            "modality": self.modality,
            "description": self.description,
            "series": len(self.series),
            "shape": list(s.shape),
            "spacing_mm": [round(x, 3) for x in s.spacing],
            "spacing_known": s.spacing_known,
        }
