"""The clinician workspace in a real browser: Debian's headless Chromium driven by Playwright.

One app (sign-in on, the PACS source pointing at the shared Orthanc holding the phantom patient, an
empty local store) and one browser page are shared by the steps below, which run in order: sign in,
open the patient from the PACS (the prior comes along), ask a region question and see the boxes, ask for
the comparison and move the before/after slider, ask for the report and click one of its sentences.
Each step saves a 1280x800 screenshot under ``docs/ui/`` (used by the README). A last step checks, over
the API, that another user neither sees nor continues these conversations.

Chromium comes from apt and the driver from pip when missing (tests/servers.py); never ``playwright
install``. Cheap questions keep the file within a few minutes (the first analysis of the phantom CT is
the slow part).
"""
from __future__ import annotations

import hashlib
import io
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import CHROMIUM_ARGS, OrthancServer, ensure_chromium, free_port, orthanc, pacs_patient  # noqa: F401

SHOTS = Path(__file__).resolve().parents[1] / "docs" / "ui"
VIEWPORT = {"width": 1280, "height": 800}
TURN_TIMEOUT_MS = 200_000
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
done: dict[str, Any] = {}  # what the earlier steps achieved (later steps skip when their input is missing)


def _need(step: str) -> Any:
    if step not in done:
        pytest.skip(f"the earlier step '{step}' did not complete")
    return done[step]


