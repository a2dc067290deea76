"""DICOM export of a report's nodules: a Segmentation (SEG, BINARY) of their masks and a Comprehensive
3D SR (TID 1500 measurement report) of their measurements, both referencing the source CT images; for a
chest film, a Comprehensive SR (TID 1500) whose opacities are circles (2-D SCOORD) on the film
(:func:`export_film_sr`).

- **Masks**: each nodule is segmented here, independently of the detector's internal mask, by the
  detector's own definition of size: half-maximum between the local parenchyma HU and the nodule's
  core HU, on lightly smoothed HU, restricted to the lung side of the pleura (air closed by a rolling
  disc wider than the nodule, so a juxtapleural nodule does not run into the chest wall), inside its
  ``bbox_vox`` plus a margin, and connected to its centre.
- **SEG**: one segment per nodule (``Nodule``/``Mass`` in ``Morphologically abnormal structure``, finding
  site lung, tracking id = the finding id), frames only where a mask is present.
- **SR**: one ``VolumetricROIMeasurementsAndQualitativeEvaluations`` group per nodule referencing its
  SEG segment and the source images it lies on, with finding site (zone of lung + laterality) and the
  finding's own numbers: long axis, short axis, mean diameter (derivation: mean), volume.

The source datasets are re-read (headers only) from the files the study was loaded from
(:attr:`Study.source`); a study without readable source files gets no SR/SEG, with a note saying why.
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from tools.errors import ToolError
from tools.schemas import Finding
from tools.study import Series, Study

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "radassist"
MODEL_NAME = "radassist report writer"
MARGIN_MM = 3.0  # margin around the detector's box in which the mask may grow


def software_version() -> str:
    try:
        return importlib.metadata.version("radassist")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0.0"


# ---------------------------------------------------------------------------------------------- masks


@dataclass
class NoduleMask:
    """A nodule's mask on the series grid: ``mask[k, j, i]`` covers slices/rows/columns from ``offset``."""

    finding_id: str
    offset: tuple[int, int, int]  # (k0, j0, i0)
    mask: np.ndarray  # bool [k, j, i]
    core_hu: float
    background_hu: float
    threshold_hu: float

    @property
    def n_voxels(self) -> int:
        return int(self.mask.sum())

    def voxels_kji(self) -> np.ndarray:
        """(n, 3) voxel indices (k, j, i) of the mask on the full series grid."""
        return np.argwhere(self.mask) + np.asarray(self.offset)[None, :]

    def slices(self) -> list[int]:
        k0 = self.offset[0]
        return [k0 + int(k) for k in np.nonzero(self.mask.any(axis=(1, 2)))[0]]


def _disk(radius_mm: float, di: float, dj: float) -> np.ndarray:
    ri, rj = int(np.ceil(radius_mm / di)), int(np.ceil(radius_mm / dj))
    jj, ii = np.ogrid[-rj:rj + 1, -ri:ri + 1]
    return (ii * di) ** 2 + (jj * dj) ** 2 <= radius_mm ** 2


