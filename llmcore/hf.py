"""llmcore's kernels inside unmodified Hugging Face ``transformers`` models.

Two entry points:

* :func:`register` adds an attention implementation called ``"llmcore"`` to transformers'
  registries, so ``from_pretrained(..., attn_implementation="llmcore")`` (or
  ``config._attn_implementation = "llmcore"`` before ``from_config``) runs
  :func:`llmcore.ops.scaled_dot_product_attention`, or :func:`llmcore.ops.varlen_attention`
  for padding-free batches that carry FlashAttention's ``cu_seq_lens_*`` kwargs; inference calls with fewer query
  rows than ``TORCH_BELOW["attention"]`` (a decode step) run torch's SDPA, faster there.
* :func:`patch` switches a built model to ``"llmcore"`` attention and swaps llmcore's fused
  ops into the norm, MLP, RoPE, dropout and embedding modules it recognises; for GPT-2 /
  Llama-family causal LMs in training with labels, the chunked LM-head loss (which holds no
  logits); for BERT-family sequence classifiers, a last layer that computes the first token
  only. Parameters and state_dict keys are kept, so ``save_pretrained`` and
  ``load_state_dict`` work as before.

The attention function follows transformers' sdpa integration
(``transformers/integrations/sdpa_attention.py``) decision for decision, so the two agree
to kernel rounding: masks come from transformers' ``sdpa_mask`` (boolean, True = attend),
``is_causal`` is used only when no mask was built, and under autocast q, k and v are cast to
the autocast dtype as autocast does for ``torch.nn.functional.scaled_dot_product_attention``.
Tested against transformers 5.24.
"""
from __future__ import annotations

import contextlib
import dis
import functools
import logging
import sys
import threading
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import llmcore.ops as _ops
from llmcore.nn.layers import Embedding as _Embedding
from llmcore.nn.layers import hooks_see_layer_output, unwatched
from llmcore.ops import scaled_dot_product_attention, varlen_attention
from llmcore.ops.attention import autocast_enabled as _autocast_on
from llmcore.ops.dispatch import _DEFAULT_BACKEND

__all__ = ["NAME", "TORCH_BELOW", "attention_forward", "patch", "register"]

logger = logging.getLogger(__name__)

NAME = "llmcore"
_MIN_TRANSFORMERS = "4.53"  # the first release with masking_utils.AttentionMaskInterface
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Tensor arguments transformers passes an attention function that do not change what it computes; any other
# tensor (a sinks parameter, a sparse-attention index set: Inkling2's ``sinks``, DeepSeek-V3.2's ``indices``) is
# refused rather than dropped (a probe: both ran as dense attention, logits off by 0.05-0.5).
_INERT_TENSOR_KWARGS = frozenset({*_VARLEN_KWARGS, "position_ids", "num_items_in_batch", "cache_position",
                                  "token_type_ids"})
# Inference calls with fewer rows than these (tokens; attention: query rows per head) run transformers' own
# computation (torch's ops, torch's SDPA) instead of llmcore's: llmcore's ops pay ~15-35 us of Python a call before
# their kernels start, torch's ~4-7, which small calls never earn back; a decode step of generation has one row a
# sequence. Measured with `python benchmarks/small_calls.py` (fp32, no gradient, the 2-core Xeon;
# benchmarks/results/small-calls-cpu-xeon.md): the first row counts from which llmcore's op stayed faster, except
# swiglu and attention, within noise of torch from 16 to ~64 rows, which hand over only their clear losses. layer_norm's
# forward alone loses up to ~1,000 rows; its fused backward wins from ~1,000, and training keeps it. Calls in which a
# tensor needs a gradient, CUDA tensors and torch.compile keep llmcore's ops at every size. Set a value to 0 to run
# llmcore's op at every size (the tests of the ops inside models do).
TORCH_BELOW = {"attention": 16, "layer_norm": 4096, "rms_norm": 64, "bias_gelu": 4, "swiglu": 16,
               "rotary_embedding": 64}


def _rows(x: Tensor) -> int:
    """Rows of x (..., features): its tokens."""
    return x.numel() // max(x.shape[-1], 1)


def _torch_serves(op: str, rows: int, *tensors) -> bool:
    """Whether transformers' own computation serves this call of ``op`` (see ``TORCH_BELOW``): fewer rows than
    its threshold, CPU tensors (the first decides), and no gradient to compute."""
    if rows >= TORCH_BELOW[op] or not tensors[0].is_cpu:
        return False
    if torch.is_grad_enabled():  # (a loop: a generator expression cost ~1 us of a decode step's many calls)
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------
# registration


