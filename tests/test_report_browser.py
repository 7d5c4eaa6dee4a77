"""report.html and the feature dashboards in a real browser: Debian's headless Chromium, network
disabled. No console or script errors, every plot div rendered (the band plot first), a feature's
dashboard found by index and by token search, and screenshots that are not blank."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from saekit.diagnostics.diagnose import DiagnoseConfig, diagnose

CHROMIUM = Path("/usr/bin/chromium")


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG to [h, w, channels] uint8 (no Pillow needed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = ihdr
    assert depth == 8 and colour in (2, 6) and interlace == 0, ihdr
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 255
        elif f == 2:  # Up
            cur = (line + prev) & 255
        else:  # Average / Paeth depend on the reconstructed left pixel: byte by byte
            cur = np.zeros_like(line)
            ln, pv = line.tolist(), prev.tolist()
            c = [0] * len(ln)
            for i in range(len(ln)):
                a = c[i - bpp] if i >= bpp else 0
                b = pv[i]
                if f == 3:
                    c[i] = (ln[i] + ((a + b) >> 1)) & 255
                else:
                    cc = pv[i - bpp] if i >= bpp else 0
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
                    c[i] = (ln[i] + pred) & 255
            cur = np.array(c, dtype=np.int32)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM.is_file(), (
        "Debian's chromium is missing at /usr/bin/chromium: apt-get install -y chromium "
        "(the CI test command installs it)"
    )
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-unsafe-swiftshader",  # software WebGL for the 3-D scatter
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        # No network: every request goes to a closed local port or fails to resolve.
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def js_errors(dom: subprocess.CompletedProcess) -> None:
    """No uncaught error in the console and none caught by the page's own error catcher."""
    assert dom.returncode == 0, dom.stderr[-2000:]
    uncaught = [
        ln
        for ln in dom.stderr.splitlines()
        if "CONSOLE" in ln and ("Uncaught" in ln or "Error:" in ln)
    ]
    assert not uncaught, uncaught
    errors = re.search(r'<pre id="js-errors" class="err">(.*?)</pre>', dom.stdout, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors and errors.group(1)


def not_blank(url: str, tmp: Path, name: str, size: tuple[int, int] = (1000, 900)) -> None:
    shot = tmp / f"{name}.png"
    res = chromium(
        [f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}", url], tmp / f"p-{name}"
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = read_png(shot).astype(np.float64)
    assert img.shape[:2] == (size[1], size[0])
    assert img[..., :3].std() > 20, f"screenshot {name} is blank"
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 50


def check_report(page: Path, tmp: Path) -> None:
    html = page.read_text()
    assert "<script src=" not in html and "<link " not in html, "report must be self-contained"
    assert html.count("<script type='text/javascript'>") == 1  # plotly.js inlined once
    n_plots = len(re.findall(r'id="plot-\d+"', html))
    assert n_plots >= 6
    text = re.sub(r"<script.*?</script>", "", html, flags=re.S)
    raw = re.findall(r"\d\.\d{6,}", text)
    assert not raw, f"raw floats on the page: {raw[:5]}"  # rounded to what they mean
    # the story first: the band plot is the first plot, right after the verdict
    assert html.index("Features per density band over training") < html.index('id="plot-0"')
    assert html.index("Trajectory test:</b>") < html.index('id="plot-0"')

    dom = chromium(["--dump-dom", page.as_uri()], tmp / "profile1")
    js_errors(dom)
    pieces = re.split(r'(?=<div id="plot-\d+")', dom.stdout)[1:]
    assert len(pieces) == n_plots
    for piece in pieces:
        head = piece[:300]
        assert "js-plotly-plot" in head, head
        assert "main-svg" in piece, f"plot not rendered: {head}"
    assert "above 1e-2" in pieces[0], "the band plot is not the first plot"
    assert any("gl-container" in p and "<canvas" in p for p in pieces), "3-D scatter not rendered"
    not_blank(page.as_uri(), tmp, "report")


def check_dashboards(report: Path, tmp: Path, feature: int) -> None:
    """features.html: a feature's dashboard by index, the token search, a non-blank page."""
    viewer = report / "features.html"
    index = json.loads(
        re.sub(r"^saekitIndex\((.*)\);$", r"\1", (report / "features/index.js").read_text())
    )
    dom = chromium(["--dump-dom", f"{viewer.as_uri()}#{feature}"], tmp / "profile3")
    js_errors(dom)
    dash = dom.stdout.split('<div id="dash">', 1)[-1].split("<script", 1)[0]
    assert f"<h2>Feature {feature} " in dash, dom.stdout[-3000:]
    assert dash.count("<svg") >= 1 and "Nearest features by decoder cosine" in dash
    assert "NaN" not in dash and "undefined" not in dash, dash
    word = next((w for t in index["tk"] for w in t.split() if w.isalpha()), None)
    if word is not None:  # search by token: every hit lists the token among its tokens
        dom = chromium(["--dump-dom", f"{viewer.as_uri()}?q={word}"], tmp / "profile4")
        js_errors(dom)
        hits = [int(h) for h in re.findall(r"<a class=\"hit\" href=\"#(\d+)\"", dom.stdout)]
        assert hits, dom.stdout[-2000:]
        assert all(word.lower() in index["tk"][h].lower() for h in hits)
    not_blank(f"{viewer.as_uri()}#{feature}", tmp, "dashboard", (1100, 1000))


def test_report_opens_offline_in_chromium(planted, tmp_path):
    W_enc, bias, W_dec, _ = planted.geometry(40, 128)
    hist, _ = planted.history(40)
    planted.write_run(tmp_path / "run", W_enc, bias, W_dec, hist)
    out = diagnose(
        DiagnoseConfig(run=str(tmp_path / "run"), out=str(tmp_path / "rep"), ln_scale=3.0)
    ).path
    check_report(out / "report.html", tmp_path)
    check_dashboards(out, tmp_path, 12)  # an ultra-rare, held-out feature of the planted run


@pytest.mark.slow  # ~45 s: a 16k-feature page with a 3-D WebGL scatter, rendered twice
def test_16k_feature_report_is_small_and_opens(planted, tmp_path):
    planted.big_run(tmp_path / "run")
    out = diagnose(DiagnoseConfig(run=str(tmp_path / "run"), out=str(tmp_path / "rep"))).path
    size = (out / "report.html").stat().st_size
    assert size < 8 * 2**20, f"report.html is {size / 2**20:.1f} MB"
    # the dashboards: an index the viewer loads at once, then one chunk per feature shown
    index = (out / "features/index.js").stat().st_size
    chunks = [p.stat().st_size for p in (out / "features").glob("f-*.js")]
    print(
        f"16k: report.html {size / 2**20:.1f} MB, index.js {index / 2**10:.0f} KB, "
        f"{len(chunks)} chunks, largest {max(chunks) / 2**10:.0f} KB, all {sum(chunks) / 2**20:.1f} MB"
    )
    assert index < 2 * 2**20 and max(chunks) < 2 * 2**20 and sum(chunks) < 64 * 2**20
    t0 = time.perf_counter()
    check_report(out / "report.html", tmp_path)
    t1 = time.perf_counter()
    check_dashboards(out, tmp_path, 16_000)
    t2 = time.perf_counter()
    print(
        f"16k: report checks {t1 - t0:.1f} s, dashboard checks {t2 - t1:.1f} s (3-4 browser starts each)"
    )
    assert t2 - t1 < 120
