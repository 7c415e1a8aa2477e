"""stablelse.torch: autograd functions checked by gradcheck and against torch's own ops.

Skipped where torch is not installed. The CUDA tests run only on a machine with a GPU.
"""

import doctest
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import stablelse  # noqa: E402
import stablelse.torch as st  # noqa: E402

REDUCTIONS = ["mean", "sum", "none"]
# Logits shapes: torch's (N, C), (N, C, d1) and unbatched (C,) layouts.
SHAPES = [(4, 5), (3, 4, 2), (5,)]
# (name, kwargs, probability targets?); ignore_index hits the targets set to -1 / 3.
OPTIONS = [
    ("plain", {}, False),
    ("weight", {"weight": True}, False),
    ("ignore", {"ignore_index": 1}, False),
    ("smooth", {"label_smoothing": 0.2}, False),
    ("weight_smooth_ignore", {"weight": True, "label_smoothing": 0.3, "ignore_index": 2}, False),
    ("probs", {}, True),
    ("probs_weight_smooth", {"weight": True, "label_smoothing": 0.25}, True),
]


def _case(shape, kw, probs, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    c = shape[1] if len(shape) >= 2 else shape[0]
    batch = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    if probs:
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        t = (t / t.sum(dim=1 if len(shape) >= 2 else 0, keepdim=True)).to(dtype)
    else:
        t = torch.randint(0, c, batch, generator=g)
        if "ignore_index" in kw:
            if t.dim():
                t.view(-1)[::2] = kw["ignore_index"]  # ignore half of them, keep the others
            else:
                t.fill_((kw["ignore_index"] + 1) % c)  # unbatched: one target, not ignored
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, generator=g, dtype=torch.float64).add_(0.5).to(dtype)
    return x, t, kw


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,kw,probs", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_cross_entropy_gradcheck(name, kw, probs, shape, reduction):
    x, t, kw = _case(shape, kw, probs)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: st.cross_entropy(a, t, reduction=reduction, **kw), (x,)
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,kw,probs", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_matches_torch(name, kw, probs, shape, reduction, dtype):
    x, t, kw = _case(shape, kw, probs, dtype)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5,
                                                                         "atol": 1e-6}
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    got = st.cross_entropy(xa, t, reduction=reduction, **kw)
    ref = F.cross_entropy(xb, t, reduction=reduction, **kw)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **tol)
    # A non-uniform upstream gradient: "none" must scale each row by its own grad_output.
    up = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
    (got * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kw", [{}, {"weight": True, "label_smoothing": 0.2}], ids=["plain", "ws"])
def test_probability_target_gradient(kw, reduction):
    """Soft labels that require grad (distillation): d loss / d target, as torch."""
    x, t, kw = _case((3, 4, 2), kw, True)
    x.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: st.cross_entropy(a, b, reduction=reduction, **kw), (x, t)
    )
    tb = t.detach().clone().requires_grad_(True)
    st.cross_entropy(x.detach(), t, reduction=reduction, **kw).sum().backward()
    F.cross_entropy(x.detach(), tb, reduction=reduction, **kw).sum().backward()
    torch.testing.assert_close(t.grad, tb.grad)