def _require_transformers():
    """transformers' (AttentionInterface, AttentionMaskInterface, sdpa_mask), or a clear ImportError."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"llmcore.hf needs Hugging Face transformers>={_MIN_TRANSFORMERS}; install it with "
                          f"`pip install 'transformers>={_MIN_TRANSFORMERS}'` ({e})") from e
    from packaging.version import Version

    version = getattr(transformers, "__version__", "0")
    if Version(version) < Version(_MIN_TRANSFORMERS):
        raise ImportError(f"llmcore.hf needs transformers>={_MIN_TRANSFORMERS} (for AttentionInterface and "
                          f"AttentionMaskInterface), found {version}; upgrade with "
                          f"`pip install -U 'transformers>={_MIN_TRANSFORMERS}'`")
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise ImportError(f"transformers {version} lacks the attention registries llmcore.hf uses ({e})") from e
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register() -> str:
    """Register llmcore attention with transformers under the name ``"llmcore"``; returns the name.

    Registers :func:`attention_forward` in ``AttentionInterface`` and transformers' own
    ``sdpa_mask`` in ``AttentionMaskInterface`` (without a mask function registered under the
    name, transformers builds no mask at all). Idempotent.

    >>> from transformers import AutoModelForSequenceClassification
    >>> name = register()
    >>> model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=name)  # doctest: +SKIP
    """
    attention_interface, mask_interface, sdpa_mask = _require_transformers()
    attention_interface.register(NAME, attention_forward)
    mask_interface.register(NAME, sdpa_mask)
    return NAME


# ---------------------------------------------------------------------------------------
# the attention function transformers calls


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract, computed by llmcore.

    Shapes: query (B, Hq, Lq, E), key (B, Hkv, Lk, E), value (B, Hkv, Lk, Ev), Hq a multiple
    of Hkv; ``attention_mask`` None or broadcastable to (B, Hq, Lq, Lk), boolean (True =
    attend) or additive float. Returns ((B, Lq, Hq, Ev), None): transformers expects the
    heads after the positions, and llmcore never materialises attention weights.

    With all of ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q`` and ``max_length_k``
    in ``kwargs`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), B must be
    1 and the sequences packed along L run through :func:`llmcore.ops.varlen_attention`;
    ``attention_mask`` is then ignored, as FlashAttention ignores it, and a ``sliding_window``
    is refused unless no sequence is longer (then it leaves every key in reach).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("llmcore attention does not support `softcap`; use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None:
        raise ValueError("llmcore attention does not support attention sinks (`s_aux`); "
                         "use attn_implementation='eager'")
    unknown = sorted(n for n, v in kwargs.items() if isinstance(v, Tensor) and n not in _INERT_TENSOR_KWARGS)
    if unknown:
        raise ValueError(f"llmcore attention does not know the tensor argument(s) {unknown} that "
                         f"{type(module).__name__} passes, which may change the attention (sinks, sparse indices): "
                         "use attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        warnings.warn("llmcore attention does not return attention weights (output_attentions=True): the output's "
                      "attentions are empty. model.set_attn_implementation('eager') gives them.", stacklevel=2)

    device_type = query.device.type
    autocast = _autocast_on(device_type)
    if autocast:
        # Autocast casts every floating input of torch's SDPA to its dtype; llmcore's custom op
        # is invisible to autocast, so do the same here (RoPE often leaves q, k in float32).
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(dtype)
        if position_bias is not None:
            position_bias = position_bias.to(dtype)
    # A per-call is_causal wins over the module's attribute, as in sdpa_attention_forward.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # The reference backend is plain PyTorch: keep autocast from recasting inside it.
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if all(kwargs.get(k) is not None for k in _VARLEN_KWARGS):
            if position_bias is not None:
                raise ValueError("llmcore attention does not support `position_bias` with packed (cu_seq_lens) inputs")
            longest = int(kwargs["max_length_k"])
            for name, window in _packed_windows(module, kwargs):
                if longest > window:  # (shorter sequences: no key outside it)
                    raise ValueError(f"llmcore attention does not support `{name}` ({window}) with packed "
                                     f"(cu_seq_lens) sequences longer than it (max_length_k {longest}): pass padded "
                                     "batches, or packed ones without the cu_seq_lens arguments, whose mask carries it")
            out = _packed_attention(query, key, value, dropout, scaling, bool(causal), kwargs)
        else:
            out = _dense_attention(query, key, value, attention_mask, dropout, scaling, causal, position_bias,
                                   kwargs.get("position_ids"))
    return out, None


def _packed_windows(module: nn.Module, kwargs: dict) -> list:
    """(name, size) of the windows a packed call may have to keep keys inside: the ``sliding_window`` argument where
    transformers passes one (None: a full-attention layer); else the module's ``sliding_window``, or its config's
    (layer_types and use_sliding_window respected), as Qwen2-MoE and PhiMoE apply theirs only through the mask,
    which packed inputs drop; and chunked attention's ``attention_chunk_size`` (Llama 4). A probe: packed logits
    off by 0.4 with the window lost."""
    config = getattr(module, "config", None)
    if "sliding_window" in kwargs:
        found = [("sliding_window", kwargs["sliding_window"])]
    elif hasattr(module, "sliding_window"):
        found = [("sliding_window", module.sliding_window)]
    else:
        window = getattr(config, "sliding_window", None)
        types, layer = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
        if getattr(config, "use_sliding_window", True) is False or (
                isinstance(types, (list, tuple)) and isinstance(layer, int) and 0 <= layer < len(types)
                and types[layer] != "sliding_attention"):
            window = None
        found = [("config.sliding_window", window)]
    found.append(("attention_chunk_size", getattr(config, "attention_chunk_size", None)))
    return [(n, w) for n, w in found if isinstance(w, int) and not isinstance(w, bool) and w > 0]


def _dense_attention(query, key, value, attention_mask, dropout, scaling, causal, position_bias,
                     position_ids=None) -> Tensor:
    q_length = query.shape[2]
    # As sdpa_attention_forward: is_causal only for prefill with no mask; a decode step sees every key.
    is_causal = bool(q_length > 1 and attention_mask is None and causal)
    if is_causal and isinstance(position_ids, Tensor) and position_ids.shape[-1] > q_length:
        # The queries are the last q_length of a longer sequence (Gemma 4's KV-shared layers under logits_to_keep,
        # which transformers slices for every attention but sdpa when no mask is built): query i sees the keys up to
        # its own position, not the top-left triangle (a probe: logits off by 0.22).
        positions = position_ids[..., -q_length:].to(query.device)
        keys = torch.arange(key.shape[2], device=query.device)
        attention_mask = (keys <= positions[..., None]).unsqueeze(-3)  # (B or 1, 1, Lq, Lk)
        is_causal = False
    elif is_causal and key.shape[2] > q_length:
        # Prefill into an empty StaticCache: the keys past q_length are empty slots, and the
        # top-left-aligned causal mask never reaches them.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    sdpa = scaled_dot_product_attention
    if dropout == 0.0 and _DEFAULT_BACKEND is None and _torch_serves("attention", q_length, query, key, value):
        sdpa = F.scaled_dot_product_attention  # (a decode step: one query row against the cache)
    out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
               enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()  # (B, Hq, Lq, Ev) -> (B, Lq, Hq, Ev)


def _packed_attention(query, key, value, dropout, scaling, causal, kwargs) -> Tensor:
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise ValueError(f"packed inputs (cu_seq_lens_q/k) need batch size 1, got query {tuple(query.shape)} and "
                         f"key {tuple(key.shape)}")
    cu_q, cu_k = (kwargs[n].to(device=query.device, dtype=torch.int32) for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    max_q, max_k = (int(kwargs[n]) for n in ("max_length_q", "max_length_k"))
    # (1, H, total, D) -> (total, H, D): a view; the kernels take strides.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, is_causal=bool(causal), scale=scaling)
    return out.unsqueeze(0)  # (1, total, Hq, Ev)


# ---------------------------------------------------------------------------------------
# fused-op forwards, bound to module instances by patch()
#
# Each reads the op from llmcore.ops at call time (so a later build, or a test, can swap it).
# The norms take float32 weights with low-precision activations as torch does; the custom
# ops are invisible to autocast, so the forwards apply what autocast would have done.


def _layer_norm_forward(self: nn.LayerNorm, x: Tensor) -> Tensor:
    if _torch_serves("layer_norm", _rows(x), x, self.weight, self.bias):
        return nn.LayerNorm.forward(self, x)
    if x.device.type == "cuda" and _autocast_on("cuda"):
        x = x.float()  # CUDA autocast runs layer_norm in float32 (CPU autocast keeps the input dtype)
    return _ops.layer_norm(x, self.weight, self.bias, self.eps)


def _rms_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    # LlamaRMSNorm's dtype rules, but float64 input is normalized in float64 (LlamaRMSNorm's in float32: 4.8e-7 off),
    # small or not
    if x.dtype != torch.float64 and _torch_serves("rms_norm", _rows(x), x, self.weight):
        return type(self).forward(self, x)
    return _ops.rms_norm(x, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not (_is_silu(self.act_fn) and unwatched(self.act_fn)) or _torch_serves(  # (swapped or hooked after patching)
            "swiglu", _rows(x), x, self.gate_proj.weight):
        return type(self).forward(self, x)
    return self.down_proj(_ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def _dropout_forward(self: nn.Dropout, x: Tensor) -> Tensor:
    return _ops.dropout(x, self.p, self.training)


def _rope_fusable(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether llmcore's rotary kernel gives this call of a Llama-family ``apply_rotary_pos_emb`` its result in the
    dtype transformers' would have: q, k (B, H, L, D) of one dtype and cos, sin (B or 1, L, D) of that dtype; or
    float32 cos, sin under autocast to q's dtype (transformers' result is then float32, which any attention under
    autocast -- sdpa's cast, eager's matmul, llmcore's cast -- rounds to q's dtype: the kernel rounds once, there)."""
    if not (q.dim() == k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape and q.dtype == k.dtype
            and cos.dtype == sin.dtype):
        return False
    if cos.dtype == q.dtype:
        return True
    device = q.device.type
    return cos.dtype == torch.float32 and _autocast_on(device) and torch.get_autocast_dtype(device) == q.dtype


