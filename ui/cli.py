"""The ``radassist`` command line: a thin shell over the same engine the web UI uses.

User errors print one clear message on stderr and exit non-zero (2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger("radassist")


def _parse_box(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise SystemExit("radassist: --box needs six numbers in mm: x0,y0,z0,x1,y1,z1") from None
    if len(vals) != 6:
        raise SystemExit("radassist: --box needs six numbers in mm: x0,y0,z0,x1,y1,z1")
    lo = [min(vals[i], vals[i + 3]) for i in range(3)]
    hi = [max(vals[i], vals[i + 3]) for i in range(3)]
    return lo + hi


def _parse_clinical(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"radassist: --clinical takes key=value pairs (got {p!r}).")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _print_answer(ans: Any) -> None:
    sys.stdout.write(ans.answer + "\n")
    for f in ans.findings:
        if f.kind == "anatomy":
            sys.stdout.write(f"  [{f.id}] {f.label}: box {f.bbox_mm} mm\n")
        else:
            size = f"{f.diameter_mm:.1f} {f.units}" if f.diameter_mm else "size n/a"
            ch = f", {f.change.status}" if f.change else ""
            sys.stdout.write(f"  [{f.id}] {f.kind}, {f.region}, {size}{ch}, reliability {f.reliability}\n")
    for e in ans.evidence:
        sys.stdout.write(f"  evidence: {e.path} ({e.caption})\n")
    sys.stdout.write(f"thread: {ans.thread_id}\n")


def cmd_ask(a: argparse.Namespace) -> int:
    from agents.engine import Consultant

    c = Consultant()
    ans = c.ask(a.question, study=a.study, prior=a.prior, thread_id=a.thread, box_mm=_parse_box(a.box),
                clinical=_parse_clinical(a.clinical))
    if a.json:
        out = ans.model_dump(mode="json", exclude={"steps", "notes"})
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        _print_answer(ans)
    return 0


def cmd_phantom(a: argparse.Namespace) -> int:
    from tools.phantom import write_patient

    truth = write_patient(a.outdir, seed=a.seed, size=a.size)
    sys.stdout.write(f"wrote phantom patient seed {a.seed} ({len(truth['nodules'])} nodules) to {a.outdir}: "
                     f"prior/, current/, truth.json\n")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from agents.engine import Consultant

    c = Consultant()
    for src in a.paths:
        for rec in c.store.import_path(src):
            sys.stdout.write(f"imported {rec.study_uid} {rec.study_date} {rec.modality} {rec.description}\n")
    return 0


def cmd_studies(a: argparse.Namespace) -> int:
    from agents.engine import Consultant

    c = Consultant()
    for rec in c.store.list_studies():
        sys.stdout.write(f"{rec.study_date}\t{rec.modality}\t{rec.study_uid}\t{rec.description}\n")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ui.app import launch_demo

    launch_demo(host=a.host, port=a.port, auth_file=a.auth, pacs_url=a.pacs)
    return 0


def cmd_prognosis_train(a: argparse.Namespace) -> int:
    from tools.prognosis import train_cohort

    card = train_cohort(a.csv, a.time, a.event, name=a.name, features=a.features, time_unit=a.time_unit,
                        cancer=a.cancer)
    if a.json:
        sys.stdout.write(json.dumps(card, default=str) + "\n")
    else:
        sys.stdout.write(f"registered model '{card.get('name')}': N={card.get('n')}, events={card.get('events')}, "
                         f"cross-validated C-index {json.dumps(card.get('cv_c_index', card.get('c_index')))}\n")
    return 0


def cmd_prognosis_models(a: argparse.Namespace) -> int:
    from tools.prognosis import list_models

    for card in list_models():
        sys.stdout.write(json.dumps(card, default=str) + "\n")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from models.registry import doctor_report

    rows = doctor_report()
    if a.json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        for r in rows:
            sys.stdout.write(f"{r['role']:13} {r['uses']:45} {r['why']}\n")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from agents.bench import run_bench

    table = run_bench(seeds=a.seeds, size=a.size, out=a.out, only=a.only)
    sys.stdout.write(table + "\n")
    return 0


def _seed_list(items: list[str]) -> list[int]:
    """Seeds as numbers or inclusive ranges ("5000-5011")."""
    out: list[int] = []
    for it in items:
        lo, _, hi = it.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def cmd_verifier(a: argparse.Namespace) -> int:
    from tools import verifier_calibrate as vc

    cache = Path(a.cache) if a.cache else None
    if a.vcmd == "calibrate":
        cal = vc.calibrate(_seed_list(a.seeds) if a.seeds else vc.CALIBRATION_SEEDS, size=a.size,
                           out=Path(a.out) if a.out else None, cache_dir=cache, reuse_any=a.reuse_any)
        res: dict[str, Any] = {"seeds": cal.seeds, "detector": cal.detector,
                               "models": {k: {"features": m.features, "n": m.n, "n_wrong": m.n_wrong}
                                          for k, m in cal.models.items()}, "fit": cal.fit_metrics["all"]}
    else:
        res = vc.evaluate(_seed_list(a.seeds) if a.seeds else vc.EVALUATION_SEEDS, size=a.size, cache_dir=cache,
                          reuse_any=a.reuse_any)
    sys.stdout.write(json.dumps(res, indent=1, default=str) + "\n")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from tools.dicom_io import load_study
    from tools.report_writer import ReportRequest, write_report

    current = load_study(a.study)
    prior = load_study(a.prior) if a.prior else None
    res = write_report(current, prior, ReportRequest(out_dir=Path(a.out), formats=("md", "txt", "sr", "seg")))
    for note in res.notes:
        sys.stderr.write(f"radassist: {note}\n")
    if a.json:
        out = {"report": res.report.model_dump(mode="json"), "files": res.report.files,
               "findings": [f.model_dump(mode="json") for f in res.findings], "notes": res.notes}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        for path in res.report.files.values():
            sys.stdout.write(f"{path}\n")
    return 0


def cmd_deid(a: argparse.Namespace) -> int:
    from tools.deid import deidentify_files

    rep = deidentify_files(a.source, a.out, seed=a.seed)
    for why in rep.refused:
        sys.stderr.write(f"radassist: not exported: {why}\n")
    sys.stdout.write(f"wrote {rep.written} de-identified file(s) to {rep.out_dir} (PS3.15 basic profile); "
                     f"{len(rep.refused)} refused, {rep.skipped} non-DICOM skipped\n")
    return 0 if rep.written else 2


def quiet_third_party() -> None:
    """pydicom's validation warnings can quote header values (names, ids): keep them out of logs."""
    import warnings

    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radassist", description=(
        "Evidence-grounded assistant for chest imaging (decision support, not diagnosis)."))
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ask", help="ask a question about a study")
    s.add_argument("question")
    s.add_argument("--study", help="current study: DICOM folder, zip, file, or PNG/JPEG radiograph")
    s.add_argument("--prior", help="prior study (default: looked up in the study store)")
    s.add_argument("--thread", help="conversation id, to continue a conversation")
    s.add_argument("--box", help="region-to-text: a box x0,y0,z0,x1,y1,z1 in patient mm (LPS)")
    s.add_argument("--clinical", nargs="*", help="clinical features key=value (age=67 karnofsky=60 ...)")
    s.add_argument("--json", action="store_true", help="print one JSON object (the answer contract)")
    s.set_defaults(fn=cmd_ask)

    s = sub.add_parser("phantom", help="write a phantom chest-CT patient (prior + current) with truth.json")
    s.add_argument("outdir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", choices=["small", "full"], default="small")
    s.set_defaults(fn=cmd_phantom)

    s = sub.add_parser("import", help="import DICOM studies into the local study store")
    s.add_argument("paths", nargs="+")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("deid", help="research export: a de-identified copy of DICOM files (PS3.15 basic profile)")
    s.add_argument("source", help="DICOM folder, zip or file")
    s.add_argument("out", help="folder for the de-identified files")
    s.add_argument("--seed", help="pseudonymisation seed (same seed, same pseudonyms and date shift)")
    s.set_defaults(fn=cmd_deid)

    s = sub.add_parser("studies", help="list the studies in the local store")
    s.set_defaults(fn=cmd_studies)

    s = sub.add_parser("demo", help="start the web UI with the bundled demo patient (no browser opened)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--auth", help="users file (user:sha256-hash lines); required beyond localhost")
    s.add_argument("--pacs", help="DICOMweb root of a PACS, e.g. http://pacs:8042/dicom-web "
                                  "(default: $RADASSIST_PACS_URL)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("prognosis", help="survival models: train on a site cohort, list model cards")
    psub = s.add_subparsers(dest="pcmd", required=True)
    t = psub.add_parser("train", help="fit, cross-validate and register a model on a cohort CSV")
    t.add_argument("csv")
    t.add_argument("--time", required=True, help="follow-up time column")
    t.add_argument("--event", required=True, help="event column (1 = death/event, 0 = censored)")
    t.add_argument("--name", help="model name (default: the file name)")
    t.add_argument("--features", nargs="*", help="feature columns (default: all other columns)")
    t.add_argument("--time-unit", default="days", choices=["days", "months", "years"])
    t.add_argument("--cancer", help="lung | brain | other")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_prognosis_train)
    m = psub.add_parser("models", help="print every model card (JSON lines)")
    m.set_defaults(fn=cmd_prognosis_models)

    s = sub.add_parser("doctor", help="show which model each role uses and why (probes configured servers)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_doctor)

    s = sub.add_parser("report", help="write the structured report (Markdown, text, DICOM SR and SEG)")
    s.add_argument("--study", required=True, help="current chest CT: DICOM folder, zip or files")
    s.add_argument("--prior", help="prior study to compare with (default: none)")
    s.add_argument("--out", required=True, help="folder for report.md, report.txt, report.sr.dcm, report.seg.dcm")
    s.add_argument("--json", action="store_true", help="print the report, its files and findings as one JSON object")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("verifier", help="calibrate / evaluate the reliability index on phantom patients")
    vsub = s.add_subparsers(dest="vcmd", required=True)
    for name, what in (("calibrate", "fit the calibration (default seeds 5000-5063) and write "
                                     "tools/verifier_calibration.json"),
                       ("evaluate", "AUC, ECE and cost on held-out phantoms (default seeds 6000-6011)")):
        v = vsub.add_parser(name, help=what)
        v.add_argument("--seeds", nargs="*", help="seeds or ranges, e.g. 5000-5011")
        v.add_argument("--size", choices=["small", "full"], default="small")
        v.add_argument("--cache", help="folder to keep per-seed units in (re-used while the detector is unchanged)")
        v.add_argument("--reuse-any", action="store_true",
                       help="re-use cached units even from an earlier detector version (each seed records its own)")
        if name == "calibrate":
            v.add_argument("--out", help="write the calibration here instead of the packaged file")
        v.set_defaults(fn=cmd_verifier)

    s = sub.add_parser("bench", help="run the phantom benchmark and print a table")
    s.add_argument("--seeds", type=int, nargs="*", default=list(range(1000, 1008)))
    s.add_argument("--size", choices=["small", "full"], default="small")
    s.add_argument("--only", nargs="*", help="rows to run (default all): detector comparer report routing turn "
                   "prognosis scale verifier radiograph load fuzz deid")
    s.add_argument("--out", default="bench-out")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from tools.errors import RadAssistError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    from tools.deid import install_log_scrubber

    install_log_scrubber()  # no identifier of a loaded study ever reaches a log line
    try:
        return int(args.fn(args) or 0)
    except RadAssistError as exc:
        sys.stderr.write(f"radassist: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