def _z_reference(x, t, z, reduction, **kw):
    """torch's cross-entropy plus z * logsumexp**2 per non-ignored element (count mean)."""
    ce = F.cross_entropy(x, t, reduction=reduction, **kw)
    keep = (t != kw.get("ignore_index", -100)).to(x.dtype)
    zt = z * torch.logsumexp(x, dim=1) ** 2 * keep
    if reduction == "none":
        return ce + zt
    return ce + (zt.sum() / keep.sum() if reduction == "mean" else zt.sum())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_gradcheck_and_value(reduction):
    x, t, kw = _case((6, 5), {"ignore_index": 0, "weight": True}, False)
    x.requires_grad_(True)
    fn = lambda a: st.cross_entropy(a, t, reduction=reduction, z_loss=1e-2, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    torch.testing.assert_close(fn(x), _z_reference(x, t, 1e-2, reduction, **kw))


def test_backward_reuses_the_fused_gradient(monkeypatch):
    """One kernel call with return_grad=True in the forward, none in the backward."""
    calls = []
    real = stablelse.cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs["return_grad"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stablelse, "cross_entropy", spy)
    for name in ("softmax", "log_softmax", "logsumexp", "softmax_backward",
                 "log_softmax_backward"):
        monkeypatch.setattr(stablelse, name, None)  # any call in the backward would fail
    x = torch.randn(8, 6, requires_grad=True)
    loss = st.cross_entropy(x, torch.randint(0, 6, (8,)))
    assert calls == [True]
    loss.backward()
    assert calls == [True] and x.grad is not None
    with torch.no_grad():
        st.cross_entropy(x, torch.randint(0, 6, (8,)))
    st.cross_entropy(x.detach(), torch.randint(0, 6, (8,)))
    assert calls == [True, False, False]  # no gradient wanted: the loss alone


def test_cpu_tensors_are_passed_without_copy(monkeypatch):
    seen = {}
    real = stablelse.cross_entropy

    def spy(logits, target, **kwargs):
        seen["x"], seen["t"] = logits, target
        return real(logits, target, **kwargs)

    monkeypatch.setattr(stablelse, "cross_entropy", spy)
    x = torch.randn(4, 7, 3, requires_grad=True)
    t = torch.randint(0, 7, (4, 3))
    st.cross_entropy(x, t).backward()
    assert np.shares_memory(seen["x"], x.detach().numpy())
    assert np.shares_memory(seen["t"], t.numpy())


def test_retain_graph_backward_twice_gives_the_same_gradient():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = st.cross_entropy(x, torch.tensor([0, 1, 2, 3, 0]), reduction="none")
    loss.sum().backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(x.grad, 2 * g1)


def test_non_contiguous_input():
    base = torch.randn(5, 4, 3, dtype=torch.float64)
    x = base.transpose(0, 2).requires_grad_(True)  # (3, 4, 5), strided
    t = torch.randint(0, 4, (3, 5))
    assert torch.autograd.gradcheck(lambda a: st.cross_entropy(a, t, reduction="none"), (x,))
    torch.testing.assert_close(st.cross_entropy(x, t), F.cross_entropy(x, t))


def test_module_matches_torch_and_keeps_weight_as_buffer():
    w = torch.tensor([1.0, 2.0, 0.5])
    ours = st.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    assert "weight" in ours.state_dict()
    ours, ref = ours.double(), ref.double()  # the buffer follows dtype moves
    assert ours.weight.dtype == torch.float64
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(ours(x, t), ref(x, t))
    assert "label_smoothing=0.1" in repr(ours)


@pytest.mark.parametrize("size_average,reduce,expected", [
    (None, False, "none"), (False, None, "sum"), (True, True, "mean"), (False, True, "sum"),
])
def test_legacy_reduction_arguments(size_average, reduce, expected):
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 1])
    with pytest.warns(UserWarning, match="reduction"):
        got = st.cross_entropy(x, t, None, size_average, -100, reduce)
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction=expected))
    with pytest.warns(UserWarning, match="reduction"):
        mod = st.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert mod.reduction == expected


def test_all_ignored_and_empty_batches_are_nan_like_torch():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.full((3,), -100)
    loss = st.cross_entropy(x, t)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x, t))
    e = torch.zeros(0, 4, dtype=torch.float64)
    assert torch.isnan(st.cross_entropy(e, torch.zeros(0, dtype=torch.long)))


def test_extreme_logits_stay_finite():
    x = torch.tensor([[1000.0, 1.0, -1000.0], [2.0, 1.0, 0.1]], requires_grad=True)
    loss = st.cross_entropy(x, torch.tensor([2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), torch.tensor([2, 0])))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs_keep_their_dtype(dtype, tol):
    x = torch.randn(6, 5).to(dtype).requires_grad_(True)
    t = torch.randint(0, 5, (6,))
    loss = st.cross_entropy(x, t)
    loss.backward()
    assert loss.dtype == dtype and x.grad.dtype == dtype
    xr = x.detach().double().requires_grad_(True)
    F.cross_entropy(xr, t).backward()
    torch.testing.assert_close(loss.double(), F.cross_entropy(xr, t), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol)
    y = st.softmax(x, dim=1)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), torch.softmax(xr, 1), rtol=tol, atol=tol)


