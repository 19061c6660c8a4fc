"""rVAE: ELBO terms, equivariance after a short training, patches, buckets, maps, checkpoints.

Small and fast: 16 x 16 patches, one batch size and one learning rate everywhere (so the
training step compiles once), one short shared training run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from stem_live.rvae import model as M  # noqa: E402
from stem_live.rvae.live import LiveEncoder, OnlineTrainer  # noqa: E402
from stem_live.rvae.maps import latent_maps  # noqa: E402
from stem_live.rvae.patches import extract_patches, patch_trace_count  # noqa: E402
from stem_live.rvae.train import CheckpointError, load_checkpoint, params_bytes, save_checkpoint, train  # noqa: E402

S = 16
BS = 32
LR = 3e-3
CFG = dict(patch_size=S, canvas_size=20, latent_dim=2, decoder_hidden=(64, 128))

# three blobs (dy, dx, amplitude, sigma) px: an object with no rotational symmetry
BLOBS = np.array([[0.0, 0.0, 1.0, 1.3], [0.0, 4.5, 0.6, 1.5], [2.8, 1.5, 0.45, 1.1]])


def render_blobs(theta, size=S, shift=(0.0, 0.0), scale=1.0):
    """The blob object rotated by ``theta`` (R(theta) turns atan2(y, x) by +theta)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.zeros((size, size))
    ct, st = math.cos(theta), math.sin(theta)
    for dy, dx, a, s in BLOBS:
        py = c + shift[0] + ct * dy * scale + st * dx * scale
        px = c + shift[1] - st * dy * scale + ct * dx * scale
        img += a * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * s * s))
    return img


