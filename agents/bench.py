"""``radassist bench``: the phantom benchmark. Speed, memory and accuracy are measured here, never in tests.

Rows (each issue adds its own):
- detector: nodule sensitivity (>= 5 mm), false positives per scan, mean |diameter error|, side+zone
  accuracy, anatomy box IoU, runtime per scan — on phantom seeds the tests do not use;
- comparer: change-status accuracy, target registration error at the nodules, diameter-change error;
- routing: tool-choice accuracy on a labelled set of phrasings that are not the router's exemplars;
- turn: end-to-end latency of a cold and a warm turn through the engine, peak memory;
- verifier: AUC of the reliability for predicting a wrong answer unit, ECE, wrong answers rated high,
  cost as a ratio to the answer's own, on held-out phantom seeds (6000+; calibration uses 5000+);
- radiograph: lung-field box IoU, cardiothoracic ratio error, opacities >= 10 mm found and false positives
  per film, change status on pairs — on DRR pairs projected from phantom seeds 20-29 (not the tests').
"""
from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Held-out phrasings (not router exemplars) with the tool set each needs.
ROUTING_SET: list[tuple[str, set[str]]] = [
    ("Are there pulmonary nodules?", {"detector"}),
    ("Any nodule in the RUL?", {"detector"}),
    ("Please look for masses in the left lung", {"detector"}),
    ("Is there a lesion at the right base?", {"detector"}),
    ("Can you spot any spots on the lungs?", {"detector"}),
    ("What's the size of the largest nodule?", {"detector"}),
    ("Where's the aorta?", {"detector"}),
    ("Show me where the trachea is", {"detector"}),
    ("Describe the right mid zone", {"detector"}),
    ("What do you see at the left apex?", {"detector"}),
    ("Compare this scan with the previous one", {"comparer"}),
    ("Has anything changed since the last CT?", {"comparer"}),
    ("Did the nodule in the left lower lobe grow?", {"comparer"}),
    ("Are there new nodules compared to before?", {"comparer"}),
    ("Which lesions have gone away?", {"comparer"}),
    ("Draft the report please", {"report_writer"}),
    ("Can you write up the findings in a structured report?", {"report_writer"}),
    ("What's the likely survival for this patient?", {"prognosis"}),
    ("Estimate the prognosis, 70 year old, Karnofsky 80", {"prognosis"}),
    ("How confident are you in that?", {"verifier"}),
    ("Is that measurement reliable?", {"verifier"}),
    ("Find the nodules, compare with the prior and write the report", {"detector", "comparer", "report_writer"}),
    ("Localize the lesions and compare with the last study", {"detector", "comparer"}),
    ("Compare with the old scan and then draft a report", {"comparer", "report_writer"}),
    ("Is there any pneumothorax on this film?", {"vlm"}),
    ("Do you see fluid in the pleural space?", {"vlm"}),
    ("Describe this image for me", {"vlm"}),
    ("Are there signs of emphysema?", {"vlm"}),
    ("Is the endotracheal tube well placed?", {"vlm"}),
    ("Any collapsed lung?", {"vlm"}),
    ("What's the weather in Paris?", set()),
    ("Recommend a chemotherapy regimen", set()),
    ("Write a limerick", set()),
    ("Hi there", set()),
]


