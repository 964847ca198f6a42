"""Activation (gradient) checkpointing of a model's Transformer layers: transformers'
``model.activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before transformers 5) and
``TrainingArguments(activation_checkpointing=True)``."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from llmcore.train.config import check_checkpoint_kwargs


class LayerCheckpointing:
    """For models whose forward calls each of ``self.layers`` through ``self._run_layer(index, layer, ...)``.

    ``activation_checkpointing_enable()`` keeps only a layer's inputs from the forward and recomputes the layer
    in its backward (``torch.utils.checkpoint``; dropout masks come out the same, its RNG state being restored):
    the activations of one layer alive at a time instead of all of them, for one more forward of every layer.
    ``every_n_layers``: only layers 0, n, 2n, ... (the others keep theirs). ``offload``: the inputs kept go to
    pinned host memory (``save_on_cpu``) when the model is on a GPU; on the CPU there is nothing to move.
    Only in training mode with gradients enabled; evaluation runs the layers plainly."""

    _checkpointing: Optional[tuple] = None  # (torch.utils.checkpoint kwargs, every_n_layers, offload)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        kwargs = check_checkpoint_kwargs(activation_checkpointing_kwargs)
        check_checkpoint_kwargs({"every_n_layers": every_n_layers, "offload": offload}, layer_keys=True)
        self._checkpointing = (kwargs, every_n_layers, offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """The older name of ``activation_checkpointing_enable`` (transformers < 5)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self._checkpointing = None

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointing is not None

    is_gradient_checkpointing = is_activation_checkpointing

    def _run_layer(self, index: int, layer: nn.Module, *args, **kwargs):
        """``layer(*args, **kwargs)``, recomputed in the backward when checkpointing takes layer ``index``."""
        if self._checkpointing is None or not (self.training and torch.is_grad_enabled()) \
                or index % self._checkpointing[1]:
            return layer(*args, **kwargs)
        checkpoint_kwargs, _, offload = self._checkpointing
        # keyword arguments bound first: the reentrant form passes only positional ones through
        run = functools.partial(layer, **kwargs) if kwargs else layer
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        keep = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload and device.type != "cpu" \
            else contextlib.nullcontext()
        with keep:
            return torch.utils.checkpoint.checkpoint(run, *args, **checkpoint_kwargs)