def normalise(x):
    x = np.asarray(x, np.float64)
    return ((x - x.mean(axis=(-2, -1), keepdims=True)) / x.std(axis=(-2, -1), keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """512 noisy copies of the object at random angles and sub-pixel shifts; about 1-2 s of
    training after a compile of about 5-15 s (the content warm-up is 20 of the 40 epochs)."""
    rng = np.random.default_rng(0)
    n = 512
    theta = rng.uniform(-np.pi, np.pi, n)
    shifts = rng.normal(0, 0.4, (n, 2))
    scale = rng.uniform(0.9, 1.1, n)
    x = np.stack([render_blobs(t, shift=s, scale=k) for t, s, k in zip(theta, shifts, scale)])
    x = normalise(x + rng.normal(0, 0.05, x.shape))
    params, hist = train(x, epochs=40, batch_size=BS, lr=LR, seed=0, **CFG)
    return params, hist


# --------------------------------------------------------------------------- ELBO terms


def test_kl_hand_computed():
    # KL(N(1, 0.5^2) || N(0, 2^2)) = log(2/0.5) + (0.25 + 1)/(2*4) - 1/2
    want = math.log(4.0) + 1.25 / 8.0 - 0.5
    got = float(M.kl_normal(1.0, math.log(0.5), 2.0))
    assert got == pytest.approx(want, rel=1e-6)
    # the mean term counts: mu = 0 gives a smaller KL by mu^2 / (2 sp^2)
    assert got - float(M.kl_normal(0.0, math.log(0.5), 2.0)) == pytest.approx(1.0 / 8.0, rel=1e-5)


def test_gaussian_nll_hand_computed():
    x = np.array([[1.0, 2.0]], np.float32)
    xh = np.array([[0.0, 2.0]], np.float32)
    c = math.log(0.5) + 0.5 * math.log(2 * math.pi)
    assert float(M.gaussian_nll(x, xh, np.ones_like(x), 0.5)[0]) == pytest.approx(0.5 * 4 + c + c, rel=1e-6)
    assert float(M.gaussian_nll(x, xh, np.array([[1.0, 0.0]]), 0.5)[0]) == pytest.approx(0.5 * 4 + c, rel=1e-6)


def test_elbo_terms_match_hand_computation():
    cfg = M.RVAEConfig(patch_size=8, canvas_size=10, latent_dim=2, decoder_hidden=(16,), encoder_dense=16,
                       encoder_features=(8, 8), angle_prior_sigma=0.7, shift_prior_sigma=(0.5, 2.0),
                       content_prior_sigma=1.5, recon_sigma=0.3)
    params = M.init_params(cfg, seed=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8, 8)).astype(np.float32)
    mask = np.ones_like(x)
    mask[0, :2] = 0.0
    eps = np.zeros((3, 5), np.float32)

    def all_terms(params, x, mask, eps):  # one compile for everything the test needs
        q = M.posterior(params, x, mask)
        return M.elbo_terms(params, x, mask, eps), q, M.decode_jax(params, q["content"], q["angle"], q["shift"])

    t, q, xh = jax.jit(all_terms)(params, x, mask, eps)
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    q = {k: np.asarray(v, np.float64) for k, v in q.items()}
    xh = np.asarray(xh, np.float64)
    assert np.all(np.abs(q["angle"]) > 1e-3)  # the angle mean term is exercised

    def kl(mu, ls, sp):
        s = np.exp(ls)
        return np.log(sp / s) + (s ** 2 + mu ** 2) / (2 * sp ** 2) - 0.5

    np.testing.assert_allclose(t["kl_angle"], kl(q["angle"], q["angle_log_sigma"], 0.7), rtol=1e-5)
    np.testing.assert_allclose(t["kl_shift"], kl(q["shift"][:, 0], q["shift_log_sigma"][:, 0], 0.5)
                               + kl(q["shift"][:, 1], q["shift_log_sigma"][:, 1], 2.0), rtol=1e-5)
    np.testing.assert_allclose(t["kl_content"], kl(q["content"], q["content_log_sigma"], 1.5).sum(1), rtol=1e-5)
    rec = ((0.5 * ((x - xh) / 0.3) ** 2 + np.log(0.3) + 0.5 * np.log(2 * np.pi)) * mask).sum(axis=(1, 2))
    np.testing.assert_allclose(t["recon"], rec, rtol=1e-5)
    np.testing.assert_allclose(t["loss"], rec + t["kl_angle"] + t["kl_shift"] + t["kl_content"], rtol=1e-6)


def test_decoder_symmetry_and_angle_range():
    cfg = M.RVAEConfig(patch_size=S, canvas_size=20, latent_dim=2, symmetry_order=3, decoder_hidden=(16,))
    params = M.init_params(cfg, seed=0)
    z = np.array([[0.3, -0.2], [0.3, -0.2]], np.float32)
    a, b = M.decode(params, z, [0.4, 0.4 + 2 * np.pi / 3], [[0.2, -0.1], [0.2, -0.1]])
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a.shape == (S, S)
    q = jax.jit(M.posterior)(params, np.random.default_rng(0).normal(size=(20, S, S)))
    angle = M.wrap_angles({"angle": np.asarray(q["angle"])}, 3)["angle"]
    assert np.all(angle >= -np.pi / 3) and np.all(angle < np.pi / 3)


# --------------------------------------------------------------------------- trained model


def test_training_history_and_loss_decreases(trained):
    _, hist = trained
    assert len(hist) == 40
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]


def test_rotated_copies_same_content_angles_follow_rotation(trained):
    params, _ = trained
    deltas = np.linspace(-np.pi, np.pi, 12, endpoint=False)
    x = normalise(np.stack([render_blobs(d) for d in deltas]))
    lat = M.encode(params, x)
    # angles differ by the applied rotations (one common offset, same sense of rotation)
    d = np.angle(np.exp(1j * (lat["angle"] - deltas)))
    resid = np.angle(np.exp(1j * (d - np.angle(np.mean(np.exp(1j * d))))))
    assert np.max(np.abs(resid)) < 0.25, np.degrees(resid)
    # content is the same for every copy (spread well below the prior's unit scale)
    assert np.all(lat["content"].std(axis=0) < 0.25), lat["content"]
    # and decode(encode(x)) reproduces every copy
    xh = M.decode(params, lat["content"], lat["angle"], lat["shift"])
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x, xh)]
    assert min(corr) > 0.9


