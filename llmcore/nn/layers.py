"""Layers on llmcore ops. A batch is either padded, (B, L, ...) with a key-padding mask, or
packed, (T, ...) with ``cu_seqlens``; ``Batch`` carries which, so every layer serves both."""
from __future__ import annotations

import functools
import sys
import threading

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from llmcore import ops
from llmcore.ops._autograd import _functorch_active, no_double_backward


@dataclass
class Batch:
    """How the tokens of a batch are laid out.

    Padded: hidden states (B, L, D); ``key_mask`` (B, L) bool, True for real tokens, or None.
    Packed: hidden states (T, D); ``cu_seqlens`` (n + 1,) int32, ``max_seqlen`` and ``min_seqlen``.
    """
    cu_seqlens: Optional[Tensor] = None
    max_seqlen: int = 0
    min_seqlen: int = 0
    key_mask: Optional[Tensor] = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def attn_mask(self) -> Optional[Tensor]:
        """The (B, 1, 1, L) boolean mask SDPA takes, or None when nothing is padded (eagerly: under torch.compile the
        mask, whatever it holds, as reading it is data-dependent control flow, which fullgraph=True refuses)."""
        if self.key_mask is None:
            return None
        if self.key_mask.dtype != torch.bool:  # (a float 1/0 mask would be added to the scores: nothing masked)
            raise TypeError(f"Batch.key_mask must be bool (True for real tokens), got {self.key_mask.dtype}")
        if not torch.compiler.is_compiling() and bool(self.key_mask.all()):
            return None
        return self.key_mask[:, None, None, :]


class LayerNorm(nn.Module):
    """LayerNorm on llmcore's fused kernel; ``forward(x, residual)`` adds the residual first
    and returns (normed, sum)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class Dropout(nn.Dropout):
    """Dropout on llmcore's Philox kernel: the mask is regenerated in the backward, not stored. A torch.nn.Dropout
    (not in place), so code that finds dropout by that type (to set ``p``, or to count it) finds llmcore's too."""

    def __init__(self, p: float = 0.1):
        super().__init__(p)  # (torch.nn.Dropout refuses a p outside [0, 1] when made)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """fc2(gelu(fc1(x) + b1)) with the bias and GELU fused (BERT: erf GELU; GPT-2: tanh)."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        if not plain_linear(self.fc1):  # (a hook, an adapter, a parametrization: fc1's own forward)
            return linear(nn.functional.gelu(self.fc1(x), approximate=self.approximate), self.fc2)
        h = nn.functional.linear(x, linear_weight(self.fc1))
        if self.fc1.bias is not None:
            bias, cast = self.fc1.bias, _autocast_dtype(h)
            if cast is not None and bias.dtype != cast:
                bias = bias.to(cast)  # autocast's linear adds its bias in the low precision too
            h = ops.bias_gelu(h, bias, approximate=self.approximate)
        else:
            h = nn.functional.gelu(h, approximate=self.approximate)
        return linear(h, self.fc2)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): Llama, Mistral, Qwen2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(ops.swiglu(linear(x, self.gate), linear(x, self.up)), self.down)


# How many holders a storage has (a private torch API): without it every gradient is fresh, as torch's.
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_GRAD_BUFFER_LOCK = threading.Lock()


class Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameters, state-dict names and forward) whose CPU backward writes
    the dense weight gradient into a buffer it reuses across steps.

    The dense gradient of a large table (30522 x 384 fp32 = 47 MB for BERT-base vocabularies) is
    mostly zeros; allocating it fresh every step costs page faults on the CPU (~10-40 ms here,
    more than the scatter itself). The buffer is reused only when nothing else holds it -- after
    ``zero_grad(set_to_none=True)`` dropped ``weight.grad`` -- so accumulated gradients and
    tensors a caller kept are never overwritten; otherwise a fresh one is allocated, as torch
    does. autograd takes the returned gradient as ``weight.grad`` without a copy, so hooks, DDP
    and gradient accumulation see an ordinary gradient. Rows equal to ``padding_idx`` get none.
    CUDA tensors, ``max_norm``, ``scale_grad_by_freq``, ``sparse`` and torch.compile'd code (without a
    row tracker) go to ``F.embedding``.

    ``row_tracker`` (set by ``llmcore.train.lazy_rows.LazyRowAdamW`` while it trains the table):
    told the ids before every lookup (``before_read``) and after every backward
    (``after_backward``), so an optimizer can update only the rows a step touched. When it has
    zeroed the rows it consumed (``mark_clean``), the next backward skips zeroing the buffer."""

    row_tracker = None
    dense_reads = False  # the weight is also read whole elsewhere (a tied LM head): its gradient is dense
    _clean_storage = None  # the buffer's storage while it is known to be all zeros

    def forward(self, input: Tensor) -> Tensor:
        if self.row_tracker is not None:
            self.row_tracker.before_read(input)
        w = self.weight
        if (w.device.type != "cpu" or not (torch.is_grad_enabled() and w.requires_grad) or self.max_norm is not None
                or self.scale_grad_by_freq or self.sparse
                or (torch.compiler.is_compiling() and self.row_tracker is None) or _functorch_active()):
            # compiled: the graph owns the gradient's memory (the buffer's storage calls broke the graph 7 times in
            # a patched MiniLM); a row tracker still needs its after_backward, so it keeps the buffer's path
            return super().forward(input)
        return _RecycledEmbedding.apply(input, w, self)

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the gradient buffer behind (a scratch storage: torch.save cannot pickle a
        bare UntypedStorage); the copy allocates its own at its first backward."""
        state = dict(self.__dict__)
        state.pop("_grad_storage", None)
        state.pop("_clean_storage", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A transformers model patched by llmcore.hf (this class is in every one) names its attention "llmcore"
        # in its config: a process unpickling it needs that name registered. transformers is loaded by then (the
        # model's own classes come first in the pickle).
        if "transformers" in sys.modules:
            try:
                from llmcore.hf import register

                register()
            except ImportError:  # a transformers without the registries: its models never ran patched
                pass

    def _grad_buffer(self) -> Tensor:
        """A tensor shaped like the weight, over storage that only this module holds (or fresh). The use count's
        check and the tensor that raises it are one step: two threads' backwards through one module passed the
        check together and summed their gradients into one buffer."""
        w = self.weight
        nbytes = w.numel() * w.element_size()
        with _GRAD_BUFFER_LOCK:
            store = getattr(self, "_grad_storage", None)
            if (store is None or store.nbytes() != nbytes or store.device != w.device or _use_count is None
                    or _use_count(store._cdata) != 1):
                store = torch.UntypedStorage(nbytes, device=w.device)
                self._grad_storage = store
            buf = torch.empty(0, dtype=w.dtype, device=w.device).set_(store, 0, w.shape, w.stride())
            clean, self._clean_storage = self._clean_storage is store, None  # (about to be written)
        if not clean:
            buf.zero_()
        return buf

    def mark_clean(self, grad: Tensor) -> None:
        """Say that ``grad`` is all zeros again (its holder zeroed the rows it was given): when it
        is this module's buffer, the next backward writes into it without zeroing it first."""
        store = getattr(self, "_grad_storage", None)
        if store is not None and grad.untyped_storage().data_ptr() == store.data_ptr():
            self._clean_storage = store


class _RecycledEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, module: Embedding) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.module = module
        return nn.functional.embedding(ids, weight, module.padding_idx)

    @staticmethod
    @no_double_backward  # the buffer is written in place: no double backward through it
    def backward(ctx, grad_out: Tensor):
        ids, = ctx.saved_tensors
        module = ctx.module
        flat = ids.reshape(-1)
        grad = grad_out.reshape(flat.numel(), grad_out.shape[-1])  # (no -1: zero ids make it ambiguous)
        if module.padding_idx is not None:
            grad = grad.masked_fill((flat == module.padding_idx)[:, None], 0)
        grad_weight = module._grad_buffer()
        grad_weight.index_add_(0, flat, grad.to(grad_weight.dtype))
        if module.row_tracker is not None:
            module.row_tracker.after_backward(flat)
        return None, grad_weight, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout, as HF's Llama/Qwen2), default scaling."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self) -> Tensor:
        # In float32 on the CPU, as transformers (and the reference implementations checkpoints were trained with)
        # compute it: float64 rounded to float32 differs in ~1 ulp of some frequencies, which the angle multiplies
        # by the position (cos off by up to 8e-3 at 131072 positions, head dim 128).
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.theta ** exponent)

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` (``from_pretrained(dtype=...)``, ``.half()``) rounded the frequencies too:
        cos off by up to 0.5 at positions past 1000 in bf16 (a probe). They stay float32 and are made again, on
        the CPU, for whichever device the module moves to (``to_empty`` included)."""
        super()._apply(fn, recurse)
        self.inv_freq = self._frequencies().to(self.inv_freq.device)
        return self

    def cos_sin(self, positions: Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., L, H, D) with cos/sin (..., L, D), in x's dtype (``llmcore.ops.rotary_embedding``). Under autocast the
    cos/sin are float32 and the projections bf16/fp16: the rotation is computed in float32 (as transformers does)
    and rounded back, as autocast's SDPA would cast it, so that q, k and v reach attention in one dtype."""
    return ops.rotary_embedding(x, cos, sin)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (GQA when kv_heads < heads) on
    llmcore's SDPA (padded) or varlen attention (packed)."""

    def __init__(self, dim: int, heads: int, kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 qkv_bias: bool = True, out_bias: bool = True, causal: bool = False, dropout: float = 0.0,
                 qk_norm_eps: Optional[float] = None, scale: Optional[float] = None):
        """``qk_norm_eps``: RMSNorm each head of q and k (weights of head_dim) before the rotary embedding,
        with this epsilon (Qwen3). ``scale``: the scores' factor (default 1/sqrt(head_dim))."""
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = head_dim or dim // heads
        self.q = nn.Linear(dim, self.heads * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o = nn.Linear(self.heads * self.head_dim, dim, bias=out_bias)
        self.causal = causal
        self.dropout = Dropout(dropout)  # (its p, read by the attention kernels; a module, as transformers' is)
        self.scale = scale
        if qk_norm_eps is not None:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, qk_norm_eps), RMSNorm(self.head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, batch: Batch, rotary: Optional[tuple] = None, first_only: bool = False) -> Tensor:
        """x (B, L, D) padded or (T, D) packed -> the same shape. ``first_only``: queries only at
        each sequence's first token (keys and values still cover the whole sequence), returning
        (B, 1, D) or (n, D) -- all that a classification head on the first token reads."""
        if x.dim() != (2 if batch.packed else 3):
            raise ValueError(f"Attention takes {'packed (T, D)' if batch.packed else 'padded (B, L, D)'} hidden "
                             f"states, got {x.dim()}-D {tuple(x.shape)}")
        shape = x.shape[:-1]
        xq = x
        if first_only:
            if self.causal or rotary is not None:
                raise ValueError("first_only is for bidirectional encoders without rotary embeddings")
            xq = x[batch.cu_seqlens[:-1].long()] if batch.packed else x[:, :1]
        q_shape = xq.shape[:-1]
        if first_only:
            q = linear(xq, self.q)
            k, v = _fused_linear(x, (self.k, self.v))
        else:
            q, k, v = _fused_linear(x, (self.q, self.k, self.v))
        q = q.view(*q_shape, self.heads, self.head_dim)
        k = k.view(*shape, self.kv_heads, self.head_dim)
        v = v.view(*shape, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if q.dtype != v.dtype:  # under autocast the norms' float32 weights promote q and k (as in transformers)
            q, k = q.to(v.dtype), k.to(v.dtype)  # autocast's SDPA would cast them to v's dtype
        p = self.dropout.p if self.training else 0.0
        if batch.packed:
            cu_q, max_q = batch.cu_seqlens, batch.max_seqlen
            if first_only:
                n = batch.cu_seqlens.numel() - 1
                cu_q, max_q = torch.arange(n + 1, dtype=torch.int32, device=x.device), 1
            out = ops.varlen_attention(q, k, v, cu_q, batch.cu_seqlens, max_q, batch.max_seqlen, dropout_p=p,
                                       is_causal=self.causal, scale=self.scale)
        else:
            mask = batch.attn_mask()
            if mask is not None and self.causal:
                mask = mask & torch.ones(shape[-1], shape[-1], dtype=torch.bool, device=x.device).tril()
            out = ops.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=p,
                is_causal=self.causal and mask is None, scale=self.scale,
                enable_gqa=self.kv_heads != self.heads).transpose(1, 2)
        return linear(out.reshape(*q_shape, self.heads * self.head_dim), self.o)


def linear_weight(lin: nn.Linear) -> Tensor:
    """``lin.weight``, or under bf16 autocast the bf16 copy an optimizer keeps of it while
    training (``llmcore.train.bf16_weights``: then autocast has nothing to cast)."""
    entry = getattr(lin.weight, "_llmcore_bf16", None)
    shadow = entry.for_forward() if entry is not None else None
    return lin.weight if shadow is None else shadow


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple(f"_global{name}" for name in _HOOK_DICTS)  # (torch.nn.modules.module's)


# hooks that read no rows of a call that asks for no hidden states or attentions: torch's (FSDP2's and composable
# checkpointing's pre/post-forward hooks) and transformers 5's output capturing (installed on the layers at the first
# call that asks for them, then recording only in such calls, which run the whole layer)
_NOT_USERS_HOOKS = ("torch.", "transformers.utils.output_capturing")


def _users_hook(hook) -> bool:
    while isinstance(hook, functools.partial):  # (FullyShardedDataParallel's hooks are partials of its functions)
        hook = hook.func
    return not (getattr(hook, "__module__", None) or type(hook).__module__ or "").startswith(_NOT_USERS_HOOKS)


def hooks_see_layer_output(model: nn.Module, path: str, last: nn.Module) -> bool:
    """Whether a hook of the user's sees what the first-token layer changes: a forward or backward hook on the last
    layer or any module in it (they would see (B, 1, H) rows), on a module between the classifier and the layer
    (its base model, encoder), or a global module hook."""
    if any(map(_users_hook, (h for name in _GLOBAL_HOOK_DICTS for h in getattr(torch_module, name, {}).values()))):
        return True
    parts = path.split(".")
    between = [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
    return any(_users_hook(h) for m in (*between, *last.modules()) for name in _HOOK_DICTS
               for h in getattr(m, name, {}).values())


def plain_linear(lin: nn.Module) -> bool:
    """Whether ``lin`` is an ``nn.Linear`` whose forward nothing watches or changes: no hook of its own or global,
    not a subclass (an adapter such as LoRA's, a parametrization's class). Only such a layer may be computed from
    its weight directly (fused with others, through the bf16 copy); any other is called, so that its hooks run and
    its own forward counts."""
    return type(lin) is nn.Linear and unwatched(lin)


def unwatched(m: nn.Module) -> bool:
    """Whether no hook watches ``m``'s calls: no forward or backward hook of its own, and no global module hook.
    Only then may a fused forward compute it without calling it (its hooks would not run)."""
    return (not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
            and not any(getattr(torch_module, name, None) for name in _GLOBAL_HOOK_DICTS))


def linear(x: Tensor, lin: nn.Linear) -> Tensor:
    """``lin(x)``: through ``linear_weight`` when ``plain_linear(lin)``, else by its own forward."""
    if not plain_linear(lin):
        return lin(x)
    return nn.functional.linear(x, linear_weight(lin), lin.bias)


def _fused_linear(x: Tensor, linears: tuple) -> tuple:
    """``tuple(lin(x) for lin in linears)`` as one GEMM on the concatenated weights: one pass over
    x (and, under autocast, one cast of it) instead of one per projection, and a wider matrix.
    The outputs are column slices of one (..., sum of widths) tensor. Under autocast the pieces
    are cast before they are concatenated (the same values; the copy moves half the bytes)."""
    if not all(map(plain_linear, linears)):
        return tuple(linear(x, lin) for lin in linears)
    cast = _autocast_dtype(x)

    def piece(t: Tensor) -> Tensor:
        return t.to(cast) if cast is not None and t.is_floating_point() else t

    weight = torch.cat([piece(linear_weight(lin)) for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = torch.cat([piece(b) for b in biases]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        bias = torch.cat([piece(b) if b is not None else piece(lin.weight.new_zeros(lin.out_features))
                          for b, lin in zip(biases, linears)])
    return nn.functional.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would give a linear layer's operands on x's device, or None when off."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def positions_of(batch: Batch, length: int, device) -> Tensor:
    """Position ids: 0.. per sequence, packed (T,) or padded (1, L)."""
    if batch.packed:
        cu = batch.cu_seqlens.long()
        total = int(cu[-1])
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
        return torch.arange(total, device=device) - starts
    return torch.arange(length, device=device)[None]


def init_linear_(module: nn.Module, std: float) -> None:
    """HF's initialization: normal(0, std) weights, zero biases and padding rows, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


__all__ = ["Attention", "Batch", "Dropout", "Embedding", "GatedMLP", "LayerNorm", "MLP", "RMSNorm", "RotaryEmbedding",
           "apply_rotary", "positions_of", "init_linear_"]
