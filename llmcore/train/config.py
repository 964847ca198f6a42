"""TrainConfig: the loop's settings, named and meant as in transformers' TrainingArguments."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional, Union

_STRATEGIES = ("no", "steps", "epoch")
# transformers' lr_scheduler_type values that llmcore's loop takes (llmcore.train.optim.make_schedule)
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
REPORTERS = ("tensorboard",)
# transformers' ``fsdp`` options that llmcore's loop takes: a sharding strategy, and "auto_wrap", which llmcore always
# does (each Transformer layer one unit: see llmcore.train.fsdp)
FSDP_MODES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2")
_FSDP_OPTIONS = FSDP_MODES + ("auto_wrap",)
# transformers' ``fsdp_config["state_dict_type"]`` values that llmcore's checkpoints take (see llmcore.train.checkpoint)
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


@dataclass
class TrainConfig:
    """Settings of :class:`llmcore.train.Trainer`.

    Names and meanings follow ``transformers.TrainingArguments``; some defaults differ
    (``warmup_steps=500``, ``weight_decay=0.01``, batch 16 for training and evaluation, ``logging_steps=50``,
    ``report_to="tensorboard"``), and ``warmup_ratio`` is kept though transformers 5 dropped it (its float
    ``warmup_steps`` in (0, 1) is the same). ``warmup_steps > 0`` wins over
    ``warmup_ratio``, as in transformers; left unset, it is 500, or 0 when a ``warmup_ratio`` is given (0 too)
    (so the ratio counts, as with transformers' default of 0). A float ``warmup_steps`` in (0, 1) is a
    ``warmup_ratio``, as in transformers 5, and one of 1 or more its whole steps (``int()``, as transformers).
    ``save_total_limit`` 0 or less keeps every checkpoint, as transformers' rotation. ``pack`` and
    ``pad_to_multiple_of`` are read by the data pipeline that builds the batches (see ``batch_multiple``); the loop
    itself accepts padded (B, L) and packed (T,) + ``cu_seqlens`` batches alike.
    ``lr_scheduler_type``: ``"linear"``, ``"cosine"``, ``"constant"`` or ``"constant_with_warmup"``.
    ``label_smoothing_factor`` smooths the loss (a causal LM's too), in training and evaluation (as transformers).
    ``metric_for_best_model`` (an evaluation metric, ``eval_`` prefix optional) has each checkpoint's evaluation
    compared (``greater_is_better``; only a checkpoint's: transformers' ``best_metric`` is every evaluation's best),
    the best checkpoint kept from ``save_total_limit``'s rotation, and, with
    ``load_best_model_at_end``, its weights loaded when training ends. A name the built-in evaluation never
    reports is refused when the Trainer is made (with ``compute_metrics``, at the first evaluation).
    ``early_stopping_patience`` (transformers' ``EarlyStoppingCallback(early_stopping_patience,
    early_stopping_threshold)`` as settings): training stops after that many evaluations in a row whose
    ``metric_for_best_model`` did not beat the best of the earlier evaluations by more than
    ``early_stopping_threshold``.
    ``eval_steps``/``save_steps`` default to ``logging_steps``/500; each of the three is a count of steps or, as
    in transformers, a float in (0, 1): that fraction of the run's steps, rounded up (``every``); ``logging_dir`` to
    ``<output_dir>/logs``. Records always go to ``<logging_dir>/train_log.jsonl``; ``report_to``
    (``"tensorboard"`` (default), ``"all"``, ``"none"`` or a list) adds TensorBoard event files there.
    ``fsdp``: ``"full_shard"``, ``"shard_grad_op"``, ``"hybrid_shard"`` or ``"hybrid_shard_zero2"`` (optionally
    with ``"auto_wrap"``, as transformers takes them: a string or a list) shards the model under torch.distributed
    with ``fully_shard`` instead of wrapping it in DDP (the hybrid ones within each node, replicated across nodes);
    normalized to the strategy's name, or ``""`` for none (see ``llmcore.train.fsdp``).
    ``fsdp_config``: transformers' dict (or a JSON file's path, or JSON text) of FSDP settings; llmcore takes its
    ``"state_dict_type"`` (also spelled ``"fsdp_state_dict_type"``): ``"FULL_STATE_DICT"`` (default: checkpoints of
    whole tensors, gathered on rank 0, the files one process writes) or ``"SHARDED_STATE_DICT"`` (each rank writes
    its shards with torch.distributed.checkpoint; see ``llmcore.train.checkpoint``). Normalized to
    ``{"state_dict_type": ...}``.
    ``activation_checkpointing``: recompute Transformer layers in the backward instead of keeping their activations
    (``model.activation_checkpointing_enable``, ``llmcore.models.checkpointing``). ``activation_checkpointing_kwargs``
    (a dict, JSON text or a JSON file's path): ``every_n_layers`` (checkpoint layers 0, n, 2n, ...), ``offload``
    (keep the recomputed layers' inputs in host memory, for models on a GPU) and ``torch.utils.checkpoint.
    checkpoint``'s own (``use_reentrant`` defaults to False). ``gradient_checkpointing`` and
    ``gradient_checkpointing_kwargs`` are their older names (transformers < 5), used when the new ones are unset
    and then mirroring them.

    >>> TrainConfig("out", max_steps=10, warmup_steps=0).total_steps(steps_per_epoch=4)
    10
    """

    output_dir: str
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    warmup_steps: Optional[Union[int, float]] = None  # 500, or 0 with a warmup_ratio (see above)
    warmup_ratio: Optional[float] = None  # 0.0 once built; given (0 too), warmup_steps' default is 0
    weight_decay: float = 0.01
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    label_smoothing_factor: float = 0.0
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    seed: int = 42
    logging_steps: Union[int, float] = 50
    eval_strategy: str = "no"
    eval_steps: Optional[Union[int, float]] = None
    save_strategy: str = "steps"
    save_steps: Union[int, float] = 500
    save_total_limit: Optional[int] = None
    max_steps: int = -1
    resume_from_checkpoint: Optional[Union[str, bool]] = None
    pack: bool = True
    pad_to_multiple_of: Optional[int] = None
    logging_dir: Optional[str] = None
    report_to: Union[str, list, tuple] = "tensorboard"
    disable_tqdm: bool = False
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    early_stopping_patience: Optional[int] = None
    early_stopping_threshold: float = 0.0
    fsdp: Union[str, list, tuple] = ""
    fsdp_config: Optional[Union[dict, str]] = None
    activation_checkpointing: Optional[bool] = None
    activation_checkpointing_kwargs: Optional[Union[dict, str]] = None
    gradient_checkpointing: Optional[bool] = None
    gradient_checkpointing_kwargs: Optional[Union[dict, str]] = None

    def __post_init__(self):
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        self.logging_steps = _steps_or_fraction("logging_steps", self.logging_steps)
        if isinstance(self.warmup_steps, float):  # transformers 5: a float in [0, 1) is a fraction of the run
            steps = self.warmup_steps
            if 0.0 < steps < 1.0:
                if self.warmup_ratio:
                    raise ValueError(f"warmup_steps={steps} (a fraction of the run) and warmup_ratio="
                                     f"{self.warmup_ratio}: give one")
                self.warmup_ratio, self.warmup_steps = steps, 0
            elif steps >= 1.0 and math.isfinite(steps):
                self.warmup_steps = int(steps)  # (transformers' get_warmup_steps: int(1.5) is 1 step)
            elif steps != 0.0:
                raise ValueError(f"warmup_steps must be a number of steps or a fraction of the run in [0, 1), "
                                 f"got {steps}")
            else:
                self.warmup_steps = 0
        if self.warmup_steps is None:  # (a warmup_ratio of 0 given asks for no warmup: it gave 500 steps)
            self.warmup_steps = 500 if self.warmup_ratio is None else 0
        if self.warmup_ratio is None:
            self.warmup_ratio = 0.0
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.seed > 2**32 - 1:  # (numpy's generator takes no more)
            raise ValueError(f"seed must be < 2**32, got {self.seed}")
        _check_int("max_steps", self.max_steps, minimum=-1)
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use num_train_epochs) or a positive number of optimizer steps, "
                             "got 0")
        _check_float("num_train_epochs", self.num_train_epochs, lo=0.0, lo_open=True)
        _check_float("warmup_ratio", self.warmup_ratio, lo=0.0, hi=1.0)
        _check_float("weight_decay", self.weight_decay, lo=0.0)
        _check_float("learning_rate", self.learning_rate, lo=0.0, lo_open=True)
        if self.max_grad_norm != math.inf:  # (+inf: measured, never clipped, as transformers takes it; as 0 here)
            _check_float("max_grad_norm", self.max_grad_norm, lo=0.0)
        for name in ("adam_beta1", "adam_beta2"):
            _check_float(name, getattr(self, name), lo=0.0, hi=1.0)
            if getattr(self, name) == 1.0:
                raise ValueError(f"{name} must be < 1 (Adam divides by 1 - {name} ** step), got 1.0")
        _check_float("adam_epsilon", self.adam_epsilon, lo=0.0)
        _check_float("label_smoothing_factor", self.label_smoothing_factor, lo=0.0, hi=1.0)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULES)
        for name in ("eval_strategy", "save_strategy"):
            check_choice(name, getattr(self, name), _STRATEGIES)
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        self.eval_steps = _steps_or_fraction("eval_steps", self.eval_steps)
        self.save_steps = _steps_or_fraction("save_steps", self.save_steps)
        if self.pad_to_multiple_of is not None:
            _check_int("pad_to_multiple_of", self.pad_to_multiple_of, minimum=1)
        if self.save_total_limit is not None:
            _check_int("save_total_limit", self.save_total_limit, minimum=None)
            if self.save_total_limit <= 0:
                self.save_total_limit = None  # (transformers' rotate_checkpoints: no deletion if None or <= 0)
        r = self.resume_from_checkpoint
        if r is False:
            self.resume_from_checkpoint = None
        elif r is not None and r is not True and not isinstance(r, (str, os.PathLike)):
            raise ValueError("resume_from_checkpoint must be None, True (latest checkpoint in output_dir) or a "
                             f"checkpoint folder, got {r!r}")
        elif isinstance(r, os.PathLike):
            self.resume_from_checkpoint = os.fspath(r)
        if isinstance(self.resume_from_checkpoint, str) and not self.resume_from_checkpoint.strip():
            raise ValueError("resume_from_checkpoint is an empty path (an unset variable?): give a checkpoint folder, "
                             "True for the latest in output_dir, or None to start afresh")
        self._check_best_model()
        if self.report_to is None:  # (transformers takes None as no integration too)
            self.report_to = "none"
        if not isinstance(self.report_to, (str, list, tuple)):
            raise TypeError(f"report_to must be a name or a list of names ({', '.join(REPORTERS)}, 'all', 'none'), "
                            f"got {type(self.report_to).__name__}")
        report = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        if "all" in report:
            report = list(REPORTERS)
        unknown = [r for r in report if r not in REPORTERS + ("none",)]
        if unknown:
            raise ValueError(f"report_to: unknown {unknown}; choose from {list(REPORTERS)}, 'all' or 'none'")
        self.report_to = tuple(r for r in report if r != "none")
        self.fsdp = _fsdp_mode(self.fsdp)
        self.fsdp_config = _fsdp_config(self.fsdp_config, self.fsdp)
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None:  # transformers' rule: the old name counts when the new one is unset
                setattr(self, new, getattr(self, old))
        if self.activation_checkpointing is None:
            self.activation_checkpointing = False
        if not isinstance(self.activation_checkpointing, bool):
            raise TypeError(f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}")
        for name in ("bf16", "pack", "disable_tqdm"):  # (a string "false" was on: truthy)
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        kwargs = _dict_option("activation_checkpointing_kwargs", self.activation_checkpointing_kwargs)
        self.activation_checkpointing_kwargs = check_checkpoint_kwargs(kwargs, layer_keys=True) if kwargs else None
        self.gradient_checkpointing = self.activation_checkpointing
        self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "logs")
        self.logging_dir = os.fspath(self.logging_dir)

    def _check_best_model(self) -> None:
        """transformers' rules: load_best_model_at_end needs an evaluation at every save (the same strategy; save
        steps a multiple of the eval steps) and defaults metric_for_best_model to "loss"; greater_is_better
        defaults to whether that metric's name does not end in "loss"."""
        if not isinstance(self.load_best_model_at_end, bool):
            raise TypeError(f"load_best_model_at_end must be a bool, got {self.load_best_model_at_end!r}")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no" or self.eval_strategy != self.save_strategy:
                raise ValueError("load_best_model_at_end needs an evaluation at every checkpoint: eval_strategy and "
                                 "save_strategy both 'steps' or both 'epoch', got "
                                 f"{self.eval_strategy!r} and {self.save_strategy!r}")
            if self.eval_strategy == "steps" and isinstance(self.save_steps, int) != isinstance(self.eval_steps, int):
                raise ValueError(f"load_best_model_at_end: save_steps ({self.save_steps}) and eval_steps "
                                 f"({self.eval_steps}) must both be counts or both fractions of the run")
            if (self.eval_strategy == "steps" and isinstance(self.save_steps, int)
                    and self.save_steps % self.eval_steps):
                raise ValueError(f"load_best_model_at_end: save_steps ({self.save_steps}) must be a multiple of "
                                 f"eval_steps ({self.eval_steps})")
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None:
            if not isinstance(self.metric_for_best_model, str) or not self.metric_for_best_model:
                raise ValueError(f"metric_for_best_model must be a metric's name (e.g. 'loss', 'accuracy'), got "
                                 f"{self.metric_for_best_model!r}")
            if self.greater_is_better is None:  # (transformers' rule, "loss" last; and llmcore's eval_perplexity,
                # which transformers does not report: its rule took it for greater-is-better, and the worst won)
                self.greater_is_better = not self.metric_for_best_model.endswith(("loss", "perplexity"))
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            raise TypeError(f"greater_is_better must be a bool, got {self.greater_is_better!r}")
        self._check_early_stopping()

    def _check_early_stopping(self) -> None:
        """What transformers' EarlyStoppingCallback asserts when training begins, checked here: a metric to watch
        (metric_for_best_model) and evaluations to watch it in."""
        patience, threshold = self.early_stopping_patience, self.early_stopping_threshold
        if patience is None:
            return
        _check_int("early_stopping_patience", patience, 1)
        _check_float("early_stopping_threshold", threshold, lo=0.0)
        self.early_stopping_threshold = float(threshold)
        if self.metric_for_best_model is None:
            raise ValueError("early_stopping_patience needs metric_for_best_model (the metric to watch), or "
                             "load_best_model_at_end=True, which defaults it to 'loss'")
        if self.eval_strategy == "no":
            raise ValueError("early_stopping_patience needs evaluations: eval_strategy 'steps' or 'epoch', got 'no'")

    def batch_multiple(self, device) -> int:
        """What the batches' sizes are rounded up to (packed: tokens, padded: length; see
        ``llmcore.train.finetune.SplitBatches``): ``pad_to_multiple_of`` when set, else 64 tokens
        packed / 8 padded under bf16 on a CPU, where oneDNN generates kernels for every new GEMM
        shape, and 1 (no rounding) otherwise."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        if self.bf16 and _device_type(device) == "cpu":
            return 64 if self.pack else 8
        return 1

    def total_steps(self, steps_per_epoch: Optional[int]) -> int:
        """Optimizer steps of the whole run: ``max_steps`` if set, else epochs x steps per epoch."""
        if self.max_steps > 0:
            return self.max_steps
        if steps_per_epoch is None:
            raise ValueError("train_batches(epoch) has no len(): set max_steps, or return a sized iterable "
                             "(a list) so the number of steps per epoch is known")
        return max(1, math.ceil(self.num_train_epochs * steps_per_epoch))

    def every(self, name: str, total_steps: int) -> int:
        """``logging_steps``, ``eval_steps`` or ``save_steps`` in steps: a fraction of the run is
        ``ceil(fraction * total_steps)``, as transformers' Trainer resolves it."""
        value = getattr(self, name)
        return max(1, math.ceil(value * total_steps)) if isinstance(value, float) else value

    def num_warmup_steps(self, total_steps: int) -> int:
        """``warmup_steps`` if positive, else ``ceil(warmup_ratio * total_steps)``."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total_steps)

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints hold each rank's shards (``fsdp_config``'s ``SHARDED_STATE_DICT``)."""
        return self.fsdp_config["state_dict_type"] == "SHARDED_STATE_DICT"

    def to_dict(self) -> dict:
        return asdict(self)


def _steps_or_fraction(name: str, value) -> Union[int, float]:
    """logging_steps / eval_steps / save_steps as transformers takes them: a count of steps (a float that is a
    whole number >= 1 becomes an int), or a float in (0, 1), a fraction of the run's steps (``TrainConfig.every``)."""
    if isinstance(value, float) and math.isfinite(value):
        if 0.0 < value < 1.0:
            return value
        if value.is_integer() and value >= 1:
            return int(value)
        raise ValueError(f"{name} must be a whole number of steps >= 1 or a fraction of the run in (0, 1), got {value}")
    _check_int(name, value, minimum=1)
    return value


def _check_int(name: str, value, minimum: Optional[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_choice(name: str, value, choices: tuple) -> None:
    """ValueError naming the setting and its choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_float(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def _fsdp_mode(value) -> str:
    """transformers' ``fsdp`` value (``"full_shard auto_wrap"``, a list of options, ``""``/``False``/None for
    none) -> the sharding strategy, or ``""``."""
    if value is None or value is False:
        return ""
    if isinstance(value, str):
        options = value.split()
    elif isinstance(value, (list, tuple)) and all(isinstance(o, str) for o in value):
        options = list(value)
    else:
        raise TypeError(f"fsdp must be a string or a list of strings, got {type(value).__name__} {value!r}")
    unknown = [o for o in options if o not in _FSDP_OPTIONS]
    if unknown:
        raise ValueError(f"fsdp: {unknown} not supported; llmcore takes {', '.join(map(repr, FSDP_MODES))} "
                         "(and 'auto_wrap', which it always does)")
    modes = [o for o in options if o in FSDP_MODES]
    if len(modes) > 1:
        raise ValueError(f"fsdp: one sharding strategy, got {modes}")
    if not modes and options:
        raise ValueError(f"fsdp={value!r} names no sharding strategy: add one of {', '.join(map(repr, FSDP_MODES))}")
    return modes[0] if modes else ""


# torch.utils.checkpoint.checkpoint's keyword arguments that activation_checkpointing_kwargs may set, and the two keys
# that transformers takes out of them first
CHECKPOINT_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")
LAYER_KEYS = ("every_n_layers", "offload")


def check_checkpoint_kwargs(kwargs: Optional[dict], layer_keys: bool = False) -> dict:
    """``activation_checkpointing_kwargs`` checked (ValueError/TypeError naming what is wrong), with ``use_reentrant``
    False unless set (torch's recommendation; the reentrant form does not follow FSDP2). ``layer_keys``: also
    ``every_n_layers`` (an int >= 1) and ``offload`` (a bool), as TrainConfig takes them; a model's
    ``activation_checkpointing_enable`` takes those as arguments of their own. Here, not in
    llmcore.models.checkpointing, so that TrainConfig checks them without importing torch."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"activation_checkpointing_kwargs must be a dict, got {type(kwargs).__name__} {kwargs!r}")
    allowed = CHECKPOINT_KWARGS + (LAYER_KEYS if layer_keys else ())
    unknown = sorted(map(str, set(kwargs) - set(allowed)))
    if unknown:
        raise ValueError(f"activation_checkpointing_kwargs: {unknown} not supported; llmcore takes "
                         f"{', '.join(map(repr, allowed))}")
    n = kwargs.get("every_n_layers", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"activation_checkpointing_kwargs: every_n_layers must be an int >= 1, got {n!r}")
    if not isinstance(kwargs.get("offload", False), bool):
        raise ValueError(f"activation_checkpointing_kwargs: offload must be a bool, got {kwargs['offload']!r}")
    return {"use_reentrant": False, **kwargs}


def _dict_option(name: str, value) -> dict:
    """A dict-valued setting as transformers takes it: a dict, JSON text, or a JSON file's path (the command
    line's forms); None for {}."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value
        if not text.lstrip().startswith("{"):
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"{name}={value!r} is neither JSON text nor a readable JSON file: {e}") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}={value!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict, a JSON file's path or JSON text, got {type(value).__name__} "
                        f"{value!r}")
    return value


def _fsdp_config(value, fsdp: str) -> dict:
    """transformers' ``fsdp_config`` (a dict, a JSON file's path or JSON text; None for the defaults) ->
    ``{"state_dict_type": ...}``. Keys other than the state dict type are refused rather than ignored."""
    value = _dict_option("fsdp_config", value)
    # transformers drops the "fsdp_" prefix of the keys accelerate's config files use
    config = {k[len("fsdp_"):] if isinstance(k, str) and k.startswith("fsdp_") else k: v for k, v in value.items()}
    unknown = sorted(map(str, set(config) - {"state_dict_type"}))
    if unknown:
        raise ValueError(f"fsdp_config: {unknown} not supported; llmcore takes 'state_dict_type' "
                         f"({' or '.join(map(repr, STATE_DICT_TYPES))})")
    kind = config.get("state_dict_type", STATE_DICT_TYPES[0])
    if not isinstance(kind, str) or kind.upper() not in STATE_DICT_TYPES:
        raise ValueError(f"fsdp_config: state_dict_type must be one of {', '.join(map(repr, STATE_DICT_TYPES))}, "
                         f"got {kind!r}")
    kind = kind.upper()
    if kind == "SHARDED_STATE_DICT" and not fsdp:
        raise ValueError("fsdp_config: state_dict_type='SHARDED_STATE_DICT' writes the shards of a model FSDP "
                         f"shards: set fsdp too ({' or '.join(map(repr, FSDP_MODES))})")
    return {"state_dict_type": kind}


def _device_type(device) -> str:
    """"cpu", "cuda", ... of a torch.device or a device string."""
    return getattr(device, "type", None) or str(device).split(":")[0]