def segment_nodule(series: Series, f: Finding, margin_mm: float = MARGIN_MM) -> NoduleMask | None:
    """Half-maximum region growing of one nodule inside its box (+ margin), connected to its centre."""
    if f.bbox_vox is None or f.center_mm is None or not f.diameter_mm:
        return None
    di, dj, dk = (float(s) for s in series.spacing)
    nk, nj, ni = series.shape
    b = np.asarray(f.bbox_vox, dtype=int)  # i0, j0, k0, i1, j1, k1 (inclusive)
    mi, mj, mk = (int(np.ceil(margin_mm / s)) for s in (di, dj, dk))
    # the box the mask may occupy ...
    lo = np.maximum([b[2] - mk, b[1] - mj, b[0] - mi], 0)
    hi = np.minimum([b[5] + mk, b[4] + mj, b[3] + mi], [nk - 1, nj - 1, ni - 1])
    # ... and a wider context for the background and the pleura (rolling disc wider than the nodule)
    r = 0.5 * float(f.diameter_mm)
    ctx_mm = max(1.3 * r + 2.0, 6.0) + 4.0
    ci_, cj_, ck_ = (int(np.ceil(ctx_mm / s)) for s in (di, dj, dk))
    clo = np.maximum(lo - [ck_, cj_, ci_], 0)
    chi = np.minimum(hi + [ck_, cj_, ci_], [nk - 1, nj - 1, ni - 1])
    roi = series.pixels[clo[0]:chi[0] + 1, clo[1]:chi[1] + 1, clo[2]:chi[2] + 1].astype(np.float32)
    sigma = [min(0.8, 0.6 / s) for s in (dk, dj, di)]
    sm = ndi.gaussian_filter(roi, sigma, mode="nearest")
    c = series.mm_to_vox(np.asarray(f.center_mm, dtype=float))  # (i, j, k)
    ck = np.array([c[2], c[1], c[0]]) - clo
    cidx = tuple(int(v) for v in np.clip(np.round(ck), 0, np.array(sm.shape) - 1))
    K, J, I_ = np.ogrid[:sm.shape[0], :sm.shape[1], :sm.shape[2]]
    dist2 = ((K - ck[0]) * dk) ** 2 + ((J - ck[1]) * dj) ** 2 + ((I_ - ck[2]) * di) ** 2
    inner = dist2 <= max(0.5 * r, 1.2 * max(di, dj)) ** 2
    core = float(np.percentile(np.minimum(sm, 150.0)[inner], 60)) if inner.any() else float(sm[cidx])
    air = sm < -400.0
    # lung side of the pleura, slice by slice
    disk = _disk(max(1.3 * r + 2.0, 6.0), di, dj)
    pad = max(disk.shape) // 2 + 1
    lung = np.empty_like(air)
    for k in range(air.shape[0]):
        a = np.pad(air[k], pad, mode="edge")
        lung[k] = ndi.binary_fill_holes(ndi.binary_closing(a, structure=disk)[pad:-pad, pad:-pad]) | air[k]
    bg_vals = sm[air & lung & (dist2 > (1.5 * r) ** 2)]
    if bg_vals.size < 20:
        bg_vals = sm[air]
    bg = float(np.median(bg_vals)) if bg_vals.size else -850.0
    if core - bg < 50.0:
        log.info("no contrast to segment %s (core %.0f HU, background %.0f HU)", f.id, core, bg)
        return None
    thr = bg + 0.5 * (core - bg)
    allowed = np.zeros(sm.shape, dtype=bool)
    s0, s1 = lo - clo, hi - clo
    allowed[s0[0]:s1[0] + 1, s0[1]:s1[1] + 1, s0[2]:s1[2] + 1] = True
    obj = (sm > thr) & lung & allowed
    lab, n = ndi.label(obj)
    if n == 0:
        return None
    cid = int(lab[cidx])
    if cid == 0:  # centre fell between voxels of a thin or irregular nodule: the component nearest to it
        ids = lab[inner & (lab > 0)]
        if ids.size == 0:
            near = np.argwhere(lab > 0)
            d = (((near - ck) * [dk, dj, di]) ** 2).sum(1)
            if d.min() > (0.5 * r + max(di, dj, dk)) ** 2:
                return None
            cid = int(lab[tuple(near[int(np.argmin(d))])])
        else:
            cid = int(np.bincount(ids).argmax())
    m = (lab == cid)[s0[0]:s1[0] + 1, s0[1]:s1[1] + 1, s0[2]:s1[2] + 1]
    return NoduleMask(f.id, (int(lo[0]), int(lo[1]), int(lo[2])), m, round(core, 1), round(bg, 1), round(thr, 1))


# ---------------------------------------------------------------------------------------------- sources


