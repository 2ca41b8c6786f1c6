"""Values built once per worker: :class:`WorkerValue`, models shipped to workers."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from wsi_hipe.schedule._cache import worker_cache

logger = logging.getLogger("wsi_hipe.schedule")  # one logger for the package, as before the split


# --- values built once per worker -------------------------------------------------------------


class WorkerValue:
    """A ``shared=`` value that each worker process builds once from a small picklable recipe.

    Subclasses define :attr:`key` (identifies the value across tasks, processes and
    :meth:`TaskRunner.map` calls) and :meth:`build`. Tasks receive ``build()``'s result,
    cached with :func:`worker_cache`.
    """

    @property
    def key(self) -> Hashable:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def get(self) -> Any:
        """The built value of this process (built on first use)."""
        return worker_cache(("worker-value", self.key), self.build)


@dataclass(frozen=True, eq=False)
class ShippedModel(WorkerValue):
    """A model as it travels to workers: CPU weights and description, plus its device.

    Made by :func:`ship_model`. ``data`` is the model pickled with every tensor on the CPU
    (TorchScript modules as TorchScript archives); ``device`` is where each worker runs it
    (``"auto"`` picks CUDA where the worker has it); ``digest`` (SHA-256 of ``data``) names it
    in the workers' caches.
    """

    data: bytes
    device: str
    digest: str

    @property
    def key(self) -> Hashable:
        return ("model", self.digest, self.device)

    def build(self) -> Any:
        """Unpickle on the CPU, then move to :attr:`device` (resolved in this worker)."""
        model = pickle.loads(self.data)
        to = getattr(model, "to", None)
        if callable(to):
            from wsi_hipe.models import resolve_device

            model = to(resolve_device(self.device))
        logger.debug("built shipped model %s on %s", self.digest[:12], self.device)
        return model

    def __repr__(self) -> str:
        return f"ShippedModel({self.digest[:12]}…, {len(self.data)} bytes, device={self.device!r})"


def ship_model(model: Any, *, device: str | None = None) -> ShippedModel:
    """Pack ``model`` (a ``SegmentationModel``, an ``nn.Module`` or any picklable callable) for
    workers: CPU weights + description, and the device it should run on there.

    Parameters
    ----------
    model : object
        Left untouched: tensors on a GPU are copied to host memory as they are pickled.
    device : str, optional
        Where workers run it (a :data:`wsi_hipe.config.DeviceName` or ``cuda:N``); default the
        model's ``device`` attribute, else ``"cpu"``.
    """
    data = _pack(model)
    if device is None:
        device = str(getattr(model, "device", None) or "cpu")
    return ShippedModel(data, str(device), hashlib.sha256(data).hexdigest())


def _pack(obj: Any) -> bytes:
    """Pickle ``obj`` with every tensor on the CPU and TorchScript modules as archives."""
    import cloudpickle
    import torch

    class _CpuPickler(cloudpickle.CloudPickler):
        def reducer_override(self, o: Any) -> Any:
            if isinstance(o, torch.jit.ScriptModule):
                buffer = io.BytesIO()
                with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.jit.save(o, buffer)
                return _load_script, (buffer.getvalue(),)
            if isinstance(o, torch.nn.Parameter) and o.device.type != "cpu":
                return _parameter, (o.detach().cpu(), o.requires_grad)
            if isinstance(o, torch.Tensor) and o.device.type != "cpu":
                return _same, (o.detach().cpu(),)
            return super().reducer_override(o)

    buffer = io.BytesIO()
    _CpuPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _load_script(data: bytes) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def _parameter(data: Any, requires_grad: bool) -> Any:
    import torch

    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Spilled(WorkerValue):
    """A :class:`WorkerValue` written once to a file; what a process pool's tasks carry."""

    path: str
    value_key: Hashable

    @property
    def key(self) -> Hashable:
        return self.value_key

    def build(self) -> Any:
        with open(self.path, "rb") as handle:
            value: WorkerValue = pickle.load(handle)
        return value.build()
