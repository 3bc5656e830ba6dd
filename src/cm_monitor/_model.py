"""Shared plumbing for measurements on a model: validation, safety and forward passes.

Every measurement in :mod:`cm_monitor` runs a model that somebody is training. The helpers here
make that invisible to the training run (:func:`measuring`):

* the model is put in evaluation mode and every submodule's mode is restored afterwards;
* every buffer is saved at the start and restored at the end (and before every forward pass of
  the measurement, so a forward that updates buffers, such as a quantization observer or a
  forward-time counter, sees the same buffers at every pass); parameters are fingerprinted and
  restored from a copy if a forward changed them in place (see :data:`PARAMETER_COPY_BYTES`);
* gradients are taken only with respect to the measurement's own tensors, never accumulated into
  ``.grad``, and autograd is enabled even inside ``torch.no_grad()`` or ``torch.inference_mode()``
  (as Lightning's validation hooks are);
* the global random state (torch's CPU and the model's CUDA generators, Python's and NumPy's) is
  saved and restored, and every forward pass of the measurement starts from the same seed, so a
  model that draws random numbers in its forward (noise layers, MC dropout) is measured as one
  fixed function and training's random stream is not shifted.

Models as users write them: :func:`default_output_transform` finds the logits in a tuple, a dict
or an object with ``.logits`` (a HuggingFace ``ModelOutput``); a single logit ``[N, 1]`` is read as
two classes ``[0, z]`` (:func:`as_two_classes`). :class:`LogitsModel` applies both.
No Lightning import here: this is the pure core.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

ModelLike = nn.Module | Sequence[nn.Module]
#: ``output_transform``: maps what a model's forward returns to its logits ``[N, C]``.
OutputTransform = Callable[[Any], Tensor]

#: Parameters up to this many bytes in all are copied (to the CPU) at the start of a measurement,
#: so that a forward pass that changes them in place is undone exactly. Larger models are only
#: fingerprinted: such a change is then detected and reported (RuntimeError), not undone.
PARAMETER_COPY_BYTES = 2**30

#: Seed of the random numbers a model draws in its forward during a measurement.
MODEL_SEED = 0

HALF_PRECISION = (torch.float16, torch.bfloat16)
"""The half-precision floating dtypes, which some measurements compute in float32 instead
(:data:`cm_monitor.elasticity.HALF_PRECISION` says why for local elasticity; diffeomorphisms
interpolate half images in float32)."""


def as_members(model: ModelLike, name: str = "model") -> list[nn.Module]:
    """Return the ensemble members of ``model`` (a module or a non-empty sequence of modules)."""
    if isinstance(model, nn.Module):
        return [model]
    if isinstance(model, Sequence) and not isinstance(model, str | bytes):
        members = list(model)
        if not members:
            raise ValueError(f"`{name}` is an empty sequence; expected an nn.Module or a list of them.")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"`{name}[{i}]` is a {type(m).__name__}; expected an nn.Module.")
        return members
    raise TypeError(f"`{name}` is a {type(model).__name__}; expected an nn.Module or a list of nn.Modules.")


# ---------------------------------------------------------------------------------------------
# Models as users write them


class ModelCallError(TypeError):
    """The model could not be called on a batch of inputs (a tensor) or its output not read."""


def default_output_transform(output: Any) -> Tensor:
    """The logits in what a classifier's forward returns, as users write them.

    * a tensor: itself;
    * a mapping (``dict``, HuggingFace ``ModelOutput``): its ``"logits"`` entry;
    * an object with a tensor attribute ``.logits``;
    * a tuple or list: its first element (``(logits, features)``, ``(logits, aux_loss)``).

    Anything else is a ``TypeError`` (:class:`ModelCallError`) that says to pass ``output_transform=``. A single logit
    ``[N, 1]`` is left as it is here; the measurements read it as two classes
    (:func:`as_two_classes`).

    Example::

        >>> import torch
        >>> from cm_monitor import default_output_transform
        >>> z = torch.zeros(4, 3)
        >>> all(default_output_transform(o) is z for o in (z, (z, "aux"), {"logits": z, "loss": 0}))
        True
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], Tensor):
            return output["logits"]
        raise ModelCallError(
            f"the model returned a {type(output).__name__} with keys {list(output)[:8]} and no tensor under "
            "'logits'; pass `output_transform=` (e.g. `lambda out: out['scores']`) to pick the logits [N, C]."
        )
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ModelCallError(
        f"the model returned a {type(output).__name__}; expected logits [N, C], or a tuple/list whose first "
        "element, a dict with 'logits' or an object with `.logits` holding them. Pass `output_transform=` "
        "(a function: model output -> logits [N, C]) for other outputs."
    )