def read_source_datasets(study: Study, series: Series) -> list[Dataset]:
    """The series' DICOM datasets (headers only), re-read from where the study was loaded, in slice order."""
    import pydicom

    from tools.dicom_io import expanded

    if not study.source:
        raise ToolError("The study's source files are not known, so DICOM SR/SEG cannot reference them.")
    wanted = set(series.instance_uids)
    found: dict[str, Dataset] = {}
    try:
        with expanded(study.source) as paths:
            for p in paths:
                try:
                    ds = pydicom.dcmread(p, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - not DICOM / not ours: skipped
                    continue
                uid = str(ds.get("SOPInstanceUID", ""))
                if uid in wanted and str(ds.get("SeriesInstanceUID", "")) == series.series_uid:
                    found[uid] = ds
    except ToolError:
        raise
    except Exception as exc:  # noqa: BLE001 - source gone (temporary folder, PACS cache)
        raise ToolError(f"The study's source files could not be re-read for DICOM export "
                        f"({type(exc).__name__}).") from exc
    order = list(dict.fromkeys(series.instance_uids))
    missing = [u for u in order if u not in found]
    if missing:
        raise ToolError(f"{len(missing)} of the series' {len(order)} images are no longer at the study's source; "
                        "DICOM SR/SEG not written.")
    return [found[u] for u in order]


# ---------------------------------------------------------------------------------------------- codes


def _site(f: Finding):  # -> highdicom.sr.FindingSite
    from highdicom.sr import FindingSite
    from pydicom.sr.codedict import codes

    loc = {"upper": codes.SCT.UpperZoneOfLung, "middle": codes.SCT.MiddleZoneOfLung,
           "lower": codes.SCT.LowerZoneOfLung}.get(f.zone or "", codes.SCT.Lung)
    lat = {"right": codes.SCT.Right, "left": codes.SCT.Left}.get(f.side or "")
    return FindingSite(anatomic_location=loc, laterality=lat)


def _type_code(f: Finding):  # -> pydicom Code
    from pydicom.sr.codedict import codes

    return codes.SCT.Mass if f.kind == "mass" else codes.SCT.Nodule


# ---------------------------------------------------------------------------------------------- SEG


@dataclass
class SegResult:
    dataset: Dataset
    segment_of: dict[str, int]  # finding id -> segment number
    slices_of: dict[str, list[int]]  # finding id -> slice indices k that hold its mask
    tracking_uid: dict[str, str]


def build_seg(series: Series, sources: list[Dataset], findings: list[Finding], masks: dict[str, NoduleMask],
              tracking_uid: dict[str, str]) -> SegResult:
    import highdicom as hd
    from highdicom.seg import Segmentation, SegmentDescription
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    todo = [f for f in findings if f.id in masks and masks[f.id].n_voxels > 0]
    if not todo:
        raise ToolError("No nodule mask to export.")
    multi = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1
    ks = sorted({k for f in todo for k in masks[f.id].slices()})
    nk, nj, ni = series.shape
    src = sources if multi else [sources[k] for k in ks]
    kpos = list(range(nk)) if multi else ks
    arr = np.zeros((len(kpos), nj, ni, len(todo)), dtype=bool)
    index = {k: n for n, k in enumerate(kpos)}
    for s, f in enumerate(todo):
        m = masks[f.id]
        for k, j, i in m.voxels_kji():
            arr[index[int(k)], int(j), int(i), s] = True
    algo = hd.AlgorithmIdentificationSequence(
        name="radassist half-maximum region growing", family=codes.cid7162.NeighborhoodAnalysis,
        version=software_version(),
        parameters={"threshold": "half maximum between local parenchyma and nodule core",
                    "margin_mm": f"{MARGIN_MM:g}"})
    descs = [SegmentDescription(
        segment_number=s + 1, segment_label=f"{f.id} {f.kind}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=_type_code(f), algorithm_type="AUTOMATIC", algorithm_identification=algo,
        tracking_uid=tracking_uid[f.id], tracking_id=f.id, anatomic_regions=[codes.SCT.Lung])
        for s, f in enumerate(todo)]
    seg = Segmentation(
        source_images=src, pixel_array=arr, segmentation_type="BINARY", segment_descriptions=descs,
        series_instance_uid=generate_uid(), series_number=901, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
        software_versions=software_version(), device_serial_number="0",
        content_description="radassist nodule masks (decision support)",
        content_label="NODULES", omit_empty_frames=True)
    return SegResult(seg, {f.id: s + 1 for s, f in enumerate(todo)},
                     {f.id: masks[f.id].slices() for f in todo}, tracking_uid)


# ---------------------------------------------------------------------------------------------- SR


def _size_measurements(f: Finding) -> list[Any]:
    """The finding's long axis, short axis and mean diameter (mm) as TID 1500 measurements."""
    from highdicom.sr import Measurement
    from pydicom.sr.codedict import codes

    mm = codes.UCUM.Millimeter
    out = []
    if f.long_axis_mm is not None:
        out.append(Measurement(name=codes.SCT.LongAxis, value=float(f.long_axis_mm), unit=mm))
    if f.short_axis_mm is not None:
        out.append(Measurement(name=codes.SCT.ShortAxis, value=float(f.short_axis_mm), unit=mm))
    if f.diameter_mm is not None:
        out.append(Measurement(name=codes.SCT.Diameter, value=float(f.diameter_mm), unit=mm, derivation=codes.SCT.Mean))
    return out


def _algorithm_and_observer(name: str) -> tuple[Any, Any]:
    """The SR's algorithm identification and its observer context (this software, as a device)."""
    from highdicom.sr import AlgorithmIdentification, DeviceObserverIdentifyingAttributes, ObserverContext
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algo = AlgorithmIdentification(name=name, version=software_version())
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["radassist", software_version()]), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=MODEL_NAME))
    return algo, observer


