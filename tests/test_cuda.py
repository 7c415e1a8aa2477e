"""The CUDA path without a GPU: NVRTC compiles every kernel, the probe never panics, and the
__cuda_array_interface__ / DLPack parser handles what producers hand it."""

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import stablelse
import stablelse.cuda as scuda
from stablelse import _core

built = pytest.mark.skipif(
    not hasattr(_core, "_cuda_parse"), reason="stablelse built without the cuda feature"
)


def test_is_available_is_a_bool_and_never_raises():
    assert scuda.is_available() in (True, False)
    info = scuda.info()
    assert info["available"] is scuda.is_available()
    assert "cuda" in stablelse.info()


@built
def test_info_reports_why():
    info = scuda.info()
    assert info["built"] is True
    for key in ("driver_version", "nvrtc_version", "devices", "error"):
        assert key in info
    if not info["available"]:
        assert info["error"]
        assert info["devices"] == []


@built
def test_kernels_compile_for_sm80_and_sm90(monkeypatch):
    monkeypatch.setenv("STABLELSE_CACHE_DIR", "")
    info = scuda.info()
    if info["nvrtc_version"] is None:
        if os.environ.get("STABLELSE_REQUIRE_NVRTC"):
            pytest.fail(info["nvrtc_error"])
        pytest.skip(reason=f"NVRTC not found: {info['nvrtc_error']}")
    # The Rust test (cargo test --features cuda) compiles all eight (type, arch) pairs; here
    # two, through the Python entry point, with the on-disk CUBIN cache off.
    jobs = [("float32", "sm_80"), ("bfloat16", "sm_90")]
    with ThreadPoolExecutor(len(jobs)) as ex:
        sizes = list(ex.map(lambda j: _core._cuda_compile(*j), jobs))
    assert all(s > 1000 for s in sizes), sizes


@built
def test_compile_rejects_unknown_dtype():
    with pytest.raises(TypeError, match="int8"):
        _core._cuda_compile("int8", "sm_90")


# --------------------------------------------------------------------------- CAI


def cai(**kw):
    d = {"shape": (3, 4), "typestr": "<f4", "data": (0x7F0000001000, False), "version": 3}
    d.update(kw)
    return d


class Holder:
    def __init__(self, d):
        self.__cuda_array_interface__ = d


@built
def test_cai_contiguous_defaults():
    p = _core._cuda_parse(cai(strides=None, stream=None))
    assert p["ptr"] == 0x7F0000001000
    assert p["shape"] == (3, 4)
    assert p["strides"] == (4, 1)
    assert p["dtype"] == "float32"
    assert p["readonly"] is False
    assert p["stream"] is None
    assert p["protocol"] == "cai"


@built
def test_cai_strides_are_converted_to_elements():
    p = _core._cuda_parse(Holder(cai(typestr="<f2", strides=(2 * 16, 2 * 2), stream=7)))
    assert p["dtype"] == "float16"
    assert p["strides"] == (16, 2)
    assert p["stream"] == 7


@pytest.mark.parametrize(
    "typestr,name",
    [("<f4", "float32"), ("<f8", "float64"), ("<f2", "float16"), ("<i8", "int64"),
     ("<i4", "int32")],
)
@built
def test_cai_dtypes(typestr, name):
    assert _core._cuda_parse(cai(typestr=typestr))["dtype"] == name


@built
def test_cai_errors():
    with pytest.raises(TypeError, match="typestr"):
        _core._cuda_parse(cai(typestr=">f4"))
    with pytest.raises(TypeError, match="typestr"):
        _core._cuda_parse(cai(typestr="<c8"))
    with pytest.raises(ValueError, match="multiple"):
        _core._cuda_parse(cai(strides=(16, 3)))
    with pytest.raises(ValueError, match="do not match"):
        _core._cuda_parse(cai(strides=(16,)))
    with pytest.raises(ValueError, match="mask"):
        _core._cuda_parse(cai(mask=object()))
    with pytest.raises(ValueError, match="stream 0"):
        _core._cuda_parse(cai(stream=0))
    with pytest.raises(ValueError, match="null"):
        _core._cuda_parse(cai(data=(0, False)))
    with pytest.raises(ValueError, match="negative"):
        _core._cuda_parse(cai(shape=(-1, 4)))
    with pytest.raises(ValueError, match='no "shape"'):
        _core._cuda_parse({"typestr": "<f4", "data": (1, False)})
    with pytest.raises(TypeError, match="expected a CUDA array"):
        _core._cuda_parse(object())


@built
def test_cai_readonly_and_empty():
    p = _core._cuda_parse(cai(shape=(0, 5), data=(0, True)))
    assert p["readonly"] is True
    assert p["shape"] == (0, 5)


# --------------------------------------------------------------------------- DLPack


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32),
                ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


_keep = []