def test_decode_applies_angle(trained):
    params, _ = trained
    z = np.zeros((2, 2), np.float32)
    a = M.decode(params, z, [0.0, np.pi / 2], np.zeros((2, 2)))
    # +90 degrees in atan2(y, x) with y = row (down) is a clockwise quarter turn on screen:
    # np.rot90(k=-1) about the patch centre (checked on the analytic renderer first)
    ref = np.stack([render_blobs(0.0), render_blobs(np.pi / 2)])
    np.testing.assert_allclose(np.rot90(ref[0], k=-1), ref[1], atol=1e-9)  # renderer convention
    np.testing.assert_allclose(np.rot90(a[0], k=-1), a[1], atol=0.15 * np.abs(a).max())


def test_encode_never_changes_params(trained):
    params, _ = trained
    before = params_bytes(params)
    x = np.random.default_rng(3).normal(size=(70, S, S)).astype(np.float32)
    l1 = M.encode(params, x)
    l2 = LiveEncoder(params, buckets=(64, 128)).encode(x)
    M.decode(params, l1["content"], l1["angle"], l1["shift"])
    assert params_bytes(params) == before
    for k in l1:
        np.testing.assert_allclose(l1[k], l2[k], rtol=1e-4, atol=1e-5)
    l3 = M.encode(params, x)
    for k in l1:
        np.testing.assert_array_equal(l1[k], l3[k])


def test_partial_batch_trains(trained):
    params, _ = trained
    x = normalise(np.stack([render_blobs(t) for t in np.linspace(0, 3, 40)]))
    before = params_bytes(params)
    p2, hist = train(x, epochs=1, batch_size=BS, lr=LR, seed=1, params=params)  # 32 + 8 (padded)
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    assert params_bytes(p2) != before and params_bytes(params) == before
    # padded rows (weight 0) do not affect the loss
    key = jax.random.PRNGKey(0)
    xa = np.concatenate([x[32:], np.zeros((24, S, S), np.float32)])
    xb = np.concatenate([x[32:], np.full((24, S, S), 5.0, np.float32)])
    w = np.r_[np.ones(8), np.zeros(24)].astype(np.float32)
    loss = jax.jit(lambda p, x: M.loss_fn(p, x, jax.numpy.ones_like(x), w, key)[0])
    la, lb = float(loss(params, xa)), float(loss(params, xb))
    assert la == pytest.approx(lb, rel=1e-6)


def test_checkpoint_roundtrip(trained, tmp_path):
    params, hist = trained
    path = save_checkpoint(tmp_path / "m.msgpack", params, history=hist)
    p2, h2 = load_checkpoint(path, with_history=True)
    assert p2.config == params.config and params_bytes(p2) == params_bytes(params)
    assert len(h2) == len(hist)
    with pytest.raises(CheckpointError, match="required"):
        save_checkpoint(None, params)
    with pytest.raises(CheckpointError, match="directory"):
        save_checkpoint(tmp_path, params)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.msgpack")
    (tmp_path / "bad.msgpack").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "bad.msgpack")


def test_bucketed_encoder_does_not_recompile(trained):
    params, _ = trained
    enc = LiveEncoder(params, buckets=(48, 96))  # sizes no other test compiles
    rng = np.random.default_rng(0)
    traces0 = M.encode_trace_count()
    for n in (50, 70, 96, 49):
        out = enc.encode(rng.normal(size=(n, S, S)).astype(np.float32))
        assert out["content"].shape == (n, 2) and out["shift"].shape == (n, 2)
    assert enc.compile_count == 1 and M.encode_trace_count() == traces0 + 1
    enc.encode(rng.normal(size=(230, S, S)).astype(np.float32))  # chunks of 96, 96 and a 48
    enc.encode(rng.normal(size=(3, S, S)).astype(np.float32))
    assert enc.compile_count == 2 and M.encode_trace_count() == traces0 + 2
    # swapping params of the same architecture does not recompile; another architecture is refused
    enc.swap(params)
    enc.encode(rng.normal(size=(90, S, S)).astype(np.float32))
    assert enc.compile_count == 2 and enc.version == 1 and M.encode_trace_count() == traces0 + 2
    with pytest.raises(ValueError, match="same rVAE architecture"):
        enc.swap(M.init_params(M.RVAEConfig(patch_size=S, latent_dim=3)))


