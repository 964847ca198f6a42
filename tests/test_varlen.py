"""llmcore.varlen_attention: packed sequences against a per-sequence float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import llmcore

from attention_checks import check_varlen, cu


RAGGED = [
    [5, 1, 0, 97, 64, 3],
    [1],
    [130, 0, 0, 7],
    [33] * 5,
    # Many short sequences (SST-2-like): the kernels' local paths then hand out work a whole sequence
    # (all its kv heads) at a time when there are at least 4 per thread (kernel_common.h, local_chunk).
    [3, 17, 0, 1, 9, 40, 2, 11, 5, 26, 1, 8, 13, 0, 31, 6, 19, 4, 7, 22],
]


@pytest.mark.parametrize("lens", RAGGED)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_ragged(lens, is_causal, dtype):
    check_varlen(lens, lens, 4, 2, 64, dtype, is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_different_q_and_k_lengths(is_causal):
    # bottom-right causal; sequence 1 has more queries than keys, so its first rows see nothing
    check_varlen([4, 9, 1, 70], [10, 3, 5, 70], 2, 2, 80, torch.float32, is_causal)


def test_varlen_sequences_never_see_each_other():
    lens = [7, 12, 1, 30]
    c = cu(lens)
    q, k, v = (torch.randn(sum(lens), 2, 32) for _ in range(3))
    out = llmcore.varlen_attention(q, k, v, c, c, 30, 30)
    k2, v2 = k.clone(), v.clone()
    k2[7:19] += 100 * torch.randn(12, 2, 32)  # change only sequence 1's keys and values
    v2[7:19] += 100
    out2 = llmcore.varlen_attention(q, k2, v2, c, c, 30, 30)
    torch.testing.assert_close(out[:7], out2[:7], rtol=0, atol=0)
    torch.testing.assert_close(out[19:], out2[19:], rtol=0, atol=0)
    assert not torch.allclose(out[7:19], out2[7:19])


def test_varlen_equals_padded_sdpa_with_key_mask():
    lens = [3, 17, 9]
    n, L, H, D = len(lens), max(lens), 3, 32
    c = cu(lens)
    q, k, v = (torch.randn(sum(lens), H, D) for _ in range(3))
    packed = llmcore.varlen_attention(q, k, v, c, c, L, L)
    valid = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]
    def pad(x):
        out = x.new_zeros(n, L, H, D)
        out[valid] = x
        return out.transpose(1, 2)
    padded = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    torch.testing.assert_close(packed, padded.transpose(1, 2)[valid], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_every_cpu_isa(cpu_isa, is_causal):
    check_varlen([5, 1, 0, 97, 3], [5, 1, 0, 97, 3], 4, 2, 48, torch.float32, is_causal)
    # unequal lengths: bottom-right causal tiles start between panel boundaries
    check_varlen([4, 9, 1, 70, 130], [10, 3, 5, 77, 141], 2, 2, 80, torch.float32, is_causal)


def test_varlen_without_keys_returns_zeros():
    q = torch.randn(5, 2, 16, requires_grad=True)
    k = v = torch.randn(0, 2, 16)
    out = llmcore.varlen_attention(q, k, v, cu([2, 3]), cu([0, 0]), 3, 0)
    assert out.shape == (5, 2, 16) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        llmcore.varlen_attention(q, k, v, cu([2, 3]), cu([0, 1]), 3, 1)


def test_meta_tensors_give_shapes():
    """On the meta device (a model traced for its shapes) varlen attention read cu_seqlens' values and failed with
    torch's "Cannot copy out of meta tensor" (a probe); it gives the output's shape and dtype, as sdpa does."""
    q, k, v = (torch.empty(7, 2, 16, device="meta") for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")
    out = llmcore.varlen_attention(q, k, v[..., :8].contiguous(), cu, cu, 4, 4)
    assert out.device.type == "meta" and out.shape == (7, 2, 8) and out.dtype == q.dtype
