"""The neuron explorer: its JSON API against the in-process answers, its limits and security, and the
page itself in a real headless browser (Chromium through Selenium; skipped, with the reason, where
either is missing).

Every server is a real process (tests/harness.py): `downpour serve neurons --http-port PORT` over a trained run's checkpoints
(the same parameters the neurons API serves), `downpour explore --addr` over that service, `downpour
explore --checkpoint` over the run folder. Set EXPLORER_SCREENSHOT=path to keep the browser's
screenshot (docs/img/explorer.png is made that way).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import downpour
import harness
from downpour import config as jobconfig
from downpour.neurons.explorer import MAX_IN_FLIGHT
from downpour.nn import Network, presets
from downpour.paramserver.client import ParamClient, balanced_placement
from downpour.rpc.certs import make_cluster_pki

LAYER = "stage2.output"
UNIT = "layer=stage3.pool&map=1&y=0&x=1"


def login(p: harness.Proc) -> tuple[str, str]:
    """The page's URL and session token, from the URL the explorer printed at start (as a user reads it)."""
    found = harness.wait_for(
        lambda: re.search(r"neuron explorer at (\S+)", p.text()), 60, "the explorer's URL", procs=[p]
    )
    u = urllib.parse.urlsplit(found.group(1))
    harness.wait_for(lambda: harness.accepts(u.port), 60, f"the explorer at {u.netloc}", procs=[p])
    return f"{u.scheme}://{u.netloc}/", urllib.parse.parse_qs(u.query)["token"][0]


def explorer(procs: harness.Procs, *flags: str) -> tuple[harness.Service, str, str]:
    """`downpour serve neurons FLAGS` with its explorer page on a free port; the service, the page's URL
    and its session token."""
    # the page is what these tests use (and a TLS service would refuse a plain health check)
    p = procs.serve("neurons", *flags, "--http-port", str(harness.free_port()), wait=False)
    return (p, *login(p))