def shot(page: Any, name: str) -> Path:
    """A viewport screenshot, palette-compressed (a few hundred KB at most)."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    img = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    return path


@pytest.fixture(scope="module")
def app_url(orthanc: OrthancServer, pacs_patient: dict[str, Any],  # noqa: F811 - imported fixtures
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from agents.engine import Consultant
    from ui.app import launch_demo

    home = tmp_path_factory.mktemp("browser_home")
    users = home / "users.txt"
    users.write_text("".join(f"{u}:{hashlib.sha256(p.encode()).hexdigest()}\n" for u, p in USERS.items()))
    port = free_port()
    demo = launch_demo(host="127.0.0.1", port=port, auth_file=users, block=False,
                       consultant=Consultant(home_dir=home / "engine"), pacs_url=orthanc.dicomweb,
                       demo_patient=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(app_url: str) -> Iterator[Any]:
    chromium = ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="radassist-chromium-") as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, args=CHROMIUM_ARGS,
                                                    headless=True, viewport=VIEWPORT)
        try:
            pg = ctx.new_page()
            pg.set_default_timeout(30_000)
            pg.goto(app_url)
            yield pg
        finally:
            ctx.close()


def _ask(page: Any, question: str) -> int:
    """Type and send a question; returns how many bot messages there were before."""
    n = page.locator("#ra-chat .message-row.bot-row, #ra-chat [data-testid='bot']").count()
    page.locator("#ra-question textarea").fill(question)
    page.locator("#ra-send").click()
    return n


def _tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


# ------------------------------------------------------------------------------------------------
def test_sign_in(page: Any) -> None:
    page.get_by_label("username").fill("alice")
    page.get_by_label("password").fill(USERS["alice"])
    shot(page, "01-sign-in.png")
    page.get_by_label("password").fill("wrong")
    page.get_by_role("button", name="Login").click()
    page.get_by_text(re.compile("incorrect", re.I)).wait_for()
    page.get_by_label("username").fill("alice")  # the form is cleared after a refusal
    page.get_by_label("password").fill(USERS["alice"])
    page.get_by_role("button", name="Login").click()
    page.locator("#ra-chat").wait_for()
    assert page.locator("#ra-source").is_visible()  # the PACS source is offered
    done["signed_in"] = True


def test_open_demo_patient_from_pacs(page: Any, pacs_patient: dict[str, Any]) -> None:  # noqa: F811
    _need("signed_in")
    cur = pacs_patient["truth"]["studies"]["current"]["date"]
    prior = pacs_patient["truth"]["studies"]["prior"]["date"]
    page.locator("#ra-source").get_by_text("PACS", exact=True).click()
    page.locator("#ra-study input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    labels = options.all_inner_texts()
    assert any(cur in lab for lab in labels) and any(prior in lab for lab in labels)
    assert not any(pacs_patient["patient_id"] in lab for lab in labels)  # pseudonyms only
    page.wait_for_timeout(400)  # let the list finish fading in
    shot(page, "02-pacs-studies.png")
    t0 = time.monotonic()
    page.get_by_role("option", name=re.compile(re.escape(cur))).click()
    page.get_by_text("Opened from the PACS").wait_for(timeout=90_000)
    assert re.search(re.escape(prior), page.locator("#ra-prior input").input_value())
    assert re.search(re.escape(cur), page.locator("#ra-study input").input_value())
    done["opened"] = time.monotonic() - t0


def test_region_question_shows_boxes(page: Any) -> None:
    _need("opened")
    _ask(page, "is there a nodule in the right upper lobe?")
    page.locator("#ra-boxes img").first.wait_for(timeout=TURN_TIMEOUT_MS)
    # the slice itself, not only its box overlay, must have arrived and decoded
    page.wait_for_function("() => { const im = [...document.querySelectorAll('#ra-boxes img')];"
                           " return im.length > 1 && im.every(i => i.complete && i.naturalWidth > 0); }",
                           timeout=TURN_TIMEOUT_MS)
    chat = page.locator("#ra-chat").inner_text()
    assert "right upper" in chat.lower() and "Grounded detector" in chat  # the answer and its tool step
    legend = page.locator("#ra-boxes").inner_text()
    assert re.search(r"F\d+ nodule", legend)  # a box legend entry per finding on the slice
    page.locator("#ra-boxes").scroll_into_view_if_needed()
    shot(page, "03-region-boxes.png")
    _tab(page, "Key images")
    page.locator("#ra-gallery img").first.wait_for()
    assert page.locator("#ra-gallery img").first.is_visible()
    shot(page, "04-key-images.png")
    done["asked"] = True


def test_compare_and_move_the_slider(page: Any) -> None:
    _need("asked")
    _ask(page, "compare the right upper lobe with the prior")
    img = page.locator("#ra-pair-image img")
    img.wait_for(timeout=TURN_TIMEOUT_MS)
    assert page.get_by_role("tab", name="Before / after").get_attribute("aria-selected") == "true"
    before = img.get_attribute("src")
    page.locator("#ra-wipe input[type=range]").fill("15")
    page.wait_for_function("s => { const i = document.querySelector('#ra-pair-image img'); return i && i.src !== s; }",
                           arg=before, timeout=30_000)
    page.locator("#ra-pair-image").scroll_into_view_if_needed()
    shot(page, "05-before-after.png")
    done["compared"] = True


def test_report_sentence_shows_its_boxes(page: Any) -> None:
    _need("compared")
    _ask(page, "write a report")
    sentences = page.locator("#ra-sentences label")
    sentences.first.wait_for(timeout=TURN_TIMEOUT_MS)
    texts = sentences.all_inner_texts()
    pick = next((i for i, t in enumerate(texts) if "upper zone" in t.lower() and re.search(r"\bF\d+", t)),
                next(i for i, t in enumerate(texts) if re.search(r"\bF\d+", t)))
    sentences.nth(pick).click()
    boxes = page.locator("#ra-sentence-boxes img")
    boxes.first.wait_for(timeout=30_000)
    fid = re.search(r"\b(F\d+)\b", texts[pick]).group(1)  # type: ignore[union-attr]
    assert fid in page.locator("#ra-sentence-boxes").inner_text()  # that finding's box is in the legend
    page.locator("#ra-sentence-boxes").scroll_into_view_if_needed()
    shot(page, "06-report-sentence.png")
    done["report"] = True


def test_send_report_to_the_pacs_button(page: Any, orthanc: OrthancServer) -> None:  # noqa: F811
    import httpx

    _need("report")
    before = set(httpx.get(f"{orthanc.url}/series", timeout=30).json())
    try:
        page.locator("#ra-send-pacs").click()
        status = page.locator("#ra-send-pacs-status")
        page.wait_for_function(
            "() => (document.querySelector('#ra-send-pacs-status') || {}).innerText?.includes('Sent')", timeout=60_000)
        assert "2 object(s)" in status.inner_text() and "SR" in status.inner_text()
        r = httpx.get(f"{orthanc.dicomweb}/instances", params={"Modality": "SR"}, timeout=30)
        assert r.status_code == 200 and r.json(), "the SR is not in the PACS"
    finally:
        # the archive is shared with the PACS tests: leave it as it was
        for sid in set(httpx.get(f"{orthanc.url}/series", timeout=30).json()) - before:
            httpx.delete(f"{orthanc.url}/series/{sid}", timeout=30).raise_for_status()


def test_conversations_are_private(page: Any, app_url: str) -> None:
    _need("asked")
    from gradio_client import Client

    alice = Client(app_url, auth=("alice", USERS["alice"]), verbose=False, download_files=False)
    bob = Client(app_url, auth=("bob", USERS["bob"]), verbose=False, download_files=False)
    mine = alice.predict(api_name="/conversations")
    assert mine and any("right upper lobe" in c["title"] for c in mine)
    assert bob.predict(api_name="/conversations") == []
    with pytest.raises(Exception, match="another user"):
        bob.predict("how big is it?", "", mine[0]["thread_id"], api_name="/ask")
    # alice's browser lists her conversation and reopens it with its evidence
    page.locator("#ra-conversations input").click()
    page.get_by_role("option", name=re.compile("right upper lobe")).click()
    page.get_by_text("is there a nodule in the right upper lobe?").first.wait_for(timeout=30_000)
