"""Shared plumbing for measurements on a model: validation, safety and forward passes.

Every measurement in :mod:`cm_monitor` runs a model that somebody is training. The helpers here
make that invisible to the training run: the model is put in evaluation mode and its previous
modes restored afterwards, gradients are taken only with respect to the measurement's own
tensors (never accumulated into ``.grad``), and autograd is enabled even when the caller sits
inside ``torch.no_grad()`` or ``torch.inference_mode()`` (as Lightning's validation hooks do).
No Lightning import here: this is the pure core.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

ModelLike = nn.Module | Sequence[nn.Module]


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


@contextlib.contextmanager
def measuring(members: list[nn.Module], grad: bool = True) -> Iterator[None]:
    """Evaluation mode and autograd for a measurement; restores every submodule's mode after.

    With ``grad=False`` (forward passes only) autograd is off. With ``grad=True`` it works inside
    ``torch.no_grad()`` and ``torch.inference_mode()``: both are switched off for the duration (tensors created in inference mode must be cloned by the caller before they
    join a graph). Parameters are not touched: gradients are taken with
    :func:`torch.autograd.grad` with respect to the measurement's own tensors only.
    """
    modes = [(sub, sub.training) for m in members for sub in m.modules()]
    try:
        for m in members:
            m.eval()
        if grad:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        else:
            with torch.no_grad():
                yield
    finally:
        for sub, training in modes:
            sub.training = training


def explain_inference_tensors(err: RuntimeError) -> RuntimeError:
    """Turn autograd's error about inference tensors into one that says what to do."""
    if "Inference tensors" in str(err) or "inference tensor" in str(err).lower():
        return RuntimeError(
            "The model's parameters or buffers are inference tensors (the model was created or "
            "loaded inside torch.inference_mode()), so no gradient can flow through it. Create "
            "the model outside inference mode. Original error: " + str(err)
        )
    return err


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
    return logp_sum / n, p_sum / n


def check_logits(out: object, batch: int, num_classes: int | None, name: str) -> None:
    """Raise a clear error unless ``out`` is a float tensor of logits ``[batch, C]``."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"`{name}` returned a {type(out).__name__}; expected a tensor of logits [N, C]. Wrap "
            "the model so that its forward returns the logits only."
        )
    if out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2:
        raise ValueError(
            f"`{name}` returned shape {tuple(out.shape)} for a batch of {batch}; expected logits "
            f"[{batch}, C] with C >= 2 classes."
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


def prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))