def test_online_trainer_swaps_in_background(trained):
    params, _ = trained
    enc = LiveEncoder(params, buckets=(64,))
    tr = OnlineTrainer(enc, capacity=100, batch_size=BS, lr=LR, seed=0)
    assert tr.fine_tune(5) is None  # empty buffer: nothing to do
    x = normalise(np.stack([render_blobs(t) for t in np.linspace(0, 6, 60)]))
    tr.add(x)
    tr.add(x)
    assert len(tr) == 100  # bounded
    before = params_bytes(enc.params)
    th = tr.fine_tune(3)
    enc.encode(x)  # the frame path keeps working while training runs
    assert th is not None and tr.wait(60)
    assert tr.last_error is None and tr.swaps == 1 and enc.version == 1
    assert params_bytes(enc.params) != before
    assert enc.compile_count == 1


# --------------------------------------------------------------------------- patches


def _reference_patches(image, pos, size):
    from scipy.ndimage import map_coordinates

    h, w = image.shape
    c = (size - 1) / 2.0
    off = np.arange(size) - c
    out, masks = [], []
    for y, x in pos:
        yy, xx = np.meshgrid(y + off, x + off, indexing="ij")
        v = map_coordinates(image.astype(np.float64), [yy, xx], order=1, mode="nearest")
        m = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        v = np.where(m, (v - v[m].mean()) / v[m].std(), 0.0)
        out.append(v)
        masks.append(m)
    return np.array(out), np.array(masks)


def test_extract_patches_order_border_and_centring():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(60, 70)).astype(np.float32) + np.linspace(0, 3, 70)[None, :]
    pos = np.array([[30.25, 40.6], [2.0, 3.5], [58.7, 69.0], [10.0, 10.0], [45.3, 1.2], [-3.0, 30.0]])
    p, m = extract_patches(img, pos, S)
    assert p.shape == (len(pos), S, S) and m.shape == p.shape and m.dtype == bool
    ref, rm = _reference_patches(img, pos, S)
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_allclose(p, ref, atol=2e-4)
    assert m[0].all() and m[3].all() and not m[1].all() and not m[5].all() and m[5].any()
    assert not m[1][0, 0] and m[1][-1, -1]  # top-left outside, bottom-right inside
    assert np.all(p[~m] == 0)
    # a spot at a sub-pixel position lands on the patch centre
    yy, xx = np.mgrid[0:40, 0:40]
    spot = np.exp(-((yy - 17.3) ** 2 + (xx - 21.8) ** 2) / (2 * 2.0 ** 2))
    q, _ = extract_patches(spot, [[17.3, 21.8]], S)
    w = np.clip(q[0] - q[0].min(), 0, None) ** 4
    cy = (w * np.arange(S)[:, None]).sum() / w.sum()
    cx = (w * np.arange(S)[None, :]).sum() / w.sum()
    assert cy == pytest.approx((S - 1) / 2, abs=0.05) and cx == pytest.approx((S - 1) / 2, abs=0.05)


def test_extract_patches_buckets_do_not_recompile():
    img = np.random.default_rng(1).normal(size=(50, 50)).astype(np.float32)
    rng = np.random.default_rng(2)
    extract_patches(img, rng.uniform(0, 49, (70, 2)), S)
    n0 = patch_trace_count()
    for n in (65, 100, 128):
        p, _ = extract_patches(img, rng.uniform(0, 49, (n, 2)), S)
        assert len(p) == n
    assert patch_trace_count() == n0
    p, m = extract_patches(img, np.zeros((0, 2)), S)
    assert p.shape == (0, S, S)


# --------------------------------------------------------------------------- maps


