"""The activation cache: rows equal TransformerLens' own activations, the derived site equals its
definition, kill -9 + --resume gives byte-identical shards, corrupt shards are refused, bad sites
write nothing, and the reader mixes shards deterministically."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.activations.cache import Cache, build_cache
from saekit.activations.cache_config import CacheConfig
from saekit.activations.cache_format import read_manifest
from saekit.activations.cache_reader import CacheReader
from saekit.activations.corpus import load_texts, tokenize_contexts
from saekit.activations.models import load_model
from saekit.sae.errors import SaekitError
from saekit.scripts.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def small_cfg(out: Path, **kw) -> CacheConfig:
    args = dict(out=out, tokens=1500, context_size=64, batch_size=8, shard_mb=0.25)
    args.update(kw)
    return CacheConfig(**args)


def read_cache(d: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(manifest, concatenated shards, contexts) of a cache dir."""
    m = read_manifest(d)
    shards = [load_file(str(d / s["file"])) for s in m["shards"]]
    cat = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    return m, cat, load_file(str(d / m["contexts"]["file"]))


def reference_rows(
    model, tokens: torch.Tensor, batch_size: int, hooks: list[str]
) -> dict[str, list]:
    """Per forward batch (the cache's batches), each hook's activations at the non-BOS positions,
    via a plain full `run_with_cache`."""
    bos = model.tokenizer.bos_token_id
    out: dict[str, list] = {h: [] for h in hooks}
    for b0 in range(0, len(tokens), batch_size):
        tok = tokens[b0 : b0 + batch_size]
        with torch.inference_mode():
            _, cache = model.run_with_cache(tok, names_filter=hooks)
        for h in hooks:
            out[h].append(cache[h][tok != bos])
    return out


def test_rows_equal_run_with_cache(model, tmp_path):
    sites = ["mlp_post", "mlp_out", "resid_post"]
    caches = build_cache(small_cfg(tmp_path / "c", site=",".join(sites)))
    assert list(caches) == sites  # one Cache per site, in a sub-dir named after it
    hooks = {
        "mlp_post": "blocks.0.mlp.hook_post",
        "mlp_out": "blocks.0.hook_mlp_out",
        "resid_post": "blocks.0.hook_resid_post",
    }
    ctx_tokens = None
    for site in sites:
        assert caches[site].path == tmp_path / "c" / site and caches[site].site == site
        m, cat, ctx = read_cache(caches[site].path)
        assert m["complete"] and m["n_tokens"] == 1500 and m["hook_name"] == hooks[site]
        assert m["include_bos"] is False and "BOS" in m["bos_rows"]
        tokens = ctx["tokens"].long()
        if ctx_tokens is None:
            ctx_tokens = tokens
            ref = reference_rows(model, tokens, 8, list(hooks.values()))
        assert torch.equal(tokens, ctx_tokens)  # one forward pass, the same contexts for all sites
        want = torch.cat(ref[hooks[site]])[:1500]
        assert cat["activations"].shape == want.shape
        torch.testing.assert_close(cat["activations"], want, atol=1e-6, rtol=0)
        # each row's token, context and position point back into the contexts and the corpus
        local = {int(c): i for i, c in enumerate(ctx["context"])}
        rows = torch.tensor([local[int(c)] for c in cat["context"]])
        assert torch.equal(tokens[rows, cat["position"].long()], cat["tokens"].long())
        assert bool((cat["tokens"] != model.tokenizer.bos_token_id).all())
        mean_norm = float(cat["activations"].double().norm(dim=1).mean())
        assert m["stats"]["mean_norm"] == pytest.approx(mean_norm, rel=1e-6)
    corpus = tokenize_contexts(load_texts("default", "train"), model.tokenizer, 64)
    assert torch.equal(corpus[ctx["context"]], ctx_tokens)
    # contexts come in a seeded random order, not corpus order
    assert not bool((ctx["context"].diff() > 0).all())


def test_mlp_out_logits_equals_definition(model, tmp_path):
    out = build_cache(small_cfg(tmp_path / "c", site="mlp_out_logits", tokens=700)).path
    m, cat, ctx = read_cache(out)
    assert m["d_in"] == model.cfg.d_vocab and cat["activations"].shape == (700, model.cfg.d_vocab)
    tokens = ctx["tokens"].long()
    bos = model.tokenizer.bos_token_id
    want = []
    for b0 in range(0, len(tokens), 8):
        tok = tokens[b0 : b0 + 8]
        with torch.inference_mode():
            _, cache = model.run_with_cache(tok)  # full forward, logits and all
        keep = tok != bos
        upd = cache["blocks.0.hook_mlp_out"][keep]
        scale = cache["ln_final.hook_scale"][keep].mean()  # typical ln_final scale of this batch
        centred = upd - upd.mean(-1, keepdim=True)  # the default model's ln_final is a LayerNorm
        want.append((centred / scale * model.ln_final.w) @ model.W_U)
    want = torch.cat(want)[:700]
    torch.testing.assert_close(cat["activations"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_resid_matches_transformers(tmp_path):
    from saekit.activations.models import smollm2_hf

    layer = 4
    out = build_cache(
        CacheConfig(
            out=tmp_path / "c",
            model="smollm2-135m",
            site="resid_post",
            layer=layer,
            tokens=48,
            context_size=17,
            batch_size=2,
        )
    ).path
    m, cat, ctx = read_cache(out)
    hf, tok = smollm2_hf(torch.float32)
    with torch.inference_mode():
        hs = hf(input_ids=ctx["tokens"].long(), output_hidden_states=True).hidden_states[layer + 1]
    want = hs[ctx["tokens"].long() != tok.bos_token_id][:48]
    # TransformerLens and transformers order attention and RMSNorm differently: float32 round-off
    # relative to the residual's size (entries up to ~750 here; observed max error ~2e-4).
    torch.testing.assert_close(cat["activations"], want, atol=1e-3, rtol=1e-5)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "saekit", "cache", *args]


def shard_hashes(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.glob("shard-*.safetensors"))
    }