def test_errors():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="torch.int64"):
        st.cross_entropy(torch.zeros(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="torch.int32"):
        st.softmax(torch.zeros(3, dtype=torch.int32), dim=0)
    with pytest.raises(TypeError, match="meta"):
        st.logsumexp(torch.zeros(3, device="meta"), 0)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        st.cross_entropy(x, [0, 1, 2])
    with pytest.raises(IndexError, match=r"target\[1\] = 7"):
        st.cross_entropy(x, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="reduction"):
        st.cross_entropy(x, torch.tensor([0, 1, 1]), reduction="avg")
    w = torch.ones(4, requires_grad=True)
    loss = st.cross_entropy(x.requires_grad_(True), torch.tensor([0, 1, 1]), weight=w)
    with pytest.raises(RuntimeError, match="derivative for 'weight'"):
        loss.backward()


# --------------------------------------------------------------------------- softmax family


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family_gradcheck_and_values(name, dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    ours, ref = getattr(st, name), getattr(F, name)
    assert torch.autograd.gradcheck(lambda a: ours(a, dim=dim), (x,))
    torch.testing.assert_close(ours(x, dim=dim), ref(x, dim=dim))
    up = torch.randn(3, 4, 5, dtype=torch.float64)
    ga, = torch.autograd.grad((ours(x, dim=dim) * up).sum(), x)
    gb, = torch.autograd.grad((ref(x, dim=dim) * up).sum(), x)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family_float32_dtype_arg_and_implicit_dim(name):
    ours, ref = getattr(st, name), getattr(F, name)
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x, dim=1), ref(x, dim=1))
    got = ours(x, dim=1, dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref(x, dim=1, dtype=torch.float64))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        got = ours(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(got, ref(x))


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dim", [0, -1, (0, 2), [1, 2], (0, 1, 2)], ids=str)
def test_logsumexp_gradcheck_and_values(dim, keepdim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: st.logsumexp(a, dim, keepdim), (x,))
    torch.testing.assert_close(st.logsumexp(x, dim, keepdim), torch.logsumexp(x, dim, keepdim))
    x32 = x.detach().float()
    torch.testing.assert_close(st.logsumexp(x32, dim, keepdim), torch.logsumexp(x32, dim, keepdim))


def test_zero_dim_inputs():
    x = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    for fn in (lambda a: st.logsumexp(a, 0), lambda a: st.softmax(a, 0),
               lambda a: st.log_softmax(a, -1)):
        assert torch.autograd.gradcheck(fn, (x,))
    torch.testing.assert_close(st.logsumexp(x, 0), torch.logsumexp(x, 0))


def test_training_step_under_torch_compile():
    """torch.compile runs the model compiled and the stablelse call eagerly (a graph break)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    loss_fn = st.CrossEntropyLoss()
    step = torch.compile(lambda xb, yb: loss_fn(model(xb), yb), backend="eager")
    xb, yb = torch.randn(32, 8), torch.randint(0, 4, (32,))
    loss = step(xb, yb)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(model(xb), yb))
    assert all(p.grad is not None for p in model.parameters())


def test_import_stablelse_does_not_import_torch():
    code = "import sys, stablelse; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    assert doctest.testmod(st, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# --------------------------------------------------------------------------- CUDA tensors


def _cuda_ready():
    try:
        import stablelse.cuda as scuda
    except ImportError:
        return False
    return torch.cuda.is_available() and scuda.is_available()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="no CUDA device")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kw", [{}, {"ignore_index": 1}, {"label_smoothing": 0.2}],
                         ids=["plain", "ignore", "smooth"])
def test_cuda_cross_entropy_matches_torch(kw, shape, reduction):
    x, t, kw = _case(shape, kw, False)
    x, t = x.cuda().requires_grad_(True), t.cuda()
    assert torch.autograd.gradcheck(lambda a: st.cross_entropy(a, t, reduction=reduction, **kw),
                                    (x,))
    xb = x.detach().clone().requires_grad_(True)
    got = st.cross_entropy(x, t, reduction=reduction, **kw)
    ref = F.cross_entropy(xb, t, reduction=reduction, **kw)
    assert got.device == x.device
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xb.grad)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_cuda_softmax_family_and_logsumexp(name):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    ours, ref = getattr(st, name), getattr(F, name)
    assert torch.autograd.gradcheck(lambda a: ours(a, dim=1), (x,))
    torch.testing.assert_close(ours(x, dim=1), ref(x, dim=1))
    assert torch.autograd.gradcheck(lambda a: st.logsumexp(a, (0, 2)), (x,))
    torch.testing.assert_close(st.logsumexp(x, -1), torch.logsumexp(x, -1))