def as_two_classes(logits: Tensor) -> Tensor:
    """A single logit ``z`` ``[N, 1]`` (binary classifier, sigmoid/BCE) as two-class logits ``[0, z]``.

    ``softmax([0, z])`` is ``(1 − σ(z), σ(z))``: class 1 has the sigmoid's probability, and the
    cross-entropy of ``[0, z]`` is the binary cross-entropy of ``z``. Other shapes are returned as
    they are.

    Example::

        >>> import torch
        >>> from cm_monitor._model import as_two_classes
        >>> as_two_classes(torch.tensor([[2.0]])).softmax(1)[:, 1], torch.sigmoid(torch.tensor(2.0))
        (tensor([0.8808]), tensor(0.8808))
    """
    if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


_CALL_ERRORS = (TypeError, KeyError, IndexError, AttributeError)


class LogitsModel(nn.Module):
    """``model`` whose forward returns logits ``[N, C]``: ``as_two_classes(output_transform(model(x)))``.

    A thin wrapper (the model is its only submodule, nothing is copied). An error raised by
    calling ``model`` on the tensor or by ``output_transform`` (a ``TypeError``, ``KeyError``,
    ``IndexError`` or ``AttributeError``, the usual symptoms of a forward that expects a dict
    batch or several arguments) becomes a :class:`ModelCallError` that says what was called and
    how to fix it.
    """

    def __init__(self, model: nn.Module, output_transform: OutputTransform | None = None, name: str = "model") -> None:
        super().__init__()
        self.model = model
        self.output_transform = default_output_transform if output_transform is None else output_transform
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        try:
            out = self.model(x)
        except _CALL_ERRORS as err:
            raise ModelCallError(
                f"`{self.name}` raised {type(err).__name__} when called on a tensor batch of shape "
                f"{tuple(x.shape)}: {err}. The measurement calls {self.name}(inputs) with the input tensor as "
                "the only argument; a model whose forward takes a dict batch or more arguments needs an "
                "nn.Module around it whose forward takes that tensor and returns the logits."
            ) from err
        if self.output_transform is default_output_transform:
            return as_two_classes(default_output_transform(out))  # its errors say what to do
        try:
            logits = self.output_transform(out)
        except _CALL_ERRORS as err:
            raise ModelCallError(
                f"`output_transform` could not read the output of `{self.name}` ({type(err).__name__}: {err}); "
                "pass `output_transform=` a function mapping the model's output to logits [N, C]."
            ) from err
        return as_two_classes(logits)


def logits_models(
    members: list[nn.Module], output_transform: OutputTransform | None = None, name: str = "model"
) -> list[nn.Module]:
    """Each member as a :class:`LogitsModel` (already wrapped members are kept as they are)."""
    if output_transform is not None and not callable(output_transform):
        raise TypeError(
            f"`output_transform` must be None or a function (model output -> logits [N, C]), got {output_transform!r}."
        )
    out: list[nn.Module] = []
    for i, m in enumerate(members):
        label = f"{name}[{i}]" if len(members) > 1 else name
        out.append(m if isinstance(m, LogitsModel) else LogitsModel(m, output_transform, label))
    return out


# ---------------------------------------------------------------------------------------------
# Devices and inputs


def model_device(members: list[nn.Module], fallback: torch.device) -> torch.device:
    """The device of the first parameter (or buffer) of the first member, else ``fallback``."""
    for m in members:
        for t in m.parameters():
            return t.device
        for t in m.buffers():
            return t.device
    return fallback


def model_float_dtype(members: list[nn.Module], fallback: torch.dtype) -> torch.dtype:
    """The dtype of the first floating-point parameter of the first member, else ``fallback``."""
    for m in members:
        for t in m.parameters():
            if t.is_floating_point():
                return t.dtype
    return fallback