def get(
    url: str, data: bytes | None = None, headers: dict | None = None, context=None, token: str = ""
) -> tuple[int, dict]:
    """One request to the page (with the session token as a bearer header where given): status and JSON."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, (json.loads(body) if body.startswith(b"{") else {"raw": body[:200]})


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    with harness.Procs(tmp_path_factory.mktemp("explorer")) as procs:
        yield explorer(procs, "--checkpoint-dir", str(trained_run / "checkpoints"))


def test_the_api_answers_what_the_network_answers_in_process(served, trained_run, photo):
    _, url, token = served
    net = downpour.load(trained_run)
    code, model = get(url + "api/model", token=token)
    assert code == 200
    assert [(x["name"], tuple(x["shape"])) for x in model["layers"]] == [
        (x.name, x.shape) for x in net.describe().layers
    ]
    assert model["checkpoint_id"] == net.describe().checkpoint_id and "heldout" in model["datasets"]
    code, maps = get(url + f"api/maps?layer={LAYER}", data=photo.read_bytes(), token=token)
    assert code == 200
    want = net.activations([photo], LAYER).values[0].reshape(net.describe().layer_shape(LAYER))
    assert maps["shape"] == list(want.shape) and len(maps["maps"]) == want.shape[0]
    for m, a in zip(maps["maps"], want):
        assert m["min"] == pytest.approx(float(a.min()), rel=1e-4, abs=1e-5)
        assert m["max"] == pytest.approx(float(a.max()), rel=1e-4, abs=1e-5)
        img = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(m["png"]))))
        assert img.shape == a.shape
        # the PNG is the map min-max scaled: its brightest pixel is where the map is highest
        assert np.unravel_index(img.argmax(), img.shape) == np.unravel_index(a.argmax(), a.shape)
    code, hist = get(url + f"api/histogram?{UNIT}&dataset=heldout&bins=12", token=token)
    h = net.activation_histogram("stage3.pool", (1, 0, 1), dataset="heldout", bins=12)
    assert code == 200 and hist["counts"] == h.counts.tolist()
    np.testing.assert_allclose(hist["edges"], h.edges, rtol=1e-6)
    code, top = get(url + f"api/top?{UNIT}&dataset=heldout&k=5", token=token)
    want_top = net.top_inputs("stage3.pool", (1, 0, 1), dataset="heldout", k=5)
    assert code == 200 and [t["example_id"] for t in top["inputs"]] == [t.example_id for t in want_top]
    code, stim = get(url + f"api/stimulus?{UNIT}&steps=30", token=token)
    s = net.optimal_stimulus("stage3.pool", (1, 0, 1), steps=30)
    assert code == 200 and stim["activation"] == pytest.approx(s.activation, rel=1e-4)
    assert stim["activation"] > stim["random_activation_max"]


@pytest.mark.parametrize(
    "path, data, status, needle",
    [
        ("api/top?layer=stage3.pool&map=a&y=0&x=0", None, 400, "map='a' is not an integer"),
        ("api/top?layer=stage3.pool&map=0&y=0", None, 400, "x is required"),
        ("api/top?layer=stage3.pool&map=99&y=0&x=0", None, 400, "outside layer"),
        ("api/top?layer=stage9.pool&map=0&y=0&x=0", None, 400, "unknown layer"),
        (f"api/top?{UNIT}&k=100000", None, 400, "k=100000 is out of range"),
        (f"api/top?{UNIT}&dataset=/etc/passwd", None, 400, "unknown dataset"),
        (f"api/stimulus?{UNIT}&steps=0", None, 400, "steps=0 is out of range"),
        (f"api/histogram?{UNIT}&bins=100000", None, 400, "bins=100000"),
        (f"api/maps?layer={LAYER}", b"not an image", 400, "not a decodable image"),
        (f"api/maps?layer={LAYER}", b"", 400, "no image"),
        ("api/maps", b"x", 400, "layer is required"),
        (f"api/maps?layer={LAYER}", b"\0" * (17 << 20), 413, ""),
    ],
)
def test_bad_requests_are_refused_with_the_reason(served, path, data, status, needle):
    code, body = get(served[1] + path, data=data, token=served[2])
    assert code == status, body
    assert needle in body.get("error", ""), body


def test_explore_over_a_service_and_over_a_checkpoint(served, trained_run, photo, procs):
    service, url, token = served
    direct = get(url + f"api/maps?layer={LAYER}", data=photo.read_bytes(), token=token)[1]
    for flags in (["--addr", service.address], ["--checkpoint", str(trained_run)]):
        p = procs.cli("explore", "explore", *flags, "--port", "0")
        page, page_token = login(p)
        code, maps = get(page + f"api/maps?layer={LAYER}", data=photo.read_bytes(), token=page_token)
        assert code == 200
        np.testing.assert_allclose(
            [(x["min"], x["max"]) for x in maps["maps"]], [(x["min"], x["max"]) for x in direct["maps"]], rtol=1e-5
        )
        p.stop()


def test_with_a_token_the_explorer_needs_tls_and_the_token(trained_run, tmp_path, procs):
    pki = make_cluster_pki(tmp_path / "tls")
    ck = str(trained_run / "checkpoints")
    r = procs.cli(
        "clear",
        "serve",
        "neurons",
        "--checkpoint-dir",
        ck,
        "--port",
        "0",
        "--http-port",
        "0",
        "--token-file",
        pki["token_file"],
    )
    # The exit code says it refused; only its message says why.
    assert r.wait(60) == 2 and "token in clear" in r.text()
    _, url, token = explorer(
        procs,
        "--checkpoint-dir",
        ck,
        "--token-file",
        pki["token_file"],
        "--tls-cert",
        pki["cert"],
        "--tls-key",
        pki["key"],
    )
    assert url.startswith("https://")
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False  # the node certificate names the cluster, not 127.0.0.1
    assert get(url + "api/model", context=ctx)[0] == 401
    assert get(url + "api/model", headers={"Authorization": "Bearer wrong"}, context=ctx)[0] == 401
    # the page has a session token of its own: the service's opens nothing
    assert get(url + "api/model", context=ctx, token=pki["token"])[0] == 401
    code, body = get(url + "api/model", context=ctx, token=token)
    assert code == 200 and body["layers"]
    with pytest.raises(OSError):  # plain HTTP to the TLS port: no answer
        urllib.request.urlopen(url.replace("https://", "http://") + "api/model", timeout=10).read()


# -- the page in a real browser --------------------------------------------------------------


def _browser():
    try:
        from selenium import webdriver
    except ImportError as e:
        pytest.skip(f"selenium is not installed ({e})")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser here: install Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,760"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_in_a_headless_browser(served, trained_run, photo, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, url, token = served
    net = downpour.load(trained_run)
    browser = _browser()
    try:
        browser.get(f"{url}?token={token}")  # the URL the explorer printed: it sets the session cookie
        # the page takes the token out of the address bar once its cookie is set
        WebDriverWait(browser, 30).until(lambda b: "token=" not in b.current_url)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        # the page shows its default unit at once: let those answers land before asking for another
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0")
        layers = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "layer")).options]
        assert layers == [l.name for l in net.describe().layers]
        # pick a unit and show it
        Select(browser.find_element(By.ID, "layer")).select_by_value("stage3.pool")
        for name, v in (("map", 1), ("y", 0), ("x", 1)):
            el = browser.find_element(By.ID, name)
            el.clear()
            el.send_keys(str(v))
        Select(browser.find_element(By.ID, "dataset")).select_by_value("heldout")
        # The page writes its count of questions in flight to data-busy at every change: mark it, and
        # "0" after the click can only come from the questions the click asked.
        browser.execute_script("document.body.dataset.busy = 'clicked'")
        browser.find_element(By.ID, "show").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0")
        assert browser.find_element(By.ID, "error").text == ""
        thumbs = browser.find_elements(By.CSS_SELECTOR, "#top .thumb img")
        want = net.top_inputs("stage3.pool", (1, 0, 1), dataset="heldout", k=16)
        assert [t.get_attribute("alt") for t in thumbs] == [f"example {t.example_id}" for t in want]
        assert all(t.get_property("naturalWidth") == 16 for t in thumbs)  # the decoded thumbnails
        assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram rect")) == 30
        stim = browser.find_element(By.CSS_SELECTOR, "#stimulus img")
        assert stim.get_property("naturalWidth") == 16 and float(stim.get_attribute("data-activation")) > 0
        # drop an image: the file input takes a path, as a drop would give the file
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#maps .map img")) > 0)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0")
        maps = browser.find_elements(By.CSS_SELECTOR, "#maps .map img")
        c, h, w = net.describe().layer_shape("stage3.pool")
        assert len(maps) == c and all(m.get_property("naturalWidth") == w for m in maps)
        assert "photo.jpg: stage3.pool" in browser.find_element(By.ID, "maps-info").text
        shot = Path(os.environ.get("EXPLORER_SCREENSHOT") or tmp_path / "explorer.png")
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
    finally:
        browser.quit()


def test_the_explorer_follows_the_live_parameters_of_a_training_job(procs, tmp_path):
    """Over live shards, as `downpour up` serves them: a push moves the parameters and the page's answers."""
    shards = [procs.serve("paramserver", "--shard-index", str(i), "--lr", "0.5") for i in range(2)]
    net = Network(presets.get("tiny"))
    params = net.init_params(5)
    ps = ParamClient([s.address for s in shards], worker_id="test", placement=balanced_placement(net.block_sizes(), 2))
    ps.wait_ready(30)
    ps.init({k: np.asarray(v) for k, v in params.items()})
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "shards": 2})
    (tmp_path / "job.yaml").write_text(cfg.to_yaml())
    _, url, token = explorer(
        procs,
        "--shards",
        ",".join(s.address for s in shards),
        "--config",
        str(tmp_path / "job.yaml"),
        "--refresh-seconds",
        "0.2",
    )
    img = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    code, before = get(url + f"api/maps?layer={LAYER}", data=buf.getvalue(), token=token)
    assert code == 200
    ps.wait(ps.push({k: np.ones(np.size(v), np.float32) for k, v in params.items()}))

    def moved():
        after = get(url + f"api/maps?layer={LAYER}", data=buf.getvalue(), token=token)[1]
        return after if after["parameters_version"] != before["parameters_version"] else None

    after = harness.wait_for(moved, 20, "the page to answer with the pushed parameters", every=0.1)
    assert after["parameters_version"] > before["parameters_version"]
    assert [m["max"] for m in after["maps"]] != [m["max"] for m in before["maps"]]
    ps.close()


def test_questions_beyond_the_in_flight_limit_are_answered_429(served):
    """Twelve slow questions at once (1000 ascent steps each): eight are computed, the rest refused at once."""
    url = served[1] + f"api/stimulus?{UNIT}&steps=1000"
    with ThreadPoolExecutor(12) as pool:
        codes = sorted(c for c, _ in pool.map(lambda _: get(url, token=served[2]), range(12)))
    assert codes.count(200) >= 1 and codes.count(429) >= 12 - MAX_IN_FLIGHT, codes
    assert set(codes) <= {200, 429}
    assert get(served[1] + "api/model", token=served[2])[0] == 200  # and it answers again
