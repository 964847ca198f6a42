"""rotary_embedding (llmcore.ops.rotary): forward and gradient against float64 under the accuracy rule of
tests/accuracy.py, on every CPU kernel variant; transformers' apply_rotary_pos_emb and rotary embedding;
layouts (packed, padded, broadcast positions, a column slice of a fused projection); custom-op checks,
torch.compile, the fallbacks and bad input."""
import pytest
import torch
from accuracy import assert_close_to_truth, f64, outputs_and_grads

from llmcore.ops import rotary_embedding
from llmcore.ops.rotary import _rotary, rotary_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (x shape, cos shape): packed (T, H, D); padded (B, L, H, D) with per-row or shared positions; head dims from
# 2 to 256 (a half shorter than one vector, not a multiple of one, several), one head or many
SHAPES = [((7, 3, 64), (7, 64)), ((2, 5, 4, 6), (5, 6)), ((2, 5, 4, 6), (2, 5, 6)), ((9, 1, 2), (9, 2)),
          ((3, 2, 80), (3, 80)), ((1, 17, 7, 34), (17, 34)), ((4, 2, 256), (4, 256)), ((300, 2, 128), (300, 128))]


def _angles(cs_shape, seed=0, paired=False):
    """cos and sin (float64) of random angles, many turns as far positions have. ``paired``: both halves of a row
    hold the same angles, as every model's table does (a rotation); else each column its own, so that a kernel
    that swapped the halves' sines could not pass."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.randn(*cs_shape[:-1], cs_shape[-1] // (2 if paired else 1), generator=g, dtype=torch.float64) * 50
    if paired:
        angle = torch.cat((angle, angle), dim=-1)
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("cs_dtype", ["float32", "x"])  # float32 angles (bf16 autocast), or x's own dtype
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cs_shape", SHAPES)
def test_matches_float64(kernels, shape, cs_shape, dtype, cs_dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    cos, sin = _angles(cs_shape)
    cdt = torch.float32 if cs_dtype == "float32" else dtype
    cos, sin = cos.to(cdt), sin.to(cdt)
    ours = outputs_and_grads(lambda x: rotary_embedding(x, cos, sin), [x], [gy])
    theirs = outputs_and_grads(lambda x: rotary_reference(x, cos, sin), [x], [gy])
    truth = outputs_and_grads(lambda x: rotary_reference(x, cos.double(), sin.double()), f64([x]), [gy])
    assert_close_to_truth([*ours[0], *ours[1]], [*theirs[0], *theirs[1]], [*truth[0], *truth[1]], dtype,
                          f"rotary {tuple(shape)} {dtype} cos {cdt}")


def test_matches_transformers_llama(kernels):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb on q and k ((B, H, L, D) there, float32), with its
    angles of positions 0-299."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 300, 64, generator=g, dtype=torch.float32)
    k = torch.randn(2, 2, 300, 64, generator=g, dtype=torch.float32)
    pos = torch.arange(300)[None].expand(2, -1)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)  # (B, L, D) float32
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q = rotary_embedding(q.transpose(1, 2), cos, sin).transpose(1, 2)
    got_k = rotary_embedding(k.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (80, 10000.0), (128, 500000.0), (128, 1000000.0)])
def test_angles_match_transformers_bit_for_bit(head_dim, theta):
    """llmcore's RotaryEmbedding gives transformers' LlamaRotaryEmbedding's cos and sin exactly, out to 131072
    positions (a float64 inv_freq rounded to float32 put cos up to 8e-3 off there); head dims and thetas of Llama 2 / 3,
    Qwen2, Mistral."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from llmcore.nn import RotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=theta,
                                   max_position_embeddings=131072)
    pos = torch.arange(0, 131072, 7)
    want = LlamaRotaryEmbedding(cfg)(torch.zeros(1), pos[None])
    got = RotaryEmbedding(head_dim, theta).cos_sin(pos, torch.float32)
    for a, b in zip(got, want):
        assert torch.equal(a, b[0])