@pytest.mark.slow
def test_kill_resume_is_identical(tmp_path):
    flags = ["--tokens", "20000", "--context-size", "64", "--batch-size", "8", "--shard-mb", "0.25"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(cli("--out", str(a), *flags), cwd=REPO, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        cli("--out", str(b), *flags),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (b / "shard-00001.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, (
            "cache run ended before its second shard"
        )
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((b / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) < len(
        json.loads((a / "manifest.json").read_text())["shards"]
    )
    with pytest.raises(SaekitError, match="incomplete"):
        read_manifest(b)
    # without --resume a non-empty --out is refused
    r = subprocess.run(
        cli("--out", str(b), *flags), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "--resume" in r.stderr
    subprocess.run(
        cli("--out", str(b), *flags, "--resume"), cwd=REPO, env=env, check=True, capture_output=True
    )
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["shards"] == mb["shards"] and ma == mb
    assert shard_hashes(a) == shard_hashes(b) and len(shard_hashes(a)) == len(ma["shards"])
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.fixture(scope="module")
def resid_cache(model, tmp_path_factory):
    return build_cache(
        small_cfg(tmp_path_factory.mktemp("rc") / "c", site="resid_post", tokens=3000)
    ).path


def test_cache_handle(resid_cache, tmp_path):
    """`Cache` (what saekit.cache returns): the manifest's fields, the trainer's reader and
    samples, and a refusal of an incomplete cache."""
    import shutil

    cache = Cache.open(str(resid_cache))
    m = read_manifest(resid_cache)
    assert cache.path == resid_cache and cache.manifest == m
    assert (cache.d_in, cache.n_tokens, cache.site) == (m["d_in"], 3000, "resid_post")
    assert (cache.hook_name, cache.model) == ("blocks.0.hook_resid_post", "default")
    assert repr(cache) == (
        f"Cache({str(resid_cache)!r}, model='default', hook='blocks.0.hook_resid_post', "
        f"tokens=3,000, d_in={m['d_in']})"
    )
    want = CacheReader(resid_cache, batch_size=64, seed=5).sample(700, seed=2)
    assert torch.equal(cache.sample(700, seed=2), want)
    a = next(cache.reader(64, seed=5, dtype=torch.float16).batches())
    b = next(CacheReader(resid_cache, batch_size=64, seed=5).batches())
    assert a.dtype == torch.float16 and torch.equal(a, b.half())
    d = tmp_path / "c"
    shutil.copytree(resid_cache, d)
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SaekitError, match="is incomplete"):
        Cache.open(d)


def test_flipped_byte_is_refused(resid_cache, tmp_path):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(resid_cache, d)
    p = d / "shard-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    reader = CacheReader(d, batch_size=64, shuffle_shards=2)
    with pytest.raises(SaekitError, match="shard-00001.safetensors"):
        for _ in islice(reader.batches(), 10_000):
            pass
    with pytest.raises(SaekitError, match="shard-00001.safetensors"):
        reader.sample(3000, seed=0)


def test_format_1_cache_with_sha256_is_still_read(resid_cache, tmp_path):
    """Caches made before the switch to XXH3 (format 1, SHA-256) train without a rebuild, and
    their checksums are still checked."""
    import shutil

    d = tmp_path / "c"
    shutil.copytree(resid_cache, d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1
    for e in [*m["shards"], m["contexts"]]:
        del e["xxh3_128"]
        e["sha256"] = hashlib.sha256((d / e["file"]).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    want = CacheReader(resid_cache, batch_size=64).sample(500, seed=0)
    assert torch.equal(CacheReader(d, batch_size=64).sample(500, seed=0), want)
    p = d / "shard-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(SaekitError, match=r"shard-00001.safetensors fails its sha256 check"):
        CacheReader(d, batch_size=64).sample(3000, seed=0)
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    cfg = small_cfg(d, site="resid_post", tokens=3000, resume=True)
    with pytest.raises(SaekitError, match=r"cache format 1.*rebuild it with --overwrite"):
        build_cache(cfg)


def test_closing_batches_joins_the_reader_thread(resid_cache):
    """A reader thread left running into interpreter exit, inside a torch op, aborted a
    finished `saekit train` once in CI ("terminate called without an active exception")."""
    import threading

    for _ in range(5):
        it = CacheReader(resid_cache, batch_size=64).batches()
        next(it)
        it.close()
        assert not [t for t in threading.enumerate() if t.name == "cache-batches"]


def test_nan_shard_is_refused(resid_cache, tmp_path):
    import shutil

    from saekit.activations.cache_files import write_safetensors

    d = tmp_path / "c"
    shutil.copytree(resid_cache, d)
    m = json.loads((d / "manifest.json").read_text())
    t = load_file(str(d / "shard-00002.safetensors"))
    t["activations"][5, 3] = float("nan")
    nbytes, sha = write_safetensors(
        d / "shard-00002.safetensors", t
    )  # a valid file with a valid hash
    m["shards"][2].update(bytes=nbytes, xxh3_128=sha)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SaekitError, match=r"shard-00002.safetensors.*NaN"):
        CacheReader(d, batch_size=64).sample(3000, seed=1)


def test_reader_mixes_and_is_deterministic(resid_cache):
    m, cat, _ = read_cache(resid_cache)
    bounds = torch.tensor([s["rows"] for s in m["shards"]]).cumsum(0)
    # trace rows back by their bytes (a few rows repeat: same token right after BOS)
    all_rows = [r.numpy().tobytes() for r in cat["activations"]]
    key = {b: i for i, b in reversed(list(enumerate(all_rows)))}
    n = len(all_rows)
    reader = CacheReader(resid_cache, batch_size=64, seed=3, shuffle_shards=3)
    assert reader.d_in == m["d_in"] and len(m["shards"]) >= 6
    stream = list(islice(reader.batches(), 2 * n // 64 + 3))  # more than two epochs
    assert all(b.shape == (64, reader.d_in) and b.dtype == torch.float32 for b in stream)
    rows = [r.numpy().tobytes() for r in torch.cat(stream)]
    first = torch.tensor([key[r] for r in rows[:64]])
    shards = torch.searchsorted(bounds, first, right=True)
    assert len(set(shards.tolist())) > 1 and len(set(cat["context"][first].tolist())) > 8
    assert Counter(rows[:n]) == Counter(all_rows)  # an epoch is a permutation of all rows
    assert rows[:n] != rows[n : 2 * n]  # ... a different one each epoch
    # batch i is a function of (seed, i): a fresh reader started at i gives the same batches
    again = CacheReader(resid_cache, batch_size=64, seed=3, shuffle_shards=3)
    for start in (0, 1, 17, n // 64, n // 64 + 1):
        got = list(islice(again.batches(start_batch=start), 4))
        assert all(torch.equal(x, y) for x, y in zip(got, stream[start : start + 4], strict=True))
    other = next(CacheReader(resid_cache, batch_size=64, seed=4, shuffle_shards=3).batches())
    assert not torch.equal(other, stream[0])
    s1, s2 = reader.sample(500, seed=7), reader.sample(500, seed=7)
    assert torch.equal(s1, s2) and s1.shape == (500, reader.d_in)
    assert len({key[r.numpy().tobytes()] for r in s1}) > 490  # without replacement
    assert not torch.equal(s1, reader.sample(500, seed=8))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--site", "mlp_postt"], "valid sites: mlp_post, mlp_out"),
        (["--hook", "blocks.0.hook_nothing"], "valid hooks: hook_embed"),
        (["--layer", "3"], "layer 3 is out of range"),
        (["--site", "mlp_post,bogus"], "unknown site 'bogus'"),
    ],
)
def test_bad_site_or_layer_writes_nothing(model, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli_main(["cache", "--out", str(out), "--tokens", "100", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_refusals(model, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SaekitError, match="holds notes.txt, which saekit did not write"):
        build_cache(small_cfg(out))
    with pytest.raises(SaekitError, match="did not write"):
        build_cache(small_cfg(out, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(SaekitError, match="only .* tokens to cache"):
        build_cache(small_cfg(tmp_path / "big", tokens=10**9))
    assert not (tmp_path / "big").exists()
    with pytest.raises(SaekitError, match="not a saekit cache"):
        read_manifest(out)


def test_resume_and_overwrite(model, tmp_path):
    out = build_cache(small_cfg(tmp_path / "c", tokens=800)).path
    before = shard_hashes(out)
    # resuming a complete cache changes nothing; different settings are refused
    build_cache(small_cfg(out, tokens=800, resume=True))
    assert shard_hashes(out) == before
    with pytest.raises(SaekitError, match="batch_size was 8, now 16"):
        build_cache(small_cfg(out, tokens=800, batch_size=16, resume=True))
    build_cache(small_cfg(out, tokens=800, seed=1, overwrite=True))
    assert read_manifest(out)["seed"] == 1 and shard_hashes(out) != before