def capsule(shape, strides=None, code=2, bits=32, device_type=2, device_id=0,
            versioned=False, readonly=False, offset=0, name=None):
    """A DLPack capsule over a fake device pointer; the structs live in _keep (no destructor:
    the parser only reads, it never calls the deleter)."""
    nd = len(shape)
    shp = (ctypes.c_int64 * nd)(*shape)
    st = (ctypes.c_int64 * nd)(*strides) if strides is not None else None
    t = DLTensor(ctypes.c_void_p(0x7F0000002000), DLDevice(device_type, device_id), nd,
                 DLDataType(code, bits, 1), shp,
                 ctypes.cast(st, ctypes.POINTER(ctypes.c_int64)) if st is not None else None,
                 offset)
    if versioned:
        m = DLManagedTensorVersioned(1, 0, None, None, 1 if readonly else 0, t)
        default = b"dltensor_versioned"
    else:
        m = DLManagedTensor(t, None, None)
        default = b"dltensor"
    _keep.extend([shp, st, m])
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(m), name or default, None)


@built
def test_dlpack_capsule_basic():
    p = _core._cuda_parse(capsule((2, 3)))
    assert p["shape"] == (2, 3)
    assert p["strides"] == (3, 1)
    assert p["dtype"] == "float32"
    assert p["device"] == 0
    assert p["protocol"] == "dlpack"
    assert p["ptr"] == 0x7F0000002000


@built
def test_dlpack_strides_offset_dtypes_and_version():
    p = _core._cuda_parse(capsule((4, 5), strides=(10, 2), code=4, bits=16, offset=64,
                                  device_id=1, versioned=True, readonly=True))
    assert p["strides"] == (10, 2)
    assert p["dtype"] == "bfloat16"
    assert p["ptr"] == 0x7F0000002000 + 64
    assert p["device"] == 1
    assert p["readonly"] is True
    assert _core._cuda_parse(capsule((2,), code=2, bits=16))["dtype"] == "float16"
    assert _core._cuda_parse(capsule((2,), code=0, bits=64))["dtype"] == "int64"


@built
def test_dlpack_errors():
    with pytest.raises(ValueError, match="not CUDA"):
        _core._cuda_parse(capsule((2, 3), device_type=1))
    with pytest.raises(TypeError, match="code 5"):
        _core._cuda_parse(capsule((2,), code=5, bits=64))
    with pytest.raises(ValueError, match="consumed once"):
        _core._cuda_parse(capsule((2,), name=b"used_dltensor"))
    # A NumPy array speaks DLPack but lives on the CPU.
    with pytest.raises(ValueError, match="not CUDA"):
        _core._cuda_parse(np.zeros(3, dtype=np.float32))


class FakeDL:
    """An object speaking DLPack on a CUDA device, recording the stream it was asked for."""

    def __init__(self):
        self.stream = "unset"

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None):
        self.stream = stream
        return capsule((3,), versioned=max_version is not None)


@built
def test_dlpack_object_gets_the_stream():
    f = FakeDL()
    p = _core._cuda_parse(f, 5)
    assert f.stream == 5
    assert p["shape"] == (3,)


@built
def test_ops_without_gpu_raise_cleanly():
    if scuda.is_available():
        pytest.skip(reason="a GPU is present")
    x = Holder(cai())
    with pytest.raises(Exception) as ei:  # noqa: B017 - any clean Python error will do
        scuda.softmax(x, axis=-1)
    assert isinstance(ei.value, Exception)
    with pytest.raises(Exception):  # noqa: B017
        stablelse.logsumexp(x, axis=-1)


def test_cross_entropy_validates_options_before_touching_the_arrays():
    # The same specification as the CPU door: without a device library the arrays cannot be
    # read at all, so a bad option must be reported first, with the CPU door's exception.
    x, t = np.zeros((2, 3), np.float32), np.array([0, 1])
    cases = [
        ({"grad_out": x}, ValueError, "grad_out is given but return_grad is False"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float"),
        ({"z_loss": True}, TypeError, "z_loss must be a float, got bool"),
        ({"ignore_index": 2**63}, ValueError, "does not fit in int64"),
        ({"reduction": "avg"}, ValueError, "reduction must be 'mean', 'sum' or 'none'"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            scuda.cross_entropy(x, t, **kwargs)
        with pytest.raises(exc, match=msg):
            stablelse.cross_entropy(x, t, **kwargs)


def test_cuda_reduction_is_the_kernels_reduction():
    # One reduction enum: the CUDA binding parses names with the loss kernels' parser, so a
    # name the specification lets through always reaches the device as the same variant.
    from stablelse._spec import REDUCTIONS

    assert REDUCTIONS == ("mean", "sum", "none")
    import inspect

    for fn in (scuda.cross_entropy, stablelse.cross_entropy, stablelse.nll_loss):
        ann = inspect.signature(fn).parameters["reduction"].annotation
        assert ann == "Reduction", fn