def test_latent_maps_paint_values_at_columns():
    pos = np.array([[10.0, 10.0], [10.0, 30.0], [30.2, 19.6]])
    lat = {"angle": np.array([0.1, -0.5, 1.2]), "content": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
    maps = latent_maps(pos, lat, (40, 40), radius_px=6)
    assert set(maps) == {"angle", "content_0", "content_1"}
    for i, (y, x) in enumerate(np.rint(pos).astype(int)):
        assert maps["angle"][y, x] == pytest.approx(lat["angle"][i])
        assert maps["content_1"][y, x] == pytest.approx(lat["content"][i, 1])
    assert np.isnan(maps["angle"][0, 0]) and np.isnan(maps["angle"][39, 39])
    assert maps["content_0"][10, 15] == 1.0 and maps["content_0"][10, 25] == 3.0  # nearest column wins
    full = latent_maps(pos, lat, (40, 40))
    assert not np.isnan(full["angle"]).any()


# --------------------------------------------------------------------------- CLI functions


def test_train_and_encode_commands(tmp_path):
    from stem_live.cli.rvae_sources import SourceError, encode_rvae_main, train_rvae_main

    rng = np.random.default_rng(5)
    raw = 100.0 + 50.0 * np.stack([render_blobs(t) for t in rng.uniform(-3, 3, 40)]) + rng.normal(0, 1, (40, S, S))
    src = tmp_path / "stack.npz"
    np.savez(src, patches=raw.astype(np.float32))
    ckpt = tmp_path / "rvae.msgpack"
    lines = []
    summary = train_rvae_main(src, ckpt, epochs=1, batch_size=BS, lr=LR, seed=0, patch_size=S,
                              progress=lines.append, canvas_size=CFG["canvas_size"],
                              decoder_hidden=CFG["decoder_hidden"])
    assert ckpt.is_file() and summary["patches"] == 40 and summary["epochs"] == 1
    assert any("epoch 1/1" in ln for ln in lines)
    out = tmp_path / "lat.npz"
    encode_rvae_main(src, ckpt, out, progress=None)
    with np.load(out) as z:
        for k in ("angle", "angle_sigma", "shift", "shift_sigma", "content", "content_sigma"):
            assert len(z[k]) == 40
        assert z["content"].shape == (40, 2) and z["shift_sigma"].shape == (40, 2)
    # simulator source: latents stay index-matched to the true columns
    out2 = tmp_path / "sim.npz"
    encode_rvae_main("particles", ckpt, out2, size=96, frames=1, progress=None)
    with np.load(out2) as z:
        assert z["positions"].shape == (len(z["angle"]), 2) and len(z["angle"]) > 0
    with pytest.raises(SourceError, match="not found"):
        train_rvae_main(tmp_path / "nope.tif", tmp_path / "x.msgpack", progress=None)
    with pytest.raises(CheckpointError, match="required"):
        train_rvae_main(src, None, progress=None)
    with pytest.raises(CheckpointError, match="not found"):
        encode_rvae_main(src, tmp_path / "missing.msgpack", out, progress=None)


# --------------------------------------------------------------------------- scores


def test_circular_corr_and_auc():
    from stem_live.lab.rvae_eval import auc, circular_corr

    rng = np.random.default_rng(0)
    a = rng.uniform(-np.pi, np.pi, 500)
    assert circular_corr(a, a + 1.3) == pytest.approx(1.0)           # any constant offset
    assert circular_corr(-a + 0.4, a) == pytest.approx(-1.0)          # reversed sense
    assert abs(circular_corr(a, rng.uniform(-np.pi, np.pi, 500))) < 0.15
    assert circular_corr(a, a + rng.normal(0, 0.1, 500)) > 0.97
    y = np.r_[np.zeros(50), np.ones(50)].astype(bool)
    assert auc(np.r_[np.arange(50), np.arange(50) + 100], y) == 1.0
    assert auc(np.r_[np.arange(50) + 100, np.arange(50)], y) == 0.0
    assert auc(np.ones(100), y) == 0.5
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's example
