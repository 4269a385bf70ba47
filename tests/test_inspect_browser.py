"""The feature browser in headless Chromium (Playwright driving Debian's chromium): search by explanation, the
panel kept in view, keyboard navigation, filters, the 800 px layout, and the served text box. Screenshots go to
tests/output/ (the docs' images are copied from there)."""

from __future__ import annotations

import json
import threading

import pytest
from harvest_helpers import REPO
from inspect_helpers import (
    HOOK,
    PLANTED_LATENT,
    SPECIAL,
    chromium_browser,
    is_png,
    planted_model_and_sae,
    token_contexts,
)

from saelab.inspect import InspectConfig, collect_features, write_site
from saelab.inspect.explain import import_explanations
from saelab.inspect.live import LiveModel
from saelab.inspect.server import make_server

N = 400  # latents: the index is about 9,000 px tall
SCREENSHOTS = REPO / "tests" / "output"


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as b:
        yield b


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 400-latent site of the planted model, two latents explained, served with the text box."""
    model, sae = planted_model_and_sae(tmp_path_factory.mktemp("tok"), d_sae=N)
    cfg = InspectConfig(
        n_top=6, n_bands=4, per_band=2, n_random=32, batch_size=20, window_before=6, window_after=3
    )
    data = collect_features(model, sae, token_contexts(60, seed=5), hook_name=HOOK, cfg=cfg)
    out = tmp_path_factory.mktemp("site") / "inspect"
    write_site(data, out, latents_per_file=64, metadata={"sae": "planted", "model": "tiny"})
    export = out.parent / "explanations.json"
    export.write_text(json.dumps({str(PLANTED_LATENT): "the word w7", "250": "zebras crossing roads"}))
    import_explanations(out, export)
    server = make_server(out, 0, LiveModel(model, sae, HOOK, model.tokenizer, SPECIAL))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield data, out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def open_page(browser, url: str, width: int = 1280, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#index tbody tr")
    return page


def rows(page) -> list[int]:
    return [
        int(x) for x in page.eval_on_selector_all("#index tbody tr", "rs => rs.map(r => r.dataset.latent)")
    ]


def wait_rows(page, expected: list[int]) -> None:
    page.wait_for_function(
        "want => JSON.stringify([...document.querySelectorAll('#index tbody tr')].map(r => +r.dataset.latent)) === want",
        arg=json.dumps(expected),
    )


def go(page, hash_: str) -> None:
    page.evaluate("h => { location.hash = h; }", hash_)
    page.wait_for_timeout(50)


def test_static_site_from_disk_search_filters_and_bad_ids(browser, site):
    data, out, _ = site
    page = open_page(browser, (out / "index.html").resolve().as_uri())
    assert page.is_hidden("#live")  # no server: no text box, the rest works
    assert page.get_attribute("link[rel=icon]", "href").startswith("data:image/svg+xml")
    assert len(rows(page)) == N and page.inner_text("#count") == f"{N} of {N} latents"
    page.fill("#search", "ZEBRAS")  # explanation text, case-insensitive
    wait_rows(page, [250])
    assert "zebras crossing roads" in page.inner_text("#index tbody")
    page.fill("#search", "word w7")
    wait_rows(page, [PLANTED_LATENT])
    go(page, "#q=%2312")
    assert rows(page) == [12]
    go(page, "#q=%23999")
    assert rows(page) == [] and "There is no latent 999: this SAE has latents 0\u2013399." in page.inner_text(
        "#search-note"
    )
    go(page, "#latent=999")
    assert "Latent 999 does not exist: this SAE has latents 0\u2013399." in page.inner_text("#panel")
    go(page, "#latent=abc")
    assert "Latent abc does not exist" in page.inner_text("#panel")
    go(page, f"#latent={PLANTED_LATENT}")
    page.wait_for_selector("#panel h2")
    assert "the word w7" in page.inner_text("#panel .explanation")
    go(page, "")
    page.check("#hide-dead")
    page.wait_for_timeout(50)
    alive = int((~data.dead).sum())
    assert len(rows(page)) == alive < N and "dead=0" in page.evaluate("location.hash")
    page.fill("#dmin", "0.2")
    page.dispatch_event("#dmin", "change")
    page.wait_for_timeout(50)
    assert rows(page) == [i for i in range(N) if data.density[i] >= 0.2 and not data.dead[i]]
    assert page.errors == []
    page.close()


def test_panel_stays_in_view_and_keyboard_moves_between_latents(browser, site):
    _, out, _ = site
    page = open_page(browser, (out / "index.html").resolve().as_uri(), 1280, 700)
    row = page.locator('#index tr[data-latent="380"]')
    row.scroll_into_view_if_needed()
    row.click()
    page.wait_for_function(
        "document.querySelector('#panel h2') && document.querySelector('#panel h2').textContent.includes('#380')"
    )
    assert page.evaluate("window.scrollY") > 5000  # far down the index ...
    box = page.locator("#panel").bounding_box()
    assert 0 <= box["y"] < 100 and box["height"] <= 700  # ... and the panel is in view
    page.keyboard.press("j")
    page.wait_for_function("document.querySelector('#panel').dataset.latent === '381'")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("k")
    page.wait_for_function("document.querySelector('#panel').dataset.latent === '379'")
    assert "latent=379" in page.evaluate("location.hash")
    assert 0 <= page.locator("#panel").bounding_box()["y"] < 100
    assert page.errors == []
    page.close()


def test_layout_at_800_px(browser, site):
    _, out, _ = site
    page = open_page(browser, (out / "index.html").resolve().as_uri() + f"#latent={PLANTED_LATENT}", 800, 900)
    page.wait_for_selector("#panel .example")
    assert page.evaluate("document.documentElement.scrollWidth") <= 800  # nothing wider than the window
    style = page.eval_on_selector(
        "#panel .example", "e => [getComputedStyle(e).wordBreak, getComputedStyle(e).overflowWrap]"
    )
    assert style == ["normal", "break-word"]
    # no token is split across two lines
    assert (
        page.eval_on_selector_all(
            "#panel .example .tok", "ts => ts.filter(t => t.getClientRects().length > 1).length"
        )
        == 0
    )
    row = page.locator('#index tr[data-latent="300"]')
    row.scroll_into_view_if_needed()
    row.click()
    page.wait_for_function("document.querySelector('#panel').dataset.latent === '300'")
    page.wait_for_timeout(100)
    box = page.locator("#panel").bounding_box()
    assert -5 <= box["y"] < 900  # the panel (below the index at this width) was scrolled to
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "inspect_800px.png"))
    assert page.errors == []
    page.close()


def test_served_text_box(browser, site):
    _, _, url = site
    page = open_page(browser, url + f"#latent={PLANTED_LATENT}")
    page.wait_for_selector("#live:not([hidden])")
    page.fill("#live-text", "w7 w1 w7 w3")
    page.click("#live-run")
    page.wait_for_selector("#live-tokens .tok")
    assert page.locator("#live-tokens .tok").count() == 5  # BOS + 4 words
    assert page.locator("#live-effects tr").count() == 1 + 2  # header + the two w7 tokens
    alpha = page.eval_on_selector_all(
        "#live-tokens .tok",
        "ts => ts.map(t => { const c = getComputedStyle(t).backgroundColor.match(/[\\d.]+/g); return c.length > 3 ? +c[3] : 1; })",
    )
    assert [a > 0 for a in alpha] == [False, True, False, True, False]  # shaded where the latent fires
    page.click('#live-tokens .tok[data-t="1"]')
    page.wait_for_selector("#live-token-info")
    assert f"#{PLANTED_LATENT}" in page.inner_text("#live-token-info")
    page.fill("#live-latent", "3")
    page.click("#live-run")
    page.wait_for_function(
        "document.querySelector('#live-out h3') && document.querySelector('#live-out h3').textContent.includes('#3')"
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shots = {
        "inspect_text_box.png": None,
        "inspect_latent.png": f"#latent={PLANTED_LATENT}",
        "inspect_index.png": "#sort=density",
    }
    for name, hash_ in shots.items():
        if hash_ is not None:
            go(page, hash_)
            page.wait_for_timeout(200)
        page.screenshot(path=str(SCREENSHOTS / name))
        assert is_png(SCREENSHOTS / name) == (1280, 900)
    assert page.errors == []
    page.close()