def build_sr(series: Series, sources: list[Dataset], findings: list[Finding], seg: SegResult,
             title: str = "radassist chest CT nodule measurements") -> Dataset:
    from highdicom.sr import (
        Comprehensive3DSR,
        Measurement,
        MeasurementReport,
        ObservationContext,
        ReferencedSegment,
        SourceImageForSegmentation,
        TrackingIdentifier,
        VolumetricROIMeasurementsAndQualitativeEvaluations,
    )
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algo, observer = _algorithm_and_observer("radassist detector")
    multi = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1
    groups = []
    for f in findings:
        if f.id not in seg.segment_of:
            continue
        if multi:
            refs = [SourceImageForSegmentation(sources[0].SOPClassUID, sources[0].SOPInstanceUID,
                                               [k + 1 for k in seg.slices_of[f.id]])]
        else:
            refs = [SourceImageForSegmentation(sources[k].SOPClassUID, sources[k].SOPInstanceUID)
                    for k in seg.slices_of[f.id]]
        ref_seg = ReferencedSegment(sop_class_uid=seg.dataset.SOPClassUID,
                                    sop_instance_uid=seg.dataset.SOPInstanceUID,
                                    segment_number=seg.segment_of[f.id], source_images=refs)
        site = _site(f)
        meas = _size_measurements(f)
        if f.volume_mm3 is not None:
            meas.append(Measurement(name=codes.SCT.Volume, value=float(f.volume_mm3), unit=codes.UCUM.CubicMillimeter))
        groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=seg.tracking_uid[f.id], identifier=f.id),
            referenced_segment=ref_seg, finding_type=_type_code(f), finding_sites=[site], algorithm_id=algo,
            measurements=meas))
    if not groups:
        raise ToolError("No measured nodule to put in the SR.")
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("24627-2", "LN", "CT Chest"), imaging_measurements=groups)
    sr = Comprehensive3DSR(
        evidence=[*sources, seg.dataset], content=report, series_instance_uid=generate_uid(), series_number=902,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description=title[:64])
    return sr


# ---------------------------------------------------------------------------------------------- API


@dataclass
class ExportResult:
    paths: dict[str, Path]  # "sr" / "seg" -> file
    masks: dict[str, NoduleMask]
    exported_ids: list[str]
    notes: list[str]


def export_dicom(study: Study, findings: list[Finding], out_dir: Path, formats: tuple[str, ...] = ("sr", "seg"),
                 stem: str = "report") -> ExportResult:
    """Write ``<stem>.seg.dcm`` and/or ``<stem>.sr.dcm`` for the measured findings of ``study``.

    The SR's measurement groups reference the SEG's segments, so asking for "sr" writes the SEG too.
    """
    from pydicom.uid import generate_uid

    series = study.primary
    notes: list[str] = []
    lesions = [f for f in findings if f.diameter_mm and f.bbox_vox is not None and f.center_mm is not None
               and (f.series_uid in (None, series.series_uid))]
    masks: dict[str, NoduleMask] = {}
    for f in lesions:
        m = segment_nodule(series, f)
        if m is None or m.n_voxels == 0:
            notes.append(f"{f.id}: no mask at half maximum; left out of the SEG/SR.")
            continue
        masks[f.id] = m
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if not masks:
        notes.append("No measurable nodule: no DICOM SEG/SR written.")
        return ExportResult(paths, masks, [], notes)
    sources = read_source_datasets(study, series)
    tracking = {f.id: generate_uid() for f in lesions if f.id in masks}
    seg = build_seg(series, sources, lesions, masks, tracking)
    p = out_dir / f"{stem}.seg.dcm"
    seg.dataset.save_as(p, enforce_file_format=True)
    paths["seg"] = p
    if "sr" in formats:
        sr = build_sr(series, sources, lesions, seg)
        p = out_dir / f"{stem}.sr.dcm"
        sr.save_as(p, enforce_file_format=True)
        paths["sr"] = p
    if "seg" not in formats:
        notes.append("The SEG was written as well: the SR's measurements reference its segments.")
    log.info("DICOM export: %d nodule(s), %s", len(masks), ", ".join(sorted(paths)))
    return ExportResult(paths, masks, list(seg.segment_of), notes)