def test_reads_a_fused_projection_in_place():
    """q as a column slice of a fused qkv output (rows total-width apart): the kernel reads it where it lies."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(11, (6 + 2 * 2) * 32, generator=g, dtype=torch.bfloat16, requires_grad=True)
    q = qkv[:, :6 * 32].view(11, 6, 32)
    assert not q.is_contiguous()
    cos, sin = (t.float() for t in _angles((11, 32)))
    y = rotary_embedding(q, cos, sin)
    want = rotary_reference(q.detach().float(), cos, sin).to(torch.bfloat16)
    assert y.is_contiguous() and y.shape == q.shape
    torch.testing.assert_close(y.float(), want.float(), rtol=2**-7, atol=2**-7)
    y.backward(torch.ones_like(y))
    assert qkv.grad[:, 6 * 32:].abs().sum() == 0 and qkv.grad[:, :6 * 32].abs().sum() > 0


def test_fallbacks_take_the_reference():
    x = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in _angles((4, 8)))
    y = rotary_embedding(x, cos, sin)  # float64 and cos / sin needing gradients: the reference, differentiable
    torch.testing.assert_close(y, rotary_reference(x, cos, sin))
    y.sum().backward()
    assert cos.grad is not None and sin.grad is not None


def test_custom_ops_and_compile():
    x = torch.randn(6, 3, 16, dtype=torch.bfloat16)
    cos, sin = (t.float() for t in _angles((6, 16)))
    g = torch.randn_like(x)
    torch.library.opcheck(_rotary, (x, cos, sin, False, False))
    torch.library.opcheck(_rotary, (g, cos, sin, True, False))
    fn = torch.compile(lambda x: rotary_embedding(x, cos, sin), backend="aot_eager", fullgraph=True)
    xr = x.clone().requires_grad_()
    y = fn(xr)
    y.backward(g)
    torch.testing.assert_close(y, rotary_embedding(x, cos, sin))
    torch.testing.assert_close(xr.grad, _rotary(g, cos, sin, True, False))


def test_rotation_round_trip():
    """The backward is the inverse rotation (cos^2 + sin^2 = 1): rotating back returns x."""
    x = torch.randn(40, 3, 64, dtype=torch.float64).float()
    cos, sin = (t.float() for t in _angles((40, 64), paired=True))
    back = _rotary(rotary_embedding(x, cos, sin), cos, sin, True, False)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,cos_shape,message", [
    ((4, 2, 7), (4, 7), "head dim must be even"),
    ((4, 2, 8), (4, 6), r"cos and sin must have one shape \(\.\.\., 8\)"),
    ((4, 2, 8), (5, 8), r"do not broadcast over x \(4, 2, 8\)'s positions \(4,\)"),
    ((8,), (8,), r"x must be \(\.\.\., heads, head_dim\)"),
])
def test_bad_input(x_shape, cos_shape, message):
    with pytest.raises(ValueError, match=message):
        rotary_embedding(torch.randn(x_shape), torch.randn(cos_shape), torch.randn(cos_shape))


def test_bad_types():
    x = torch.randn(4, 2, 8)
    with pytest.raises(TypeError, match="x must be floating point"):
        rotary_embedding(x.long(), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="one shape"):
        rotary_embedding(x, torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(TypeError, match="kernels take float32"):  # the custom op itself checks what it indexes
        _rotary(x, torch.randn(4, 8), torch.randn(4, 8).double(), False, False)
    with pytest.raises(ValueError, match="backend=.gpu. is unknown"):
        rotary_embedding(x, torch.randn(4, 8), torch.randn(4, 8), backend="gpu")
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run this call: x is torch.float64 \(the kernels "
                                           r"take float32, bfloat16, float16\)"):
        rotary_embedding(x.double(), torch.randn(4, 8), torch.randn(4, 8), backend="cpu")
    # the refusal names its reason (it named only x's device and dtype)
    with pytest.raises(RuntimeError, match="cannot run this call: sin is torch.bfloat16 but cos is torch.float32"):
        rotary_embedding(x, torch.randn(4, 8), torch.randn(4, 8).bfloat16(), backend="cpu")
    with pytest.raises(RuntimeError, match="cannot run this call: cos / sin need gradients"):
        rotary_embedding(x, torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), backend="cpu")


def test_backend_reference_is_the_composite():
    x = torch.randn(6, 2, 8, dtype=torch.bfloat16)
    cos, sin = (t.float() for t in _angles((6, 8)))
    assert torch.equal(rotary_embedding(x, cos, sin, backend="reference"), rotary_reference(x, cos, sin))