def _fused_rotary_pos_emb(original, q, k, cos, sin, *args, **kwargs):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` of Llama, Mistral, Qwen2 and Qwen3
    (``original``: ``q * cos + rotate_half(q) * sin``, and k's) as one ``llmcore.ops.rotary_embedding`` pass each over
    q and k: the (B, H, L, D) views transformers passes are (B, L, H, D) tensors in memory, which the kernel takes as
    they are. Any other call -- positional extras, another ``unsqueeze_dim``, dtypes :func:`_rope_fusable` refuses --
    runs ``original``."""
    if (args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1
            or not _rope_fusable(q, k, cos, sin) or _torch_serves("rotary_embedding", q.shape[0] * q.shape[2], q, k)):
        return original(q, k, cos, sin, *args, **kwargs)
    return tuple(_ops.rotary_embedding(t.transpose(1, 2), cos, sin).transpose(1, 2) for t in (q, k))


def _reads_global(fn, name: str) -> bool:
    return any(ins.opname == "LOAD_GLOBAL" and ins.argval == name for ins in dis.get_instructions(fn))


def _with_global(fn, name: str, value):
    """A copy of function ``fn`` that reads ``value`` where it reads its module global ``name``, or None if it reads
    no such global. A decorator's wrapper (functools.wraps' ``__wrapped__``, holding the function in a closure cell)
    is followed: the wrapped function is copied, then the wrapper around the copy. Nothing else changes: ``fn``, its
    module and every other caller still see the global."""
    if _reads_global(fn, name):
        # Without "__name__" the copy's globals are their own scope to torch.compile (dynamo reads a global of a
        # function whose globals name a module from that module, where ``name`` is still the original).
        scope = {k: v for k, v in fn.__globals__.items() if k != "__name__"}
        scope[name] = value
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__module__ = fn.__module__
        inner = None
    else:
        wrapped = getattr(fn, "__wrapped__", None)
        cells = [i for i, cell in enumerate(fn.__closure__ or ()) if _cell_holds(cell, wrapped)]
        inner = _with_global(wrapped, name, value) if isinstance(wrapped, types.FunctionType) else None
        if inner is None or len(cells) != 1:
            return None
        closure = list(fn.__closure__)
        closure[cells[0]] = types.CellType(inner)
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(closure))
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    if inner is not None:
        copy.__wrapped__ = inner
    return copy


def _cell_holds(cell, obj) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


_ROPE_FORWARDS: dict = {}  # attention class -> its forward reading the fused apply_rotary_pos_emb (or None)


def _rope_attention_forward(cls: type):
    """``cls.forward`` calling :func:`_fused_rotary_pos_emb` in place of its module's ``apply_rotary_pos_emb``, or
    None where the forward does not call that global."""
    if cls not in _ROPE_FORWARDS:
        original = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
        fused = None if original is None else functools.partial(_fused_rotary_pos_emb, original)
        _ROPE_FORWARDS[cls] = None if fused is None else _with_global(cls.forward, "apply_rotary_pos_emb", fused)
    return _ROPE_FORWARDS[cls]


_ADVERTISED: dict = {}  # (module class, fused forward) -> that forward under the class forward's name and signature


def _advertised(cls: type, forward):
    """``forward`` (a function of the module) wrapped to carry ``cls.forward``'s name, docstring and signature
    (``__wrapped__``): transformers' Trainer keeps the dataset columns that ``inspect.signature(model.forward)``
    names, and a bare ``(*args, **kwargs)`` made it drop input_ids. One wrapper per (class, forward)."""
    key = (cls, forward)
    if key not in _ADVERTISED:
        @functools.wraps(cls.forward)
        def wrapper(self, *args, **kwargs):
            return forward(self, *args, **kwargs)
        _ADVERTISED[key] = wrapper
    return _ADVERTISED[key]


def _replicate_for_data_parallel(self: nn.Module) -> nn.Module:
    """``nn.DataParallel``'s replica of a module patch() rebound: the class's copy (its ``__dict__`` a copy of this
    module's), with the methods bound to this module (patch()'s forward, this one) bound to the replica instead. As
    copied they would run this module, on its device with its tensors, not the replica. (Named as the class's
    method: pickle stores a bound method as its function's name, looked up again on the unpickled module.)"""
    replica = type(self)._replicate_for_data_parallel(self)
    for name, value in self.__dict__.items():
        if isinstance(value, types.MethodType) and value.__self__ is self:
            replica.__dict__[name] = types.MethodType(value.__func__, replica)
    return replica


def _bind(m: nn.Module, forward) -> None:
    """Makes ``forward`` (a function of the module) ``m``'s forward, under its class forward's signature
    (:func:`_advertised`); DataParallel's replicas of ``m`` run it on themselves
    (:func:`_replicate_for_data_parallel`)."""
    m.forward = types.MethodType(_advertised(type(m), forward), m)
    m._replicate_for_data_parallel = types.MethodType(_replicate_for_data_parallel, m)


def _lost_forward(m: nn.Module) -> bool:
    """Whether a module patch() rebound came back from pickle with its class's forward: pickle stores a bound method
    as ``getattr(module, name)``, which a module being unpickled answers with the class's."""
    bound = m.__dict__.get("forward")
    return getattr(bound, "__func__", None) is type(m).forward


def _bound_already(m: nn.Module) -> bool:
    """Whether ``m`` has a forward of its own that pickle did not reset: patch()'s, or someone else's to keep."""
    return "forward" in m.__dict__ and not _lost_forward(m)


def _is_plain(m: nn.Module, cls: type) -> bool:
    """Whether ``m`` is still a ``cls`` nothing watches (``unwatched``: its backward hooks and global hooks count
    too), so that a fused forward may compute it without calling it."""
    return type(m) is cls and unwatched(m)


def _same_gelu(act: nn.Module, approximate: str) -> bool:
    """Whether a GELU module patch() fused is still that GELU and unwatched: one swapped or hooked after patching
    is called (a swapped activation was ignored)."""
    return _gelu_kind(act) == approximate and unwatched(act)


def _linear_bias_gelu(x: Tensor, linear: nn.Linear, approximate: str) -> Tensor:
    y = F.linear(x, linear.weight)
    # nn.Linear adds the bias in y's dtype (bf16 under autocast); a float32 bias would promote.
    return _ops.bias_gelu(y, linear.bias.to(y.dtype), approximate=approximate)


def _bias_gelu_intermediate_forward(self: nn.Module, x: Tensor) -> Tensor:
    # e.g. an adapter wrapped `dense` after patching, or another activation swapped in
    if not (_is_plain(self.dense, nn.Linear) and _same_gelu(self.intermediate_act_fn, self._llmcore_approximate)) or (
            _torch_serves("bias_gelu", _rows(x), x, self.dense.weight)):
        return type(self).forward(self, x)
    return _linear_bias_gelu(x, self.dense, self._llmcore_approximate)


def _bias_gelu_distilbert_ffn_forward(self: nn.Module, x: Tensor) -> Tensor:
    """DistilBERT's ``FFN``: lin1, GELU, lin2, dropout. With ``chunk_size_feed_forward`` set (transformers then runs
    it in chunks of rows to save memory) it keeps its own forward."""
    if (not (_is_plain(self.lin1, nn.Linear) and _same_gelu(self.activation, self._llmcore_approximate))
            or self.chunk_size_feed_forward
            or _torch_serves("bias_gelu", _rows(x), x, self.lin1.weight)):
        return type(self).forward(self, x)
    return self.dropout(self.lin2(_linear_bias_gelu(x, self.lin1, self._llmcore_approximate)))


def _bias_gelu_gpt2_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    from transformers.pytorch_utils import Conv1D

    if not (_is_plain(self.c_fc, Conv1D) and _same_gelu(self.act, self._llmcore_approximate)) or (
            _torch_serves("bias_gelu", _rows(x), x, self.c_fc.weight)):
        return type(self).forward(self, x)
    y = torch.matmul(x, self.c_fc.weight)  # Conv1D stores (in, out)
    y = _ops.bias_gelu(y, self.c_fc.bias.to(y.dtype), approximate=self._llmcore_approximate)
    return self.dropout(self.c_proj(y))


# ---------------------------------------------------------------------------------------
# sequence classifiers: the last layer on the first token only
#
# These classifiers' heads read only the first token of the encoder's last layer (BERT's pooler, RoBERTa's and
# ELECTRA's heads, DistilBERT's pre-classifier). Each row of a layer's output depends on every row of its input only
# through attention's keys and values, so the last layer can compute queries, attention output and MLP for row 0
# alone: a (B, 1, H) output, on which the heads compute what they did. The classifier's forward turns this on for
# the duration of a call unless that call returns hidden states or attentions (which need every row). The switch is
# an attribute of the layer: one model called from several threads at once, some calls asking for hidden states,
# is not supported (nn.DataParallel's replicas, each with layers of its own, are).

# classifier class -> the path to its encoder's nn.ModuleList of layers, and the module its head reads the encoder's
# output through with the transformers class that reads row 0 only there (DistilBERT's forward reads row 0 itself).
# A head or pooler swapped for another module, or hooked (a hook sees its input), after patch() gets every row.
_FIRST_TOKEN_CLASSIFIERS = {
    "BertForSequenceClassification": ("bert.encoder.layer", "bert.pooler", "BertPooler"),
    "RobertaForSequenceClassification": ("roberta.encoder.layer", "classifier", "RobertaClassificationHead"),
    "XLMRobertaForSequenceClassification": ("roberta.encoder.layer", "classifier", "XLMRobertaClassificationHead"),
    "CamembertForSequenceClassification": ("roberta.encoder.layer", "classifier", "CamembertClassificationHead"),
    "ElectraForSequenceClassification": ("electra.encoder.layer", "classifier", "ElectraClassificationHead"),
    "DistilBertForSequenceClassification": ("distilbert.transformer.layer", None, None),
}
# layer arguments that bring other keys (cross-attention, a cache) or pack several sequences into one row (whose
# first tokens are not row 0): the layer then runs whole
_OTHER_KEYS_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "past_key_value",
                      *_VARLEN_KWARGS)


def _first_token_attention(att: nn.Module, q_proj, k_proj, v_proj, x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, 1, heads * head dim): the self-attention output of row 0 of x (B, L, H) over all of x's keys, as ``att``
    (a transformers self-attention module on llmcore attention) computes it for every row."""
    b, n, _ = x.shape
    d = att.attention_head_size
    q = q_proj(x[:, :1]).view(b, 1, -1, d).transpose(1, 2)
    k = k_proj(x).view(b, n, -1, d).transpose(1, 2)
    v = v_proj(x).view(b, n, -1, d).transpose(1, 2)
    if mask is not None and mask.size(2) > 1:  # (4D: _first_token_layer_forward runs whole for any other)
        mask = mask[:, :, :1]  # the first query's row
    out, _ = attention_forward(att, q, k, v, mask, dropout=att.dropout.p if att.training else 0.0,
                               scaling=att.scaling)
    return out.reshape(b, 1, -1)


def _first_token_bert_layer(layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """BertLayer (RoBERTa's, ELECTRA's...): self-attention, its output block (dense, dropout, LayerNorm with the
    residual), intermediate, output block."""
    sa = layer.attention.self
    a = layer.attention.output(_first_token_attention(sa, sa.query, sa.key, sa.value, x, mask), x[:, :1])
    return layer.output(layer.intermediate(a), a)


def _first_token_distilbert_block(layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """DistilBERT's TransformerBlock: self-attention (with out_lin), LayerNorm with the residual, FFN, LayerNorm."""
    att = layer.attention
    a = layer.sa_layer_norm(att.out_lin(_first_token_attention(att, att.q_lin, att.k_lin, att.v_lin, x, mask))
                            + x[:, :1])
    return layer.output_layer_norm(layer.ffn(a) + a)


def _returns_tensor(cls: type) -> bool:
    """Whether cls.forward returns the layer's output tensor (transformers 5), not a tuple (4.x)."""
    import inspect

    ret = inspect.signature(cls.forward).return_annotation
    return ret is Tensor or ret in ("torch.Tensor", "Tensor")


def _encoder_attention(att: nn.Module, *projections: str) -> bool:
    return (all(isinstance(getattr(att, p, None), nn.Module) for p in projections)
            and isinstance(getattr(att, "dropout", None), nn.Dropout) and hasattr(att, "scaling")
            and isinstance(getattr(att, "attention_head_size", None), int)
            and getattr(att, "is_causal", True) is False
            and getattr(att, "position_embedding_type", "absolute") == "absolute")


def _first_token_form(layer) -> object:
    """The first-token function for ``layer`` (a transformers encoder layer), or None if its structure is not the
    one those functions reproduce (a decoder, cross-attention, relative positions, chunked MLP, 4.x tuples)."""
    if not isinstance(layer, nn.Module) or not _returns_tensor(type(layer)):
        return None
    name = type(layer).__name__
    if name == "TransformerBlock" and type(layer).__module__.endswith(".modeling_distilbert"):
        ffn = getattr(layer, "ffn", None)
        if (_encoder_attention(getattr(layer, "attention", None), "q_lin", "k_lin", "v_lin", "out_lin")
                and all(isinstance(getattr(layer, n, None), nn.Module) for n in ("sa_layer_norm", "output_layer_norm"))
                and isinstance(ffn, nn.Module) and not getattr(ffn, "chunk_size_feed_forward", 1)):
            return _first_token_distilbert_block
        return None
    attention = getattr(layer, "attention", None)
    if (name.endswith("Layer") and isinstance(attention, nn.Module)
            and _encoder_attention(getattr(attention, "self", None), "query", "key", "value")
            and isinstance(getattr(attention, "output", None), nn.Module)
            and all(isinstance(getattr(layer, n, None), nn.Module) for n in ("intermediate", "output"))
            and not getattr(layer, "is_decoder", True) and not getattr(layer, "add_cross_attention", True)
            and not getattr(layer, "chunk_size_feed_forward", 1)):
        return _first_token_bert_layer
    return None


def _in_backward() -> bool:
    """Whether autograd's engine runs this code: an activation checkpoint recomputing a forward."""
    if torch.compiler.is_compiling():
        return False  # a compiled graph recomputes inside the graph, not by calling this forward again
    return torch._C._current_graph_task_id() != -1


def _first_token_layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, *args,
                               **kwargs):
    """The classifier's last layer: for row 0 only while the classifier's forward asks for it
    (``_llmcore_first_token``: the id of the thread whose classifier call asks), else transformers' forward. A
    recomputation inside the backward (activation checkpointing) does what the last forward with gradients did, as
    the recomputed graph must match it (that record is the layer's: two threads training one model with activation
    checkpointing could recompute the other's form)."""
    if _in_backward():
        first = self._llmcore_first_token_recorded
    else:
        first = self._llmcore_first_token == _caller()
        if torch.is_grad_enabled():
            self._llmcore_first_token_recorded = first
    if (not first or hidden_states.dim() != 3 or any(a is not None for a in args)
            or (attention_mask is not None and attention_mask.dim() != 4)  # (transformers' masks are 4D or None)
            or any(kwargs.get(k) is not None for k in _OTHER_KEYS_KWARGS)):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        # transformers' GradientCheckpointingLayer checkpoints inside its class forward, which this one bypasses:
        # checkpoint the first-token computation the same way (its recomputation calls the function itself)
        return self._gradient_checkpointing_func(functools.partial(self._llmcore_first_token_fn, self), hidden_states,
                                                 attention_mask)
    return self._llmcore_first_token_fn(self, hidden_states, attention_mask)


def _outputs_requested(model: nn.Module, kwargs: dict) -> bool:
    """Whether this call of the classifier returns hidden states or attentions (keyword, else config: transformers
    5's classifiers take them as keywords only)."""
    return any(bool(kwargs[k]) if kwargs.get(k) is not None else bool(getattr(model.config, k, False))
               for k in ("output_hidden_states", "output_attentions"))


_WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")  # FSDP's and torch's checkpoint wrappers


def _first_token_layer(model: nn.Module) -> nn.Module | None:
    """The classifier's last layer (inside any wrappers FSDP or activation checkpointing put around it) if it is the
    one patch() bound the first-token forward to and the head still reads it through the module of the class found
    at patch time, unhooked; else None: a layer appended after patch(), or a head swapped for one reading every
    token, must see every row. Looked up at each call rather than kept: ``nn.DataParallel``'s replicas copy the
    classifier's ``__dict__`` but have layers of their own. (The paths are the ones found at patch time: FSDP2's
    fully_shard renames the classifier's class.)"""
    try:
        last = model.get_submodule(model.__dict__["_llmcore_first_token_path"])[-1]
        reader_path, reader_class = model.__dict__["_llmcore_first_token_reader"]
        if reader_path is not None:
            reader = model.get_submodule(reader_path)
            if not _is_plain(reader, reader_class) or "forward" in reader.__dict__:
                return None
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    if hooks_see_layer_output(model, model.__dict__["_llmcore_first_token_path"], last):
        return None
    while "_llmcore_first_token_fn" not in last.__dict__:
        last = next((getattr(last, a) for a in _WRAPPER_ATTRS if isinstance(getattr(last, a, None), nn.Module)), None)
        if last is None:
            return None
    return last


def _caller() -> int:
    """The calling thread's id, what the first-token switch holds; under torch.compile, whose trace cannot call
    threading.get_ident (a graph break), 0: a compiled call's switch is the layer's alone, as before threads
    were told apart."""
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


def _first_token_classifier_forward(self: nn.Module, *args, **kwargs):
    """transformers' forward, with the last layer on the first token (see the section comment) unless hidden states
    or attentions are asked for, the model no longer runs llmcore attention, or layers were added after it."""
    layer = _first_token_layer(self)
    if layer is None:
        return type(self).forward(self, *args, **kwargs)
    # the switch names the thread whose call it is: another thread's call through the same layer (the base model
    # alone, a call returning hidden states) must see every row, not this call's setting
    me = _caller()
    layer._llmcore_first_token = (me if getattr(self.config, "_attn_implementation", None) == NAME
                                  and not _outputs_requested(self, kwargs) else None)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        if layer._llmcore_first_token == me:
            layer._llmcore_first_token = None


def _bind_first_token(model: nn.Module) -> None:
    """Binds the first-token forwards to a classifier of ``_FIRST_TOKEN_CLASSIFIERS`` and its last layer, where their
    forwards are transformers' own (or came back from pickle as such) and the layer has a known form."""
    if _bound_already(model):
        return  # bound before, or rebound by someone else
    if not hasattr(torch._C, "_current_graph_task_id"):
        return  # (a torch without it: a checkpoint's recomputation could not be told from a forward)
    path, reader_path, reader_name = _FIRST_TOKEN_CLASSIFIERS[type(model).__name__]
    try:
        layer = model.get_submodule(path)[-1]
        reader_class = type(model.get_submodule(reader_path)) if reader_path is not None else None
    except (AttributeError, IndexError, TypeError):
        return
    if reader_path is not None and (reader_class.__name__ != reader_name
                                    or not reader_class.__module__.startswith("transformers.")):
        return  # a head of the user's own: it may read every row
    form = _first_token_form(layer)
    if form is None or _bound_already(layer):
        return
    layer.__dict__.pop("forward", None)
    layer._llmcore_first_token_fn = form
    layer._llmcore_first_token, layer._llmcore_first_token_recorded = None, False
    _bind(layer, _first_token_layer_forward)
    layer._llmcore_fused = "first_token_layer"
    model.__dict__.pop("forward", None)
    model.__dict__["_llmcore_first_token_path"] = path
    model.__dict__["_llmcore_first_token_reader"] = (reader_path, reader_class)
    _bind(model, _first_token_classifier_forward)


# Keyword arguments of a causal LM's forward that are its own, not its base model's.
_LM_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "ignore_index")


def _fused_lm_loss_forward(self: nn.Module, *args, **kwargs):
    """transformers' causal LM forward, except in training with labels: then the LM-head loss is
    ``llmcore.ops.linear_cross_entropy`` on the base model's hidden states (the (tokens, vocab) logits are never
    held, and the output's ``logits`` is None), with transformers' loss semantics: labels shifted left (or
    ``shift_labels`` as given), -100 (``ignore_index``) ignored, the mean, or the sum divided by
    ``num_items_in_batch`` when given, in float32. Anything else -- evaluation, no labels, positional arguments,
    ``return_dict``, ``logits_to_keep``, a custom ``loss_function``, an lm_head wrapped or hooked after patching, a
    model no longer running llmcore attention (``set_attn_implementation("eager")``, the way back to transformers'
    behaviour: its logits stayed None, a probe) -- takes transformers' forward."""
    labels = kwargs.get("labels")
    keep = kwargs.get("logits_to_keep", 0)
    if (labels is None or args or not self.training or "return_dict" in kwargs
            or getattr(self.config, "_attn_implementation", None) != NAME
            or not (isinstance(keep, int) and keep == 0) or "_loss_function" in self.__dict__
            or not _is_plain(self.lm_head, nn.Linear)):
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = getattr(self, self.base_model_prefix)(**{k: v for k, v in kwargs.items() if k not in _LM_ONLY_KWARGS})
    hidden = out.last_hidden_state
    ignore = kwargs.get("ignore_index", -100)
    target = kwargs.get("shift_labels")
    if target is None:
        target = F.pad(labels, (0, 1), value=ignore)[..., 1:]
    n = kwargs.get("num_items_in_batch")
    loss = _ops.linear_cross_entropy(hidden, self.lm_head.weight, target.to(hidden.device), bias=self.lm_head.bias,
                                     ignore_index=ignore, reduction="mean" if n is None else "sum",
                                     loss_dtype=torch.float32)
    if n is not None:
        loss = loss / (n.to(loss.device) if torch.is_tensor(n) else n)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                  hidden_states=out.hidden_states, attentions=out.attentions)


# ---------------------------------------------------------------------------------------
# matching: only classes whose forward is known to be exactly what the fused op computes


_RMS_NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_SWIGLU_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
# attention modules whose modeling file's apply_rotary_pos_emb is the whole-head rotate-half composite
_ROPE_ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
# causal LMs whose forward is base model -> lm_head (an nn.Linear) -> ForCausalLMLoss, with no logit softcapping
_CAUSAL_LM_CLASSES = {"GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                      "Qwen3ForCausalLM"}
_INTERMEDIATE_CLASSES = {"BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate", "CamembertIntermediate",
                         "ElectraIntermediate"}


def _gelu_kind(act) -> str | None:
    """bias_gelu's ``approximate`` for a GELU activation module, or None if it is something else."""
    from transformers import activations as A

    if isinstance(act, nn.GELU):
        return act.approximate
    if type(act) is A.GELUActivation:
        return "none"
    if type(act) in (A.NewGELUActivation, A.GELUTanh, A.FastGELUActivation):
        return "tanh"  # all compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return None


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return type(act) in (nn.SiLU, SiLUActivation)


def _match(m: nn.Module) -> tuple[str, object] | None:
    """(op name, forward) to bind to ``m``, or None to leave it alone."""
    name = type(m).__name__
    if type(m) is nn.LayerNorm:
        if len(m.normalized_shape) == 1 and m.elementwise_affine and m.bias is not None:
            return "layer_norm", _layer_norm_forward
    elif type(m) is nn.Dropout:
        if not m.inplace:
            return "dropout", _dropout_forward
    elif type(m) is nn.Embedding:
        return "embedding", None  # becomes llmcore.nn.Embedding (patch)
    elif name in _RMS_NORM_CLASSES:
        if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1:
            return "rms_norm", _rms_norm_forward
    elif name in _SWIGLU_MLP_CLASSES:
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")) and _is_silu(getattr(m, "act_fn", None)):
            return "swiglu", _swiglu_mlp_forward
    elif name in _ROPE_ATTENTION_CLASSES:
        forward = _rope_attention_forward(type(m))
        if forward is not None:
            return "rotary_embedding", forward
    elif name in _INTERMEDIATE_CLASSES:
        kind = _gelu_kind(getattr(m, "intermediate_act_fn", None))
        if kind is not None and isinstance(m.dense, nn.Linear) and m.dense.bias is not None:
            m._llmcore_approximate = kind
            return "bias_gelu", _bias_gelu_intermediate_forward
    elif name in _CAUSAL_LM_CLASSES:
        if (isinstance(getattr(m, "lm_head", None), nn.Linear) and hasattr(m, getattr(m, "base_model_prefix", ""))
                and getattr(m.config, "final_logit_softcapping", None) is None):
            return "linear_cross_entropy", _fused_lm_loss_forward
    elif name == "FFN" and type(m).__module__.endswith(".modeling_distilbert"):
        kind = _gelu_kind(getattr(m, "activation", None))
        if (kind is not None and isinstance(m.lin1, nn.Linear) and m.lin1.bias is not None
                and not m.chunk_size_feed_forward):
            m._llmcore_approximate = kind
            return "bias_gelu", _bias_gelu_distilbert_ffn_forward
    elif name == "GPT2MLP":
        kind = _gelu_kind(getattr(m, "act", None))
        if kind is not None:
            m._llmcore_approximate = kind
            return "bias_gelu", _bias_gelu_gpt2_mlp_forward
    return None


# ---------------------------------------------------------------------------------------
# patch


def _refuse_attention_configs(model: nn.Module) -> None:
    """Configs llmcore attention cannot serve, refused before anything is patched: one asking for attention
    weights (``output_attentions=True``: llmcore returns none, and GPT-2 drops the request without a word, as
    transformers refuses it for its own non-eager attention), a soft-capped one (Gemma 2's
    ``attn_logit_softcapping``; Gemma 3 keeps the setting unused, ``_may_pass_softcap``) and one with attention
    sinks (GPT-OSS's ``sinks``, passed as ``s_aux``): for both
    the patch went through and then every forward failed."""
    from transformers import PreTrainedModel

    for name, m in model.named_modules():
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            raise ValueError(f"{name or type(m).__name__} has attention sinks ({type(m).__name__}.sinks), which "
                             "llmcore attention does not compute: keep transformers' eager attention for this model")
        if not isinstance(m, PreTrainedModel):
            continue
        if getattr(m.config, "output_attentions", False):
            raise ValueError(f"{type(m).__name__}'s config sets output_attentions=True, and llmcore attention returns "
                             "no attention weights: set it False to patch, or keep transformers' eager attention")
        cap = getattr(m.config, "attn_logit_softcapping", None)
        if cap is not None and _may_pass_softcap(m):
            raise ValueError(f"{type(m).__name__}'s config sets attn_logit_softcapping={cap}, which llmcore attention "
                             "does not compute: keep transformers' eager attention for this model")


def _may_pass_softcap(model: nn.Module) -> bool:
    """Whether ``model``'s attention may pass its config's attn_logit_softcapping to the attention function: False
    only where the modules holding it (``attn_logit_softcapping``) are found and none of their classes' forward
    mentions softcap (Gemma 3 keeps the setting and never applies it; Gemma 2 passes it)."""
    import inspect

    holders = {type(m) for m in model.modules() if getattr(m, "attn_logit_softcapping", None) is not None}
    try:
        return not holders or any("softcap" in inspect.getsource(cls.forward) for cls in holders)
    except (OSError, TypeError):  # (no source to read: refused, as before)
        return True


def _use_llmcore_attention(model: nn.Module) -> int:
    """Switch every transformers model inside ``model`` to llmcore attention; returns how many
    attention modules now use it."""
    from transformers import PreTrainedModel

    for m in model.modules():  # pre-order: an outer model updates the configs of the ones it holds
        if isinstance(m, PreTrainedModel) and m.config._attn_implementation != NAME:
            if hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation(NAME)  # warns and leaves alone models that cannot switch
            else:  # pragma: no cover - transformers < 4.56
                m.config._attn_implementation = NAME
    return sum(1 for m in model.modules()
               if not isinstance(m, PreTrainedModel) and "Attention" in type(m).__name__
               and getattr(getattr(m, "config", None), "_attn_implementation", None) == NAME)


def patch(model: nn.Module) -> nn.Module:
    """Run ``model`` on llmcore: llmcore attention plus fused norm and MLP ops. Returns ``model``.

    Registers llmcore attention (:func:`register`) and sets it on every transformers model
    inside ``model`` (``config._attn_implementation = "llmcore"``), then rebinds the
    ``forward`` of the modules whose computation a fused op reproduces exactly:

    ========================================  ======================================
    ``nn.LayerNorm`` (1-D, affine, bias)      ``llmcore.ops.layer_norm``
    Llama/Mistral/Qwen2/Qwen3 ``RMSNorm``      ``llmcore.ops.rms_norm``
    BERT-family ``*Intermediate`` (Linear +    ``F.linear`` without bias, then
    GELU), DistilBERT ``FFN`` (its lin1 +      ``llmcore.ops.bias_gelu``
    GELU, unchunked), ``GPT2MLP`` (Conv1D +
    GELU)
    Llama/Mistral/Qwen2/Qwen3 ``MLP`` (SiLU)   ``llmcore.ops.swiglu``
    Llama/Mistral/Qwen2/Qwen3 ``Attention``    transformers' forward, its RoPE
                                              (``apply_rotary_pos_emb``) by
                                              ``llmcore.ops.rotary_embedding``
                                              (see ``_fused_rotary_pos_emb``)
    ``nn.Dropout`` (not in place)             ``llmcore.ops.dropout``: the same
                                              distribution; the mask comes from
                                              Philox (seeded by torch's generator)
                                              and is recomputed, not stored
    ``nn.Embedding``                          its class becomes ``llmcore.nn.Embedding``
                                              (a subclass, the same forward; its CPU
                                              backward reuses one dense-gradient
                                              buffer instead of a fresh zeroed one)
    BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA,  the last encoder layer computes row 0
    DistilBERT ``*ForSequenceClassification``  only (all their heads read), unless
                                              the call returns hidden states or
                                              attentions, or the head (BERT: its
                                              pooler) was swapped or hooked
                                              (``first_token_layer``)
    GPT-2, Llama, Mistral, Qwen2, Qwen3        the LM-head loss in training with
    ``*ForCausalLM`` / ``GPT2LMHeadModel``     labels: ``linear_cross_entropy``
                                              (no logits; see
                                              ``_fused_lm_loss_forward``)
    ========================================  ======================================

    Embeddings change class rather than forward, as the gradient buffer lives in the module;
    ``isinstance(m, nn.Embedding)`` still holds (and llmcore's Trainer may then update a large
    untied table row by row, ``llmcore.train.lazy_rows``). The attention modules keep
    transformers' own forward code: a copy of it whose ``apply_rotary_pos_emb`` is the fused
    one (``_with_global``); the modeling module's function, and every model not patched, stay
    as they were.

    Inference calls (no tensor of the call needs a gradient) on CPU tensors with fewer rows than
    :data:`TORCH_BELOW` gives the op -- a decode step of ``generate`` among them -- run transformers' own
    computation (torch's SDPA for attention), which is faster there; set a value to 0 to keep llmcore's op.

    Anything else, including subclasses of the classes above, is left alone. Parameters,
    buffers and state_dict keys are unchanged. Fused ops missing from this build of
    :mod:`llmcore.ops` are skipped with a warning. Calling it again is a no-op. The counts
    per kind are logged and stored in ``model._llmcore_patched``. A patched module's ``forward`` carries the
    signature of its class's (transformers' Trainer picks dataset columns by it); ``nn.DataParallel``'s replicas
    run the patched forwards on their own tensors. A patched model unpickled (e.g.
    ``torch.load`` of a whole model, in any process with llmcore installed) runs llmcore attention (its name
    is registered as the model loads) and transformers' other forwards until patched again. A config with
    ``output_attentions=True`` is refused (no weights come back: ``set_attn_implementation("eager")`` for them).

    >>> model = patch(AutoModelForCausalLM.from_config(config))  # doctest: +SKIP
    >>> model._llmcore_patched  # doctest: +SKIP
    {'attention': 2, 'layer_norm': 0, 'rms_norm': 5, 'bias_gelu': 0, 'swiglu': 2, 'rotary_embedding': 2,
     'dropout': 0, 'embedding': 1, 'linear_cross_entropy': 1}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_attention_configs(model)
    register()
    counts = {"attention": _use_llmcore_attention(model), "layer_norm": 0, "rms_norm": 0, "bias_gelu": 0, "swiglu": 0,
              "rotary_embedding": 0, "dropout": 0, "embedding": 0, "linear_cross_entropy": 0, "first_token_layer": 0}
    missing = set()
    for m in model.modules():
        if type(m).__name__ in _FIRST_TOKEN_CLASSIFIERS:
            _bind_first_token(m)  # (pre-order: before its layers are visited)
        done = getattr(m, "_llmcore_fused", None)
        if done is not None:
            if not _lost_forward(m):  # patched before
                counts[done] += 1
                continue
            del m.forward, m._llmcore_fused  # unpickled: bind it again
        if "forward" in m.__dict__:  # someone else rebound it: leave their version in place
            continue
        found = _match(m)
        if found is None:
            continue
        op, forward = found
        if forward is None:
            m.__class__ = _Embedding
        elif not hasattr(_ops, op):
            missing.add(op)
            continue
        else:
            _bind(m, forward)
        m._llmcore_fused = op
        counts[op] += 1
    if missing:
        warnings.warn(f"llmcore.ops lacks {', '.join(sorted(missing))} in this build; those modules keep their "
                      f"transformers forward", stacklevel=2)
    model._llmcore_patched = counts
    logger.info("llmcore.hf.patch(%s): %s", type(model).__name__,
                ", ".join(f"{k}={v}" for k, v in counts.items()))
    return model
