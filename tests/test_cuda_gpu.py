"""The CUDA path on a GPU (marker `gpu`; skipped without one): every op against the CPU path
and against torch on the same data, all tiers, specials, streams, bf16/f16."""

import numpy as np
import pytest

import stablelse
import stablelse.cuda as scuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not scuda.is_available(), reason="no CUDA device"),
]

torch = pytest.importorskip("torch") if scuda.is_available() else None
F = torch.nn.functional if torch is not None else None

DT = {}
if torch is not None:
    DT = {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
# (rtol, atol) against a float64 reference, by dtype.
TOL = {
    "float32": (2e-6, 1e-6),
    "float64": (1e-13, 1e-14),
    "bfloat16": (1.6e-2, 1e-2),
    "float16": (2e-3, 1e-3),
}
# Tiers: warp (10, 1000), cached block (2048, 8192), cluster of 8 (few rows of 32768, 262144),
# unaligned rows -> re-reading block (4097), split rows (300000).
SHAPES = [(513, 10), (130, 1000), (300, 2048), (300, 8192), (40, 32768), (6, 262144),
          (3, 4097), (2, 300000)]


def randn(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(
        DT[dtype]
    )


def close(got, ref, dtype, k=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol * k, atol=atol * k,
                               equal_nan=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_row_ops_vs_float64_reference(shape, dtype):
    x = randn(shape, dtype)
    x64 = x.double()
    close(scuda.logsumexp(x, axis=-1), torch.logsumexp(x64, -1), dtype)
    y = scuda.softmax(x, axis=-1)
    assert y.dtype == x.dtype and y.shape == x.shape
    close(y, torch.softmax(x64, -1), dtype)
    close(scuda.log_softmax(x, axis=-1), torch.log_softmax(x64, -1), dtype, k=4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_matches_torch_to_one_rounding(dtype):
    x = randn((64, 4096), dtype)
    ours = scuda.softmax(x, axis=-1).float()
    theirs = torch.softmax(x, -1).float()
    # Both round a float32 result once: at most one unit of the last place apart.
    ulp = 2.0 ** (-7 if dtype == "bfloat16" else -10)
    assert ((ours - theirs).abs() <= ulp * theirs.abs() + 1e-6).all()


@pytest.mark.parametrize("shape", [(7, 10), (5, 3000), (2, 140000)])
def test_against_cpu_path(shape):
    x = randn(shape, "float32")
    xn = x.cpu().numpy()
    np.testing.assert_allclose(scuda.logsumexp(x, axis=1).cpu().numpy(),
                               stablelse.logsumexp(xn, axis=1), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(scuda.softmax(x, axis=1).cpu().numpy(),
                               stablelse.softmax(xn, axis=1), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(scuda.log_softmax(x, axis=1).cpu().numpy(),
                               stablelse.log_softmax(xn, axis=1), rtol=2e-6, atol=2e-6)


def test_top_level_dispatch():
    x = randn((8, 100), "float32")
    y = stablelse.softmax(x, axis=-1)
    assert isinstance(y, torch.Tensor) and y.is_cuda
    close(y, torch.softmax(x.double(), -1), "float32")
    lse = stablelse.logsumexp(x, axis=1)
    close(lse, torch.logsumexp(x.double(), 1), "float32")


@pytest.mark.parametrize("cols", [10, 1000, 32768, 262144])
def test_specials(cols):
    inf, nan = float("inf"), float("nan")
    x = randn((6, cols), "float32")
    x[0, 3] = inf
    x[1, :] = -inf
    x[2, 5] = nan
    x[3, 1] = 1000.0
    x[4, 1] = -1000.0
    x[5, 0] = 88.0
    xn = x.cpu().numpy()
    lse = scuda.logsumexp(x, axis=-1).cpu().numpy()
    ref = stablelse.logsumexp(xn, axis=-1)
    np.testing.assert_allclose(lse, ref, rtol=2e-6)
    assert lse[0] == np.inf and lse[1] == -np.inf and np.isnan(lse[2])
    sm = scuda.softmax(x, axis=-1).cpu().numpy()
    np.testing.assert_allclose(sm, stablelse.softmax(xn, axis=-1), rtol=2e-6, atol=1e-7)
    assert np.isnan(sm[:3]).all()
    ls = scuda.log_softmax(x, axis=-1).cpu().numpy()
    np.testing.assert_allclose(ls, stablelse.log_softmax(xn, axis=-1), rtol=2e-6, atol=2e-6)


def test_tiny_terms_survive():
    x = torch.tensor([[0.0, -40.0]], device="cuda")
    got = float(scuda.logsumexp(x, axis=-1)[0])
    assert abs(got - 4.248354255291589e-18) < 1e-22
    got = float(scuda.log_softmax(x, axis=-1)[0, 0])
    assert abs(got + 4.248354255291589e-18) < 1e-22


def test_axes_keepdims_views_out_and_inplace():
    x = randn((4, 6, 50), "float32")
    x64 = x.double()
    close(scuda.softmax(x, axis=1), torch.softmax(x64, 1), "float32")
    close(scuda.logsumexp(x, axis=(0, 2)), torch.logsumexp(x64, (0, 2)), "float32")
    k = scuda.logsumexp(x, axis=1, keepdims=True)
    assert k.shape == (4, 1, 50)
    close(scuda.logsumexp(x), torch.logsumexp(x64.reshape(-1), 0), "float32")
    close(scuda.softmax(x), torch.softmax(x64.reshape(-1), 0).reshape(x.shape), "float32")
    # A strided slice of rows: zero copy through the row stride.
    w = randn((30, 2048), "float32")
    v = w[:, 100:1100]
    close(scuda.log_softmax(v, axis=-1), torch.log_softmax(v.double(), -1), "float32", k=4)
    out = torch.empty_like(v)
    r = scuda.softmax(v, axis=-1, out=out)
    assert r is out
    close(out, torch.softmax(v.double(), -1), "float32")
    ref = torch.softmax(w.double(), -1)
    scuda.softmax(w, axis=-1, out=w)
    close(w, ref, "float32")
    u = w[:, 3:3003]  # rows not 16-byte aligned: the re-reading block tier
    close(scuda.softmax(u, axis=-1), torch.softmax(u.double(), -1), "float32")
    with pytest.raises(ValueError, match="shape"):
        scuda.softmax(x, axis=-1, out=torch.empty(3, device="cuda"))


def test_unsupported_options_raise():
    x = randn((4, 8), "float32")
    with pytest.raises(NotImplementedError):
        scuda.logsumexp(x, axis=1, b=x)
    with pytest.raises(NotImplementedError):
        scuda.logsumexp(x, axis=1, return_sign=True)
    with pytest.raises(TypeError):
        scuda.softmax(x.to(torch.int32), axis=1)
    t = torch.zeros(4, dtype=torch.int64, device="cuda")
    with pytest.raises(NotImplementedError):
        scuda.cross_entropy(x, t, weight=x[0])
    with pytest.raises(ValueError, match="shape"):
        scuda.cross_entropy(x, t[:3])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    "shape", [(257, 10), (64, 1000), (300, 4096), (16, 32768), (4, 262144), (3, 300001)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_vs_torch(shape, dtype, reduction):
    n, c = shape
    x = randn(shape, dtype, scale=2.0)
    g = torch.Generator(device="cuda").manual_seed(1)
    t = torch.randint(0, c, (n,), generator=g, device="cuda")
    t[::7] = -100
    for eps in (0.0, 0.1):
        xr = x.double().requires_grad_(True)
        ref = F.cross_entropy(xr, t, reduction=reduction, label_smoothing=eps)
        (ref.sum()).backward()
        loss, grad = scuda.cross_entropy(x, t, reduction=reduction, label_smoothing=eps,
                                         return_grad=True)
        assert loss.dtype == x.dtype and grad.dtype == x.dtype
        close(loss, ref.detach(), dtype, k=4)
        close(grad, xr.grad, dtype, k=4)
        loss_only = scuda.cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
        torch.testing.assert_close(loss_only, loss)


def test_cross_entropy_z_loss_int32_axis1_and_bad_targets():
    x = randn((5, 7, 3), "float32")  # torch layout (N, C, d)
    t = torch.randint(0, 7, (5, 3), device="cuda", dtype=torch.int32)
    z = 1e-3
    xr = x.double().requires_grad_(True)
    lse = torch.logsumexp(xr, 1)
    ref = (F.cross_entropy(xr, t.long(), reduction="none") + z * lse**2).mean()
    ref.backward()
    loss, grad = scuda.cross_entropy(x, t, axis=1, z_loss=z, return_grad=True)
    close(loss, ref.detach(), "float32", k=4)
    close(grad, xr.grad, "float32", k=4)
    g = torch.empty_like(x)
    loss2, g2 = scuda.cross_entropy(x, t, axis=1, z_loss=z, return_grad=True, grad_out=g)
    assert g2 is g
    close(g, xr.grad, "float32", k=4)
    x2 = randn((6, 3000), "float32")
    t2 = torch.randint(0, 3000, (6,), device="cuda")
    g = torch.empty_like(x2)
    _, g2 = scuda.cross_entropy(x2, t2, return_grad=True, grad_out=g)
    assert g2 is g
    xr2 = x2.double().requires_grad_(True)
    F.cross_entropy(xr2, t2).backward()
    close(g, xr2.grad, "float32", k=4)
    with pytest.raises(ValueError, match="z_loss"):
        scuda.cross_entropy(x2, t2, z_loss=-1.0)
    bad = torch.tensor([0, 9], device="cuda")
    per = scuda.cross_entropy(randn((2, 4), "float32"), bad, reduction="none")
    assert torch.isfinite(per[0]) and torch.isnan(per[1])
    all_ignored = torch.full((3,), -100, device="cuda")
    assert torch.isnan(scuda.cross_entropy(randn((3, 4), "float32"), all_ignored))


def test_non_default_torch_stream_is_respected():
    s = torch.cuda.Stream()
    x = torch.zeros((256, 8192), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep s busy so work after it is visibly ordered
        x.copy_(randn((256, 8192), "float32", seed=3))
        y = scuda.softmax(x, axis=-1)
        lse = scuda.logsumexp(x, axis=-1)
    s.synchronize()
    ref = randn((256, 8192), "float32", seed=3).double()
    close(y, torch.softmax(ref, -1), "float32")
    close(lse, torch.logsumexp(ref, -1), "float32")


def test_cupy_arrays():
    cp = pytest.importorskip("cupy")
    x = cp.random.default_rng(0).standard_normal((33, 3000), dtype=cp.float32)
    xt = torch.as_tensor(x, device="cuda").double()
    y = scuda.softmax(x, axis=-1)
    assert isinstance(y, cp.ndarray)
    close(torch.as_tensor(y, device="cuda"), torch.softmax(xt, -1), "float32")
    lse = stablelse.logsumexp(x, axis=1)
    close(torch.as_tensor(lse, device="cuda"), torch.logsumexp(xt, 1), "float32")
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        z = scuda.log_softmax(x, axis=-1)
    s.synchronize()
    close(torch.as_tensor(z, device="cuda"), torch.log_softmax(xt, -1), "float32", k=4)
    x64 = cp.asarray(x, dtype=cp.float64)
    close(torch.as_tensor(scuda.logsumexp(x64, axis=1), device="cuda"),
          torch.logsumexp(xt, 1), "float64")


def test_jax_arrays():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    try:
        x = jax.device_put(jnp.arange(24, dtype=jnp.float32).reshape(4, 6), jax.devices("gpu")[0])
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    y = scuda.logsumexp(x, axis=1)
    ref = jax.scipy.special.logsumexp(x, axis=1)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-6)