def check_float_inputs(x: Tensor, name: str, *, min_dims: int = 2) -> None:
    """Raise a clear error unless ``x`` is a finite floating-point tensor with a batch dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` is a {type(x).__name__}; expected a torch.Tensor.")
    if not x.is_floating_point():
        if x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
            raise TypeError(
                f"`{name}` has integer dtype {x.dtype}; the method moves inputs continuously, so it "
                "needs floating-point inputs. For token ids, measure on continuous inputs instead "
                "(e.g. the embeddings, with a model that starts after the embedding layer)."
            )
        raise TypeError(f"`{name}` has dtype {x.dtype}; expected a floating-point tensor.")
    if x.dim() < min_dims:
        raise ValueError(
            f"`{name}` has shape {tuple(x.shape)}; expected a batch [N, *shape] with at least {min_dims} dimensions."
        )
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); expected at least one input.")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"`{name}` contains NaN or inf values (in {bad} of {x.shape[0]} inputs).")


# ---------------------------------------------------------------------------------------------
# Leaving the model as it was


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """``[len(tensors)]`` int64 sums of the tensors' bit patterns: any change of one element changes it.

    Tensors whose bits cannot be viewed as integers (quantized, odd element sizes) contribute 0
    (their ``_version`` still tells in-place changes).
    """
    sums = []
    for t in tensors:
        t = t.detach()
        bits = _INT_OF_SIZE.get(t.element_size())
        if bits is None or t.is_quantized or t.numel() == 0:
            sums.append(torch.zeros((), dtype=torch.int64, device=t.device))
            continue
        if t.is_complex():
            t = torch.view_as_real(t)
        sums.append(t.view(bits).sum(dtype=torch.int64))
    if not sums:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([s.cpu() for s in sums]) if len({s.device for s in sums}) > 1 else torch.stack(sums).cpu()


def _submodules(members: list[nn.Module]) -> list[nn.Module]:
    """Every submodule of the members, each once (members may share submodules)."""
    return list({id(sub): sub for m in members for sub in m.modules()}.values())


def lazy_modules(members: list[nn.Module]) -> list[str]:
    """The class names of the submodules whose parameters or buffers are not initialized yet (e.g.
    :class:`torch.nn.LazyLinear` before its first forward pass)."""
    return [
        type(sub).__name__
        for sub in _submodules(members)
        if any(nn.parameter.is_lazy(t) for t in (*sub._parameters.values(), *sub._buffers.values()) if t is not None)
    ]


def check_initialized(members: list[nn.Module]) -> None:
    """Raise a clear error if a member has lazy modules not initialized yet: measuring would
    initialize them, with random numbers a training run did not draw."""
    lazy = lazy_modules(members)
    if lazy:
        raise ValueError(
            f"The model has parameters that are not initialized yet (lazy modules: {', '.join(lazy[:5])}); "
            "run one forward pass through it first (e.g. on a batch of data) and then measure."
        )


class ModelGuard:
    """Saves what a forward pass could change in ``members`` and puts it back.

    * buffers: the tensor objects and a copy of their values; :meth:`restore_buffers` copies the
      values back into any buffer whose version counter moved (cheap: called before every forward
      pass of a measurement), :meth:`restore` also puts back replaced or removed buffers and
      values changed behind autograd's back (``.data``), by fingerprint;
    * parameters: the objects, ``requires_grad`` flags, ``.grad`` objects, version counters and a
      fingerprint; their values are copied to the CPU when they take at most
      :data:`PARAMETER_COPY_BYTES`. A change found by :meth:`restore` is undone from that copy (with
      a RuntimeWarning naming the parameters), or raises a RuntimeError without one;
    * every submodule's ``training`` flag.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        check_initialized(members)
        modules = _submodules(members)
        self.modes = [(sub, sub.training) for sub in modules]
        self.buffer_dicts = [(sub, dict(sub._buffers)) for sub in modules]
        self.param_dicts = [(sub, dict(sub._parameters)) for sub in modules]
        named_buffers = {id(b): b for _, d in self.buffer_dicts for b in d.values() if b is not None}
        self.buffers = list(named_buffers.values())
        with _inference(False), torch.no_grad():
            self.buffer_values = [b.detach().clone() for b in self.buffers]
        self.buffer_versions = [_version(b) for b in self.buffers]
        self.buffer_prints = fingerprint(self.buffers)
        named = {}
        for sub, d in self.param_dicts:
            for name, p in d.items():
                if p is not None and id(p) not in named:
                    named[id(p)] = (f"{type(sub).__name__}.{name}", p)
        self.param_names = [n for n, _ in named.values()]
        self.params = [p for _, p in named.values()]
        self.flags = [p.requires_grad for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.param_versions = [_version(p) for p in self.params]
        self.param_prints = fingerprint(self.params)
        nbytes = sum(p.numel() * p.element_size() for p in self.params)
        self.param_values: list[Tensor] | None = None
        if nbytes <= PARAMETER_COPY_BYTES:
            with torch.no_grad():
                self.param_values = [p.detach().to("cpu", copy=True) for p in self.params]

    def restore_buffers(self) -> None:
        """Copy the saved values back into every buffer whose version counter moved."""
        for i, b in enumerate(self.buffers):
            if _version(b) != self.buffer_versions[i]:
                self._put_buffer(i)

    def _put_buffer(self, i: int) -> None:
        b, saved = self.buffers[i], self.buffer_values[i]
        with _inference(b.is_inference()), torch.no_grad():
            if b.shape != saved.shape:
                b.resize_(saved.shape)
            b.copy_(saved)
        self.buffer_versions[i] = _version(b)

    def restore(self) -> None:
        """Put everything back (see the class docstring); raise if parameters changed and cannot be."""
        for sub, training in self.modes:
            sub.training = training
        for sub, saved in self.buffer_dicts:
            _restore_dict(sub._buffers, saved)
        for sub, saved in self.param_dicts:
            _restore_dict(sub._parameters, saved)
        changed = (fingerprint(self.buffers) != self.buffer_prints).tolist()
        for i, b in enumerate(self.buffers):
            if changed[i] or _version(b) != self.buffer_versions[i] or b.shape != self.buffer_values[i].shape:
                self._put_buffer(i)
        for p, flag, g in zip(self.params, self.flags, self.grads, strict=True):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not g:
                p.grad = g
        self._restore_parameters()

    def _restore_parameters(self) -> None:
        moved = (fingerprint(self.params) != self.param_prints).tolist()
        bad = [
            i
            for i, p in enumerate(self.params)
            if moved[i] or _version(p) != self.param_versions[i] or p.shape != self._shape(i)
        ]
        if not bad:
            return
        names = [self.param_names[i] for i in bad]
        if self.param_values is None:
            raise RuntimeError(
                f"The model's forward changed parameters {names[:8]} in place during the measurement, and the "
                f"model is too large (over cm_monitor._model.PARAMETER_COPY_BYTES = {PARAMETER_COPY_BYTES} bytes "
                "of parameters) for a copy to undo it: training would continue from changed weights. Make the "
                "forward leave its parameters alone, or raise PARAMETER_COPY_BYTES."
            )
        for i in bad:
            p, saved = self.params[i], self.param_values[i]
            with _inference(p.is_inference()), torch.no_grad():
                if p.shape != saved.shape:
                    p.data = saved.to(p.device, copy=True)
                else:
                    p.copy_(saved)
        warnings.warn(
            f"The model's forward changed parameters {names[:8]} in place during the measurement; they were "
            "restored from a copy.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _shape(self, i: int) -> torch.Size:
        return self.param_values[i].shape if self.param_values is not None else self.params[i].shape


def _version(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place change); -1 for inference tensors, which have none."""
    return -1 if t.is_inference() else t._version


def _restore_dict(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Make ``current`` hold exactly the objects of ``saved`` again (a module's buffers or parameters)."""
    if current.keys() == saved.keys() and all(current[k] is v for k, v in saved.items()):
        return
    current.clear()
    current.update(saved)


def _inference(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``torch.inference_mode(enabled)``: in-place writes to inference tensors need it on, others off."""
    return torch.inference_mode(enabled)


def _cuda_devices(members: list[nn.Module]) -> list[int]:
    found = {t.device.index or 0 for m in members for t in [*m.parameters(), *m.buffers()] if t.device.type == "cuda"}
    return sorted(found)


def seed_model_rng(devices: Sequence[int], seed: int = MODEL_SEED) -> None:
    """Seed torch's CPU generator and the CUDA generators of ``devices`` (only those)."""
    torch.random.default_generator.manual_seed(seed)
    for i in devices:
        torch.cuda.default_generators[i].manual_seed(seed)


@contextlib.contextmanager
def saved_rng(devices: Sequence[int]) -> Iterator[None]:
    """Save and restore torch's CPU and ``devices``' CUDA random states, Python's and NumPy's."""
    py_state = random.getstate()
    np_random = _numpy_random()
    np_state = np_random.get_state() if np_random is not None else None
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(py_state)
        if np_random is not None:
            np_random.set_state(np_state)


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with the dependencies
        return None
    return numpy.random


@contextlib.contextmanager
def measuring(members: list[nn.Module], grad: bool = True) -> Iterator[None]:
    """Run a measurement on ``members`` and leave them, and the random state, as they were.

    Inside: evaluation mode; with ``grad=False`` (forward passes only) autograd is off; with
    ``grad=True`` it is on even inside ``torch.no_grad()`` and ``torch.inference_mode()`` (tensors
    created in inference mode must be cloned by the caller before they join a graph). Gradients
    are taken with :func:`torch.autograd.grad` with respect to the measurement's own tensors only.

    Before every forward pass of a member, buffers whose version moved are restored and the model's
    random generators (torch CPU, the model's CUDA devices) are seeded with :data:`MODEL_SEED`:
    every pass sees the same buffers and the same random numbers for the same batch shape. On exit
    (exceptions included) every submodule's mode, every buffer, parameters (see
    :class:`ModelGuard`), ``.grad`` and ``requires_grad``, and the global random states are restored.

    Autocast is off inside (on the CPU and the members' CUDA devices): a measurement called within a
    ``torch.autocast`` block runs the model in its own precision, as the monitors do (Lightning's
    mixed precision covers the step methods, not the epoch-end hooks they measure in). So is cuDNN's
    autotuner (``torch.backends.cudnn.benchmark``, which ``Trainer(benchmark=True)`` sets): the work
    pool's passes change their number of rows as problems finish, and the autotuner would search
    the algorithms of every convolution again for each new size.

    Compiled modules (``torch.compile``) run eagerly inside (``torch.compiler.set_stance("force_eager")``):
    a measurement's new batch sizes, gradient modes and ``torch.func`` transforms would otherwise
    compile new graphs, use up Dynamo's recompile limit (after which the training step's own new
    shapes run uncompiled), and a transform that Dynamo cannot trace (the elasticity's ``vmap`` of
    ``grad``) makes it skip the module's ``forward`` for good, so that training went on uncompiled,
    with other numerics: the weights differed from a fit without the monitor.
    """
    guard = ModelGuard(members)
    devices = _cuda_devices(members)

    def before_forward(module: nn.Module, args: Any) -> None:
        guard.restore_buffers()
        seed_model_rng(devices)

    hooks = []
    try:
        with (
            saved_rng(devices),
            _no_autocast(devices),
            _no_cudnn_autotuning(),
            _no_compilation(),
        ):
            hooks = [m.register_forward_pre_hook(before_forward) for m in members]
            for m in members:
                m.eval()
            if grad:
                with torch.inference_mode(False), torch.enable_grad():
                    yield
            else:
                with torch.no_grad():
                    yield
    finally:
        for h in hooks:
            h.remove()
        guard.restore()


def _no_compilation() -> contextlib.AbstractContextManager[Any]:
    """Compiled modules run eagerly inside (``torch.compiler.set_stance``, torch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return contextlib.nullcontext() if set_stance is None else set_stance("force_eager")


@contextlib.contextmanager
def _no_cudnn_autotuning() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` off inside, restored on exit."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def _no_autocast(cuda_devices: list[int]) -> Iterator[None]:
    """Autocast off on the CPU and, if the members use any, on CUDA."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda") if cuda_devices else ("cpu",):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def explain_inference_tensors(err: RuntimeError) -> RuntimeError:
    """Turn autograd's error about inference tensors into one that says what to do."""
    if "Inference tensors" in str(err) or "inference tensor" in str(err).lower():
        return RuntimeError(
            "The model's parameters or buffers are inference tensors (the model was created or "
            "loaded inside torch.inference_mode()), so no gradient can flow through it. Create "
            "the model outside inference mode. Original error: " + str(err)
        )
    return err


def input_gradient(output: Tensor, inputs: Tensor) -> Tensor:
    """``d output / d inputs`` (``output`` a scalar), with an error that says what is wrong when the
    model's output does not depend on its input through autograd."""
    try:
        (grad,) = torch.autograd.grad(output, inputs)
    except RuntimeError as err:
        text = str(err)
        if "not have been used in the graph" in text or "does not require grad" in text:
            raise RuntimeError(
                "The model's output does not depend on its input through autograd (part of its forward "
                "runs under torch.no_grad() or detaches the input, e.g. a frozen backbone), so there is no "
                "gradient with respect to the input, which the cutting planes follow. Run the forward with "
                "gradients enabled (freeze a backbone with requires_grad_(False) instead). Original error: " + text
            ) from err
        raise
    return grad


def ensemble_log_probs(
    members: list[nn.Module], x: Tensor, num_classes: int | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Forward ``x`` through the ensemble; return (mean log-softmax, mean softmax), both [N, C].

    For one member both are that member's log-softmax and softmax of ``logits / temperature``.
    The output of every member is checked to be ``[N, C]`` logits (with ``C == num_classes``
    when given).
    """
    logp_sum: Tensor | None = None
    p_sum: Tensor | None = None
    for i, m in enumerate(members):
        out = m(x)
        check_logits(out, x.shape[0], num_classes, f"model[{i}]" if len(members) > 1 else "model")
        logits = out if out.dtype == torch.float64 else out.float()
        logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=1)
        logp_sum = logp if logp_sum is None else logp_sum + logp
        p_sum = logp.exp() if p_sum is None else p_sum + logp.exp()
        num_classes = out.shape[1]
    assert logp_sum is not None and p_sum is not None
    n = len(members)
    return (logp_sum, p_sum) if n == 1 else (logp_sum / n, p_sum / n)


def check_logits(out: object, batch: int, num_classes: int | None, name: str) -> None:
    """Raise a clear error unless ``out`` is a float tensor of logits ``[batch, C]``."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"`{name}` returned a {type(out).__name__}; expected a tensor of logits [N, C]. Pass "
            "`output_transform=` (a function: model output -> logits [N, C])."
        )
    if out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2:
        raise ValueError(
            f"`{name}` returned shape {tuple(out.shape)} for a batch of {batch}; expected logits "
            f"[{batch}, C] with C >= 2 classes (or a single logit [{batch}, 1]). Pass `output_transform=` "
            "(a function: model output -> logits) when the logits are elsewhere."
        )
    if not out.is_floating_point():
        raise TypeError(f"`{name}` returned dtype {out.dtype}; expected floating-point logits.")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"`{name}` returned {out.shape[1]} classes but the other members return {num_classes}.")


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator: ``generator`` itself, one seeded with the given int, or seed 0."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"`generator` is on {generator.device}; expected a CPU torch.Generator.")
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"`generator` is a {type(generator).__name__}; expected a torch.Generator, an int seed or None."
        )
    return torch.Generator().manual_seed(int(generator))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock timings are right."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: :func:`to_device` queues copies of at most this many bytes (pinned host memory, which PyTorch's
#: caching host allocator keeps for reuse: only small blocks, so a measurement does not hold host
#: memory that a training run's data loaders may need); larger ones wait.
QUEUED_COPY_BYTES = 4 * 2**20


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor made on the host, on ``device`` (and in ``dtype``), if small without waiting for the
    device.

    A copy from ordinary host memory to a CUDA device waits until every operation already queued on
    the device has run; from page-locked (pinned) memory it is queued like any other operation
    (PyTorch's caching host allocator keeps that memory until the copy has run). Copies of at most
    :data:`QUEUED_COPY_BYTES` are queued; larger ones, and any where the host refuses page-locked
    memory, wait. On the CPU this is ``t.to(device, dtype)``."""
    device = torch.device(device)
    t = t if dtype is None else t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu" or t.numel() * t.element_size() > QUEUED_COPY_BYTES:
        return t.to(device)
    try:
        pinned = t.pin_memory()
    except RuntimeError:  # page-locked memory refused (a low memlock limit, WSL): an ordinary copy
        return t.to(device)
    return pinned.to(device, non_blocking=True)


def prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))