def routing_accuracy() -> dict[str, Any]:
    from agents.router import route

    t0 = time.perf_counter()
    route("warm up")
    warm = time.perf_counter() - t0
    ok = 0
    wrong: list[str] = []
    t1 = time.perf_counter()
    for q, tools in ROUTING_SET:
        got = {c.tool for c in route(q).calls}
        if got == tools:
            ok += 1
        else:
            wrong.append(f"{q!r}: got {sorted(got)}, want {sorted(tools)}")
    per_q = (time.perf_counter() - t1) / len(ROUTING_SET)
    return {"accuracy": ok / len(ROUTING_SET), "n": len(ROUTING_SET), "wrong": wrong,
            "load_s": warm, "per_question_ms": per_q * 1000}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def turn_latency(seed: int, size: str, workdir: Path) -> dict[str, Any]:
    from agents.engine import Consultant
    from tools.cache import CACHE
    from tools.phantom import write_patient

    pdir = workdir / f"turn{seed}"
    write_patient(pdir, seed=seed, size=size)
    CACHE.clear()
    c = Consultant(home_dir=workdir / "home")
    t0 = time.perf_counter()
    a1 = c.ask("Show me all pulmonary nodules", study=pdir / "current", prior=pdir / "prior")
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    c.ask("how big is it?", thread_id=a1.thread_id)
    warm = time.perf_counter() - t1
    t2 = time.perf_counter()
    c.ask("compare with the prior", thread_id=a1.thread_id)
    compare = time.perf_counter() - t2
    return {"cold_s": cold, "warm_followup_s": warm, "compare_s": compare, "peak_rss_mb": _peak_mb()}


def comparer_accuracy(seeds: list[int], size: str, workdir: Path) -> dict[str, Any]:
    from tools.cache import CACHE
    from tools.comparer import CompareRequest, compare_studies, register
    from tools.dicom_io import load_study
    from tools.phantom import write_patient

    correct = total = 0
    tre: list[float] = []
    dchange: list[float] = []
    times: list[float] = []
    wrong: list[str] = []
    for seed in seeds:
        pdir = workdir / f"cmp{seed}"
        truth = write_patient(pdir, seed=seed, size=size)
        cur, pri = load_study(pdir / "current"), load_study(pdir / "prior")
        CACHE.clear()
        t0 = time.perf_counter()
        res = compare_studies(cur, pri, CompareRequest())
        times.append(time.perf_counter() - t0)
        reg = register(cur.primary, pri.primary)
        for n in truth["nodules"]:
            if n["current"] and n["prior"]:
                mapped = np.array(reg.prior_to_current(n["prior"]["center_mm"]))
                tre.append(float(np.linalg.norm(mapped - np.array(n["current"]["center_mm"]))))
            size_ref = max((n["current"] or n["prior"])["diameter_mm"], 0)
            if size_ref < 5:
                continue
            total += 1
            want = n["fate"]
            got = None
            for f in res.findings:
                if want == "resolved":
                    if f.change and f.change.status == "resolved" and f.change.prior_center_mm and np.linalg.norm(
                            np.array(f.change.prior_center_mm) - np.array(n["prior"]["center_mm"])) <= max(
                            3.0, n["prior"]["diameter_mm"] / 2):
                        got = "resolved"
                elif f.center_mm and np.linalg.norm(np.array(f.center_mm) - np.array(n["current"]["center_mm"])) <= max(
                        3.0, n["current"]["diameter_mm"] / 2):
                    got = f.change.status if f.change else None
                    if f.change and f.change.prior_diameter_mm and n["prior"]:
                        dchange.append(abs(((f.diameter_mm or 0) - f.change.prior_diameter_mm)
                                           - (n["current"]["diameter_mm"] - n["prior"]["diameter_mm"])))
            correct += int(got == want)
            if got != want:
                ref = n["current"] or n["prior"]
                wrong.append(f"seed {seed}: {ref['diameter_mm']:.1f} mm truth {want}, called {got or 'not found'}"
                             + (" (juxtapleural)" if n.get("juxtapleural") else "")
                             + (" (juxtavascular)" if n.get("juxtavascular") else ""))
    return {"change_accuracy": correct / total if total else float("nan"), "n": total, "wrong": wrong,
            "tre_mean_mm": float(np.mean(tre)) if tre else float("nan"),
            "tre_max_mm": float(np.max(tre)) if tre else float("nan"),
            "diameter_change_err_mm": float(np.mean(dchange)) if dchange else float("nan"),
            "runtime_s": float(np.mean(times)) if times else float("nan")}


