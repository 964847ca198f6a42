"""The two halves every native op here has: a ``torch.library`` custom op (what ``torch.compile``
and ``opcheck`` see) and, for eager calls, a plain autograd.Function over the same implementation
(the custom-op dispatch costs ~100 us per forward + backward). Used by the CPU kernels' ops
(``norm``, ``attention``, ``activation``, ``dropout``) and the Triton backend's."""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd import forward_ad

_TWICE = (b"llmcore: this op's gradient comes from its kernel and has no derivative of its own, so differentiating "
          b"it again (create_graph=True: a gradient penalty, a Hessian-vector product) is not supported; use "
          b"torch's op there (or backend='reference' for attention and the norms)")


def no_double_backward(backward):
    """``backward`` of a kernel whose gradients carry no graph. Under create_graph (grad mode on in a backward) its
    gradients come back behind an error node, so that differentiating them again raises rather than takes them for
    constants. torch's ``once_differentiable`` adds that node only where an incoming gradient requires grad: with
    the ones of ``y.sum()`` it returned constants, and a gradient penalty silently lost its second-order terms (a
    probe: LayerNorm's input gradient 19.6 off of torch's). The error node also takes the saved tensors and
    incoming gradients that require grad (and ``ctx.links``: tensors linked to the inputs, set where the saved
    tensors are gradients with no graph), so it lies on every path from the gradients back to the op's inputs:
    behind detached copies alone, ``autograd.grad(g, x)`` found no path to ``x`` and gave None, or zeros with
    ``materialize_grads`` (``torch.autograd.functional.hvp``: a Hessian-vector product of 0, another probe).
    A plain backward (grad mode off) runs as it is."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        saved = _Unpacked(ctx)  # (unpacked once: non-reentrant checkpointing refuses a second unpack)
        links = [t for t in (*grads, *saved.saved_tensors, *getattr(ctx, "links", ()))
                 if isinstance(t, Tensor) and t.requires_grad]
        with torch.no_grad():
            outputs = backward(saved, *grads)
        many = isinstance(outputs, tuple)
        outputs = outputs if many else (outputs,)
        if all(o is None for o in outputs):
            return outputs if many else outputs[0]
        wrapped = torch._C._functions.DelayedError(_TWICE, len(outputs) + len(links))(
            *[o.detach().requires_grad_() if isinstance(o, Tensor) else o for o in outputs], *links)
        wrapped = (wrapped,) if isinstance(wrapped, Tensor) else tuple(wrapped)
        return wrapped[:len(outputs)] if many else wrapped[0]
    return wrapper


class _Unpacked:
    """A backward's ctx whose ``saved_tensors`` were unpacked once (no_double_backward reads them too); every other
    attribute is the ctx's."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", tuple(getattr(ctx, "saved_tensors", ())))

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


def _eager_function(name: str, forward_impl, setup_context, backward, differentiable: int = 2):
    """An autograd.Function with a custom op's implementation, setup and backward, for eager
    mode: the custom-op dispatch costs ~100 us per forward + backward, as much as the kernels
    of a (2048, 384) LayerNorm. torch.compile sees the custom ops instead. Outputs past the
    first ``differentiable`` ones (statistics: mean, rstd, lse) carry no gradient.

    Gradients are not materialized: ``backward`` gets None, not a zero tensor, for an output
    that received none (every statistic, and a norm's residual sum ``s`` when only ``y`` is
    used), so no zeros are allocated, filled and read (a (T, 384) fp32 ``s`` per LayerNorm)."""

    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output)
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(*output[differentiable:])
        return output

    # The kernels' gradients carry no graph: under create_graph a double backward must raise, not treat them as
    # constants (no_double_backward; a plain backward, grad mode off, pays nothing for it).
    methods = {"forward": staticmethod(forward), "backward": staticmethod(no_double_backward(backward)),
               "impl": staticmethod(forward_impl)}
    return type(name, (torch.autograd.Function,), methods)


def _run_op(op, eager: type[torch.autograd.Function], *args):
    """Calls ``op`` (a custom op) inside torch.compile; in eager mode ``eager`` (from
    :func:`_eager_function`) when a gradient can flow to a tensor argument, else the bare
    implementation: inference calls build no autograd node (Function.apply cost ~15% of the
    Python time of a no-grad attention call). Inside a forward-mode AD level, eager too: its
    error (no jvp) rather than an output silently without tangent."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        if forward_ad._current_level >= 0 or (
                torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return eager.apply(*args)
        return eager.impl(*args)
    except RuntimeError as e:  # (only on the error path: a functorch wrapper has no storage for the kernels to read,
        # and under torch.func.grad an autograd.Function without setup_context is refused by torch)
        if functorch_in_use(*args):
            raise RuntimeError(FUNCTORCH_REFUSAL) from e
        raise


# (the ways that work: attention, the norms and rotary take backend='reference', linear_cross_entropy
# backend='torch'; the activations have *_reference twins; dropout is F.dropout)
FUNCTORCH_REFUSAL = ("llmcore's kernels take plain tensors: torch.func transforms (vmap, grad, jacrev, ...) are not "
                     "supported; under them use plain PyTorch: backend='reference' (attention, the norms, rotary), "
                     "linear_cross_entropy's backend='torch', bias_gelu_reference / swiglu_reference, or torch's "
                     "own functions (F.dropout)")


def functorch_in_use(*args) -> bool:
    """Whether a torch.func transform is running or any of ``args`` is one's wrapped tensor."""
    return _functorch_active() or any(isinstance(a, Tensor) and _functorch_wrapped(a) for a in args)


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is running."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check is not None and check())


def _functorch_wrapped(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))