# ---------------------------------------------------------------------------------------------- chest films

CHEST_FILM_PROCEDURE = ("399208008", "SCT", "Plain chest X-ray")
_TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                      "ReferringPhysicianName", "StudyDate", "StudyTime")


def build_film_sr(source: Dataset, findings: list[Finding], title: str = "radassist chest film opacities"
                  ) -> Dataset:
    """A TID 1500 measurement report of a chest film's opacities: per opacity a planar ROI group whose region
    is the fitted circle on the film (SCOORD CIRCLE, image coordinates: the top-left corner of the top-left
    pixel is 0,0), with finding type, site (zone and side) and, when the pixel spacing is known, the long
    and short axes and mean diameter in mm (a film measured in pixels carries the circle only)."""
    from highdicom.sr import (
        ComprehensiveSR,
        GraphicTypeValues,
        ImageRegion,
        MeasurementReport,
        ObservationContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from highdicom.sr.coding import CodedConcept
    from pydicom.uid import generate_uid

    algo, observer = _algorithm_and_observer("radassist film detector")
    ref = SourceImageForRegion(referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID)
    groups = []
    for f in findings:
        if f.bbox_px is None:
            continue
        x0, y0, x1, y1 = (float(v) for v in f.bbox_px)
        cx, cy = 0.5 * (x0 + x1) + 0.5, 0.5 * (y0 + y1) + 0.5  # pixel i spans [i, i + 1)
        r = 0.25 * ((x1 - x0 + 1.0) + (y1 - y0 + 1.0))
        region = ImageRegion(graphic_type=GraphicTypeValues.CIRCLE,
                             graphic_data=np.array([[cx, cy], [cx + r, cy]], dtype=float), source_image=ref)
        meas = _size_measurements(f) if f.units == "mm" else []
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=f.id), referenced_region=region,
            finding_type=_type_code(f), finding_sites=[_site(f)], algorithm_id=algo, measurements=meas or None))
    if not groups:
        raise ToolError("No opacity with a position on the film to put in the SR.")
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=CodedConcept(*CHEST_FILM_PROCEDURE), imaging_measurements=groups)
    return ComprehensiveSR(
        evidence=[source], content=report, series_instance_uid=generate_uid(), series_number=902,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description=title[:64])


def export_film_sr(study: Study, findings: list[Finding], out_dir: Path, stem: str = "report") -> ExportResult:
    """Write ``<stem>.sr.dcm`` for the opacities of a chest film (no SEG: a circle on the film is the region)."""
    series = study.primary
    lesions = [f for f in findings if f.bbox_px is not None and not (f.change and f.change.status == "resolved")
               and f.series_uid in (None, series.series_uid)]
    notes: list[str] = []
    if not lesions:
        return ExportResult({}, {}, [], ["No opacity on the film: no DICOM SR written."])
    if Path(str(study.source or "")).suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise ToolError("the film was loaded from an image file (PNG/JPEG), not DICOM, and a DICOM SR must reference "
                        "the DICOM image it measures; load the film as DICOM to send the report to the PACS.")
    source = read_source_datasets(study, series)[0]
    for kw in _TYPE2_FROM_SOURCE:  # a film missing a type-2 attribute the SR copies: present, empty
        if kw not in source:
            setattr(source, kw, "")
    sr = build_film_sr(source, lesions)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / f"{stem}.sr.dcm"
    sr.save_as(p, enforce_file_format=True)
    if any(f.units == "px" for f in lesions):
        notes.append("The film has no pixel spacing: the SR carries each opacity's circle on the film, no sizes in mm.")
    log.info("DICOM film SR: %d opacities", len(lesions))
    return ExportResult({"sr": p}, {}, [f.id for f in lesions], notes)