def full_volume_cost(seed: int, workdir: Path) -> dict[str, Any]:
    """Detector cost on a full-size CT (~512x512x300) as a ratio to decoding the series, with peak memory."""
    from tools.cache import CACHE, cached_study
    from tools.detector import analyze_series
    from tools.dicom_io import load_study
    from tools.phantom import write_patient

    pdir = workdir / f"full{seed}"
    write_patient(pdir, seed=seed, size="full")
    CACHE.clear()
    t0 = time.perf_counter()
    study = load_study(pdir / "current")
    decode = time.perf_counter() - t0
    t1 = time.perf_counter()
    a = analyze_series(study.primary)
    analyse = time.perf_counter() - t1
    out: dict[str, Any] = {"shape": list(study.primary.shape), "decode_s": decode, "analyse_s": analyse,
                           "ratio": analyse / decode if decode else float("nan"), "nodules": len(a.nodules),
                           "peak_rss_mb": _peak_mb()}
    # the comparer's issue asks for a cold "compare with the prior" turn on a full-size pair, and a warm
    # follow-up on the same pair (what the cache keeps: volumes, analyses, the registration)
    from agents.engine import Consultant

    CACHE.clear()
    c = Consultant(home_dir=workdir / "full_home")
    t2 = time.perf_counter()
    ans = c.ask("compare with the prior", study=pdir / "current", prior=pdir / "prior")
    out["compare_cold_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    c.ask("how much has the biggest one changed?", thread_id=ans.thread_id)
    out["compare_warm_s"] = time.perf_counter() - t3
    out["compare_peak_rss_mb"] = _peak_mb()
    out["prior_shape"] = list(cached_study(pdir / "prior").primary.shape)  # loaded by the turn: no second decode
    return out


def load_check(ns: list[int], size: str, workdir: Path, turns: int = 2) -> list[dict[str, Any]]:
    """N simulated clinicians at once through gradio_client against a launched app (embedded default).

    Each client opens its own conversation on the demo patient and asks ``turns`` region questions; the
    app's queue bounds concurrency, so latency grows with N while errors should stay at zero.
    """
    import socket
    import threading

    from gradio_client import Client

    from agents.engine import Consultant
    from tools.phantom import write_patient
    from ui.app import build_app

    pdir = workdir / "load_patient"
    write_patient(pdir, seed=4242, size=size)
    c = Consultant(home_dir=workdir / "load_home")
    recs = c.store.import_path(pdir / "current") + c.store.import_path(pdir / "prior")
    uid = max(recs, key=lambda r: r.study_date or "").study_uid
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    demo = build_app(c)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    questions = ["is there a nodule in the right upper lobe?", "and the left one?", "where is the heart?"]
    rows: list[dict[str, Any]] = []
    try:
        Client(url, download_files=False, verbose=False).predict("where is the heart?", uid, "", api_name="/ask")
        for n in ns:
            lat: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()

            def clinician(i: int) -> None:
                cl = Client(url, download_files=False, verbose=False)
                tid = ""
                for t in range(turns):
                    t0 = time.perf_counter()
                    try:
                        ans = cl.predict(questions[(i + t) % len(questions)], uid, tid, api_name="/ask")
                        tid = ans["thread_id"]
                        with lock:
                            lat.append(time.perf_counter() - t0)
                    except Exception as exc:  # noqa: BLE001 - counted, not raised
                        with lock:
                            errors.append(type(exc).__name__)

            t_start = time.perf_counter()
            threads = [threading.Thread(target=clinician, args=(i,)) for i in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=900)
            from tools.cache import CACHE

            cs = CACHE.stats()
            rows.append({"n": n, "turns": n * turns, "errors": len(errors), "wall_s": time.perf_counter() - t_start,
                         "p50_s": float(np.percentile(lat, 50)) if lat else float("nan"),
                         "p95_s": float(np.percentile(lat, 95)) if lat else float("nan"),
                         "rss_mb": _peak_mb(), "cache_cap_mb": cs["max_bytes"] / 1024**2,
                         "cache_peak_mb": cs["peak_bytes"] / 1024**2, "evictions": cs["evictions"],
                         "gate_peak_active": c.gate.peak_active, "gate_peak_waiting": c.gate.peak_waiting})
    finally:
        demo.close()
    return rows


def deid_leak_scan(workdir: Path, size: str) -> dict[str, Any]:
    """An embedded session (detector, comparer, report) on a phantom with DEBUG logging to a file: count the
    phantom's identifiers in the log, the audit log, and the scrubbed form of what a served model would get."""
    from agents.engine import Consultant
    from tools.deid import install_log_scrubber, scrub_payload
    from tools.phantom import write_patient

    pdir = workdir / "deid_patient"
    truth = write_patient(pdir, seed=4343, size=size)
    import pydicom

    ds = pydicom.dcmread(next((pdir / "current").glob("*.dcm")), stop_before_pixels=True)
    name = str(ds.PatientName)
    ids = [w for w in name.replace("^", " ").split() if len(w) > 2] + [str(ds.PatientID), str(ds.PatientBirthDate),
                                                                        str(ds.AccessionNumber)]
    install_log_scrubber()
    logf = workdir / "deid_session.log"
    h = logging.FileHandler(logf)
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        c = Consultant(home_dir=workdir / "deid_home")
        a = c.ask("Show me all pulmonary nodules", study=pdir / "current", prior=pdir / "prior")
        b = c.ask("compare with the prior", thread_id=a.thread_id)
        r = c.ask(f"write the report for {name.replace('^', ' ')} ({ds.PatientID})", thread_id=a.thread_id)
    finally:
        root.removeHandler(h)
        root.setLevel(old)
        h.close()
    outgoing = json.dumps(scrub_payload({"messages": [{"role": "user", "content": x.answer} for x in (a, b, r)]
                                         + [{"role": "user", "content": f"{name} {ds.PatientID}"}]}))
    texts = {"log": logf.read_text(), "audit": c.audit.path.read_text(), "request": outgoing}
    leaks = {k: sum(v.lower().count(i.lower()) for i in ids) for k, v in texts.items()}
    return {"patient": truth.get("patient_id"), "log_lines": texts["log"].count("\n"),
            "audit_lines": texts["audit"].count("\n"), "leaks": leaks, "audit_chain_ok": c.audit.verify()}


def verifier_rows(seeds: list[int] | None, size: str) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The verifier's evaluation on held-out phantoms (tools.verifier_calibrate) as bench rows."""
    from tools.verifier_calibrate import EVALUATION_SEEDS, evaluate

    ev_seeds = [s for s in (seeds or []) if s >= 6000] or EVALUATION_SEEDS
    r = evaluate(ev_seeds, size=size)
    a, c, mix = r["all"], r["cost"], r["mix"]

    def f(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    per_kind = "; ".join(f"{k} {f(r[k].get('auc_wrong'), '.2f')} ({r[k].get('n_wrong', 0)}/{r[k].get('n', 0)} wrong)"
                         for k in ("finding", "region", "change"))
    rows = [("verifier", f"AUC for a wrong answer unit (seeds {ev_seeds[0]}-{ev_seeds[-1]})",
             f"{f(a.get('auc_wrong'))} ({a['n_wrong']} wrong of {a['n']}; {per_kind})"),
            ("verifier", "expected calibration error", f(a.get("ece"))),
            ("verifier", "wrong answers rated high", f(a.get("wrong_rated_high"), ".2f")
             + f"; correct rated high {f(a.get('correct_rated_high'), '.2f')}"),
            ("verifier", "cost / answer cost (detect; compare)",
             f"{f(c['detect_ratio'], '.2f')}x ({c['detect_verify_s']:.1f} s / {c['detect_answer_s']:.1f} s); "
             f"{f(c['compare_ratio'], '.2f')}x"),
            ("verifier", "case mix", f"{mix['scans']} scans ({mix['low_dose_scans']} low-dose), "
                                     f"{mix['truth_nodules']} nodules")]
    return r, rows


REPORT_SEEDS = [300, 301, 302, 303]  # phantom patients the report tests do not use


def report_rows(seeds: list[int] | None, size: str, workdir: Path
                ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The report writer on phantom pairs (tools.report_writer.evaluate_reports): finding recall (side, zone,
    size within 1 mm), invented findings, number-check failures, and dciodvfy on the SR and SEG it wrote."""
    import shutil
    import subprocess

    from tools.report_writer import evaluate_reports

    rs = list(seeds or REPORT_SEEDS)
    r = evaluate_reports(rs, size=size, workdir=workdir)
    dcio = shutil.which("dciodvfy")
    errors: list[str] = []
    checked = 0
    for row in r["per_seed"]:
        for kind in ("sr", "seg"):
            path = next((workdir / f"seed{row['seed']}" / "report").glob(f"*.{kind}.dcm"), None)
            if dcio is None or path is None:
                continue
            out = subprocess.run([dcio, str(path)], capture_output=True, text=True, timeout=120)
            checked += 1
            errors += [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    valid = (f"{checked} files, {len(errors)} errors" if dcio else "dciodvfy not installed (highdicom round trip "
             "in the tests)")
    rows = [("report", f"finding recall, >= 5 mm: side, zone, size within 1 mm (seeds {rs[0]}-{rs[-1]})",
             f"{r['recall']:.3f} ({r['mentioned']}/{r['truth_nodules']}; found by the detector "
             f"{r['detected_fraction']:.3f})"),
            ("report", "invented findings / number-check failures",
             f"{r['invented']} of {r['cited_findings']} cited / {r['number_check_failures']}"),
            ("report", "dciodvfy on the SR and SEG", valid)]
    r["dciodvfy_errors"] = errors[:20]
    return r, rows


RADIOGRAPH_SEEDS = list(range(100, 110))  # DRR pairs held out from the film scorer's fit and the tests
RADIOGRAPH_FIT_SEEDS = list(range(20, 30))  # film scorer fitted on these and 40-79 (shown for comparison)


def radiograph_rows(seeds: list[int] | None = None, workdir: Path | None = None,
                    fit_seeds: list[int] | None = None) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Chest radiographs on DRR pairs projected from the CT phantoms (tools.radiograph.evaluate_radiographs):
    lung-field box IoU, cardiothoracic ratio error, opacities >= 10 mm found and false positives per film,
    change status on the pairs. The figures are on ``seeds`` (default: the pairs held out from the opacity
    scorer's fit); the fit's own pairs follow in brackets, so the gap between them is in view."""
    from tools.radiograph import evaluate_radiographs

    sets = {"held_out": list(seeds or RADIOGRAPH_SEEDS), "fitted": list(fit_seeds or RADIOGRAPH_FIT_SEEDS)}
    res: dict[str, Any] = {}
    for name, sd in sets.items():
        r = evaluate_radiographs(sd, workdir=(workdir / name) if workdir is not None else None)
        r.pop("per_seed", None)
        res[name] = {"seeds": sd, **r}

    def f(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    def both(render: Any) -> str:
        return f"{render(res['held_out'])}  [fitted set: {render(res['fitted'])}]"

    h, t = sets["held_out"], sets["fitted"]
    rows = [("radiograph", f"lung-field box IoU, mean / min (held-out seeds {h[0]}-{h[-1]}, {res['held_out']['films']} "
                           f"films; [scorer's fitting seeds {t[0]}-{t[-1]}])",
             both(lambda r: f"{f(r['lung_field_box_iou'])} / {f(r['lung_field_box_iou_min'])}")),
            ("radiograph", "cardiothoracic ratio |error|, mean / max (films where one was measured)",
             both(lambda r: f"{f(r['ctr_abs_error'], '.4f')} / {f(r['ctr_abs_error_max'], '.4f')} "
                            f"({r.get('ctr_measured', 'n/a')})")),
            ("radiograph", "opacities >= 10 mm found: centre in a lung field / all",
             both(lambda r: f"{f(r['sensitivity_ge10mm_in_field'], '.2f')} (n={r['opacities_ge_min_in_field']}) / "
                            f"{f(r['sensitivity_ge10mm_all'], '.2f')} (n={r['opacities_ge_min_all']})")),
            ("radiograph", "opacities >= 10 mm in a lung field found, by conspicuity (model observer d' < 2 / >= 2)",
             both(lambda r: " / ".join(
                 f"{f(v['sensitivity'], '.2f')} (n={v['n']})"
                 for v in r["sensitivity_ge10mm_in_field_by_conspicuity"].values()))),
            ("radiograph", "false positives per film", both(lambda r: f(r["fp_per_film"], ".2f"))),
            ("radiograph", "change status correct (>= 10 mm on either film): all / centre in a lung field",
             both(lambda r: f"{f(r['change_status_accuracy'], '.2f')} (n={r['change_pairs']}) / "
                            f"{f(r.get('change_status_accuracy_in_field'), '.2f')} (n={r.get('change_pairs_in_field')})")),
            ("radiograph", "analysis time per film", both(lambda r: f"{f(r['analysis_s_per_film'], '.1f')} s"))]
    return res, rows


def run_bench(seeds: list[int], size: str = "small", out: str | Path = "bench-out",
              only: list[str] | None = None) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {}
    want = set(only or ["detector", "comparer", "routing", "turn", "prognosis", "load", "scale", "verifier", "fuzz",
                        "deid", "radiograph", "report"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "routing" in want:
            r = routing_accuracy()
            results["routing"] = r
            rows += [("routing", "tool-choice accuracy (held-out phrasings)", f"{r['accuracy']:.3f} (n={r['n']})"),
                     ("routing", "latency per question", f"{r['per_question_ms']:.0f} ms")]
        if "prognosis" in want:
            from tools.prognosis import cross_validate, list_models

            for card in list_models():
                name = card.get("name") or card.get("cohort")
                if not name or card.get("available") is False:
                    continue
                try:
                    cv = cross_validate(name)
                except Exception as exc:  # noqa: BLE001 - an unavailable cohort is a row, not a crash
                    rows.append(("prognosis", f"{name}", f"not available: {exc}"))
                    continue
                results.setdefault("prognosis", {})[name] = cv
                v = cv["variants"][0]
                cox = v["models"].get("cox", {})
                other = {k: m for k, m in v["models"].items() if k != "cox"}
                txt = f"Cox {cox.get('c_index', float('nan')):.3f} {cox.get('c_index_ci95')}"
                for k, m in other.items():
                    txt += f"; {k} {m.get('c_index', float('nan')):.3f}"
                cal = next((c for c in cox.get("calibration_12m", []) if c["risk_group"] == "higher"), None)
                if cal:
                    txt += f"; 12-mo calibration (higher-risk tertile) predicted {cal['predicted']:.2f} vs " \
                           f"observed {cal['observed_km']:.2f}"
                rows.append(("prognosis", f"5-fold CV C-index, {name} (N={v['n']})", txt))
        if "detector" in want:
            from tools.evaluate import evaluate_detector

            d = evaluate_detector(seeds, size=size)
            results["detector"] = d
            def num(v: Any, fmt: str) -> str:
                return "n/a" if v is None else format(v, fmt)

            rows += [("detector", "sensitivity, nodules >= 5 mm",
                      f"{d['sensitivity']:.3f} ({d['tp']}/{d['tp'] + d['fn']})"),
                     ("detector", "false positives per scan", f"{d['fp_per_scan']:.2f}"),
                     ("detector", "mean |diameter error|", num(d["mean_abs_diameter_error_mm"], ".2f") + " mm"),
                     ("detector", "side+zone correct", num(d["region_accuracy"], ".3f")),
                     ("detector", "anatomy box IoU (mean over regions)", num(d["mean_anatomy_iou"], ".3f")),
                     ("detector", "runtime per scan", num(d["runtime_s_per_scan"], ".1f") + " s")]
        if "comparer" in want:
            c = comparer_accuracy(seeds, size, work)
            results["comparer"] = c
            rows += [("comparer", "change status correct (>= 5 mm)", f"{c['change_accuracy']:.3f} (n={c['n']})"),
                     ("comparer", "target registration error at nodules", f"{c['tre_mean_mm']:.2f} mm mean, "
                                                                          f"{c['tre_max_mm']:.2f} max"),
                     ("comparer", "diameter-change error", f"{c['diameter_change_err_mm']:.2f} mm"),
                     ("comparer", "runtime per pair", f"{c['runtime_s']:.1f} s")]
        if "turn" in want:
            t = turn_latency(seeds[0], size, work)
            results["turn"] = t
            rows += [("turn", "cold turn (load + detect + verify)", f"{t['cold_s']:.1f} s"),
                     ("turn", "warm follow-up", f"{t['warm_followup_s']:.2f} s"),
                     ("turn", "compare turn", f"{t['compare_s']:.1f} s"),
                     ("turn", "peak RSS", f"{t['peak_rss_mb']:.0f} MB")]
        if "scale" in want:
            fv = full_volume_cost(seeds[0], work)
            results["scale"] = fv
            rows += [("scale", f"detector on {'x'.join(map(str, fv['shape']))} (k,j,i)",
                      f"decode {fv['decode_s']:.1f} s, analysis {fv['analyse_s']:.1f} s "
                      f"({fv['ratio']:.1f}x decode), peak RSS {fv['peak_rss_mb']:.0f} MB"),
                     ("scale", f"compare turn, {'x'.join(map(str, fv['shape']))} vs "
                               f"{'x'.join(map(str, fv['prior_shape']))}",
                      f"cold {fv['compare_cold_s']:.1f} s, warm follow-up {fv['compare_warm_s']:.1f} s, "
                      f"peak RSS {fv['compare_peak_rss_mb']:.0f} MB")]
        if "verifier" in want:
            results["verifier"], vrows = verifier_rows(seeds, size)
            rows += vrows
        if "report" in want:
            results["report"], reprows = report_rows(None, size, work / "reports")
            rows += reprows
        if "radiograph" in want:
            results["radiograph"], rrows = radiograph_rows(workdir=work / "radiograph")
            rows += rrows
        if "load" in want:
            lrows = load_check([1, 2, 4], size, work)
            results["load"] = lrows
            for r in lrows:
                rows.append(("load", f"{r['n']} concurrent clinicians ({r['turns']} turns)",
                             f"errors {r['errors']}, p50 {r['p50_s']:.1f} s, p95 {r['p95_s']:.1f} s, "
                             f"peak RSS {r['rss_mb']:.0f} MB; cache peak {r['cache_peak_mb']:.0f} of "
                             f"{r['cache_cap_mb']:.0f} MB cap, {r['evictions']} evictions; "
                             f"{r['gate_peak_active']} turns at once"))
        if "fuzz" in want:
            from agents.fuzz import run_fuzz

            n_fuzz = int(os.environ.get("RADASSIST_BENCH_FUZZ", "2000"))
            fz = run_fuzz(n_fuzz, seed=None, cli_every=5)
            results["fuzz"] = {**fz.summary(), "crash_list": fz.crashes[:50], "hang_list": fz.hangs}
            rows.append(("security", "fuzzed loader + CLI import inputs (random, hypothesis)",
                         f"{fz.inputs} inputs ({fz.via_cli} via the CLI), {len(fz.crashes)} crashes, {len(fz.hangs)} "
                         f"hangs, {fz.rejected} refused with a message, slowest {fz.max_input_s:.1f} s"))
        if "deid" in want:
            dl = deid_leak_scan(work, size)
            results["deid"] = dl
            rows.append(("security", "identifiers in logs / audit / outgoing text (3-turn session)",
                         f"{dl['leaks']['log']} / {dl['leaks']['audit']} / {dl['leaks']['request']} "
                         f"({dl['log_lines']} DEBUG log lines, {dl['audit_lines']} audit lines, chain "
                         f"{'intact' if dl['audit_chain_ok'] else 'BROKEN'})"))
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    w = max(len(r[1]) for r in rows) if rows else 10
    lines = [f"radassist bench — seeds {seeds}, size {size}", f"{'area':10} {'metric':{w}} value",
             "-" * (w + 30)]
    lines += [f"{a:10} {m:{w}} {v}" for a, m, v in rows]
    return "\n".join(lines)
