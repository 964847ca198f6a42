"""The Triton rotary kernel (rotary_embedding(..., backend="triton")) against float64, forward and gradient, under
the accuracy rule of tests/accuracy.py, and against the native CPU kernel.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set by the autouse
fixture for each test only; test_triton_attention.py explains why that is enough); with a GPU, on CUDA tensors,
at full shapes too.
"""
import pytest
import torch
from accuracy import assert_close_to_truth, f64, outputs_and_grads

from llmcore.ops import rotary_embedding
from llmcore.ops import triton as triton_ops
from llmcore.ops.rotary import _rotary, rotary_reference

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

pytestmark = pytest.mark.skipif(not triton_ops.installed(), reason="triton is not installed")

# (x shape, cos shape): packed, padded with shared or per-row positions; head dims 2 to 256 (halves not a power
# of 2: 3, 40, 17); heads from 1 to 9 (blocks of heads not filled)
SHAPES = [((7, 3, 64), (7, 64)), ((2, 5, 4, 6), (5, 6)), ((2, 5, 4, 6), (2, 5, 6)), ((9, 1, 2), (9, 2)),
          ((3, 9, 80), (3, 80)), ((1, 6, 5, 34), (6, 34)), ((4, 2, 256), (4, 256))]
if GPU:
    SHAPES += [((4096, 32, 128), (4096, 128)), ((2, 2048, 8, 128), (2048, 128))]


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _angles(cs_shape, seed=0):
    """Random angles, each column its own (so a swap of the halves' sines cannot pass), many turns."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.randn(cs_shape, generator=g, dtype=torch.float64) * 50
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("cs_dtype", ["float32", "x"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,cs_shape", SHAPES)
def test_matches_float64(shape, cs_shape, dtype, cs_dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    cos, sin = _angles(cs_shape)
    cdt = torch.float32 if cs_dtype == "float32" else dtype
    cos, sin = cos.to(DEVICE, cdt), sin.to(DEVICE, cdt)
    ours = outputs_and_grads(lambda x: rotary_embedding(x, cos, sin, backend="triton"), [x], [gy], DEVICE)
    theirs = outputs_and_grads(lambda x: rotary_reference(x, cos, sin), [x], [gy], DEVICE)
    truth = outputs_and_grads(lambda x: rotary_reference(x, cos.cpu().double(), sin.cpu().double()), f64([x]), [gy])
    assert_close_to_truth([*ours[0], *ours[1]], [*theirs[0], *theirs[1]], [*truth[0], *truth[1]], dtype,
                          f"triton rotary {tuple(shape)} {dtype} cos {cdt}")


@pytest.mark.skipif(GPU, reason="the native kernel runs on the CPU")
def test_equals_the_native_kernel():
    """The two kernels compute the same float32 expressions: equal up to the native kernel's fused multiply-add."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(13, (5 + 2) * 48, generator=g)
    q = qkv[:, :5 * 48].view(13, 5, 48)  # a column slice of a fused projection, read in place
    cos, sin = (t.float() for t in _angles((13, 48)))
    for transpose in (False, True):
        torch.testing.assert_close(_rotary(q, cos, sin, transpose, True), _rotary(q, cos, sin, transpose, False),
                                   rtol=1e-6, atol=1e-6)


def test_opcheck_and_autograd():
    x = torch.randn(6, 3, 16, dtype=torch.bfloat16, device=DEVICE)
    cos, sin = (t.float().to(DEVICE) for t in _angles((6, 16)))
    torch.library.opcheck(_rotary, (x, cos, sin, False, True))
    torch.library.opcheck(_rotary, (x, cos, sin, True, True))
    xr = x.clone().requires_grad_()
    y = rotary_embedding(xr, cos, sin, backend="triton")
    y.backward(x)
    torch.testing.assert_close(xr.grad, _rotary(x, cos, sin, True, True))


@pytest.mark.skipif(GPU, reason="checks the refusal without a GPU")
def test_triton_backend_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this call"):
        rotary_embedding(x, torch.randn(4, 8), torch.randn(4, 8), backend="triton")
