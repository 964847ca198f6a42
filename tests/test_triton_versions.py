"""Which Triton (and, for its interpreter, which numpy) the ``triton`` backend accepts, and the errors that
name the problem otherwise.

Found by running the interpreter tests and the sm_90 aot compile under each release (2026-11-30): 3.4.0,
3.5.1, 3.6.0 and 3.9.0 pass both; 3.2.0 and 3.3.1 fail only the TMA dQ mode (no
triton.tools.tensor_descriptor); 3.1.0 fails 87 of 97 (outputs never written). The interpreters of 3.4-3.6
raise "only 0-dimensional arrays can be converted to Python scalars" from inside a kernel with numpy 2.4,
and pass with 2.3.5; 3.7.1 and 3.8.0 pass with 2.4.
"""
import pytest
import torch

import llmcore
from llmcore.ops import layer_norm, linear_cross_entropy, scaled_dot_product_attention
from llmcore.ops import triton as triton_ops

pytestmark = pytest.mark.skipif(not triton_ops.installed(), reason="triton is not installed")


@pytest.mark.parametrize("text, release", [("3.4.0", (3, 4)), ("3.5.0+git1a2b3c4d", (3, 5)), ("3.10.1", (3, 10)),
                                           ("", None), (None, None), ("nightly", None)])
def test_release_parses_major_and_minor(text, release):
    assert triton_ops._release(text) == release


def test_versions_below_the_minimum_are_refused_by_name():
    assert "not installed" in triton_ops._missing(False, None)
    reason = triton_ops._missing(True, "3.3.1")
    assert "triton 3.3.1 is older than 3.4" in reason and "pip install -U 'triton>=3.4'" in reason
    assert triton_ops._missing(True, "2.3.1") is not None
    for ok in ("3.4.0", "3.6.0", "3.10.0", "4.0.0", None):  # None: no distribution names it; nothing to refuse
        assert triton_ops._missing(True, ok) is None, ok


def test_interpreter_numpy_rule():
    reason = triton_ops._interpreter_problem("3.6.0", "2.4.6")
    assert "Triton 3.6.0's interpreter fails with numpy 2.4.6" in reason and "numpy<2.4" in reason
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.4.0", "1.26.4"), ("3.7.1", "2.4.6"),
                                          ("3.9.0", "2.4.6"), (None, "2.4.6"), ("3.6.0", None)):
        assert triton_ops._interpreter_problem(triton_version, numpy_version) is None


def test_the_installed_version_is_read_without_importing_triton():
    triton = pytest.importorskip("triton")
    assert triton_ops._release(triton_ops.version()) == triton_ops._release(triton.__version__)
    assert llmcore.info()["triton_version"] == triton_ops.version() and llmcore.info()["triton_available"]
    assert triton_ops.usable() and triton_ops.missing() is None  # CI installs a supported Triton


def _calls():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    x, w = torch.randn(4, 32, generator=g), torch.ones(32)
    hidden, head = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (6,), generator=g)
    return {
        "attention": lambda: scaled_dot_product_attention(q, k, v, backend="triton"),
        "layer_norm": lambda: layer_norm(x, w, None, 1e-5, backend="triton"),
        "cross_entropy": lambda: linear_cross_entropy(hidden, head, labels, backend="triton"),
    }


@pytest.mark.parametrize("op", ["attention", "layer_norm", "cross_entropy"])
def test_an_old_triton_is_named_in_the_error(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = triton_ops._missing(True, "3.3.1")
    monkeypatch.setattr(triton_ops, "_MISSING", reason)
    assert not triton_ops.usable()
    with pytest.raises(RuntimeError, match="triton 3.3.1 is older than 3.4"):
        _calls()[op]()


@pytest.mark.parametrize("op", ["attention", "layer_norm", "cross_entropy"])
def test_an_interpreter_that_cannot_run_is_named_in_the_error(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_ops, "_INTERPRETER", triton_ops._interpreter_problem("3.6.0", "2.4.6"))
    with pytest.raises(RuntimeError, match="interpreter fails with numpy 2.4.6"):
        _calls()[op]()
    monkeypatch.setattr(triton_ops, "_INTERPRETER", None)
    _calls()[op]()  # the same call runs once the problem is gone
