"""The fp32 running mean of state dicts, θ̄_r = θ̄_{r-1} + (θ_r − θ̄_{r-1}) / r.

One primitive for two stages: training keeps the cumulative average of its snapshots with it (the CA
variant, :mod:`ofa_lib.train.training`), and the cross-run pass averages runs accumulatively with it
(:func:`ofa_lib.merge.averaging.running_average`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ofa_lib.models.ckpt_io import (
    SHOW,
    CheckpointMismatchError,
    StateDict,
    check_finite,
)


class RunningMean:
    """fp32 running mean of state dicts: θ̄_r = θ̄_{r-1} + (θ_r − θ̄_{r-1}) / r.

    ``update`` validates the whole input (keys, shapes, finiteness, equal non-floating
    tensors) before changing anything, so a rejected input leaves the mean intact. ``.mean``
    is the live fp32 dict (non-floating tensors kept as in the first input); use
    :meth:`state_dict` for a copy in another dtype. ``device`` (default: the inputs') is where
    the mean lives, e.g. "cpu" to keep a GPU model's running mean off the GPU.
    """

    def __init__(self, *, device: torch.device | str | None = None) -> None:
        self.mean: StateDict = {}
        self.count: int = 0
        self._device = device
        self._dtypes: dict[str, torch.dtype] = {}

    def update(self, state_dict: Mapping[str, torch.Tensor], *, name: str = "state dict") -> None:
        """Fold one more state dict into the mean (``name`` appears in error messages)."""
        self._validate(state_dict, name)
        r = self.count + 1
        for key, value in state_dict.items():
            value = value.detach()
            if not value.is_floating_point():
                if r == 1:
                    self.mean[key] = value.to(self._device or value.device, copy=True)
                continue
            x = value.to(device=self._device or value.device, dtype=torch.float32, copy=True)
            if r == 1:
                self.mean[key] = x
                self._dtypes[key] = value.dtype
            else:
                _mean_step(self.mean[key], x, r)
        self.count = r

    def copy(self) -> "RunningMean":
        """An independent copy (the mean tensors are cloned)."""
        other = RunningMean(device=self._device)
        other.mean = {k: v.clone() for k, v in self.mean.items()}
        other.count = self.count
        other._dtypes = dict(self._dtypes)
        return other

    def state_dict(self, dtype: torch.dtype | None = None) -> StateDict:
        """A copy of the mean; floating tensors in ``dtype`` (default: the first input's dtype)."""
        out: StateDict = {}
        for key, t in self.mean.items():
            if t.is_floating_point():
                out[key] = t.to(dtype or self._dtypes[key], copy=True)
            else:
                out[key] = t.clone()
        return out

    def _validate(self, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
        if self.count:
            missing = sorted(set(self.mean) - set(state_dict))
            extra = sorted(set(state_dict) - set(self.mean))
            if missing or extra:
                raise CheckpointMismatchError(
                    f"{name} has different keys from the running mean: "
                    f"{len(missing)} missing (first: {missing[:SHOW]}), "
                    f"{len(extra)} extra (first: {extra[:SHOW]})"
                )
        for key, value in state_dict.items():
            if self.count:
                ref = self.mean[key]
                if tuple(value.shape) != tuple(ref.shape):
                    raise CheckpointMismatchError(
                        f"shape mismatch for key {key!r}: running mean has {list(ref.shape)}, "
                        f"{name} has {list(value.shape)}"
                    )
                if not value.is_floating_point() and not torch.equal(value.to(ref.device), ref):
                    raise CheckpointMismatchError(f"non-floating tensor {key!r} differs in {name}")
            check_finite(key, value, what=f"input {name}, tensor")


def _mean_step(mean: torch.Tensor, x: torch.Tensor, r: int) -> None:
    """The running-mean update, in place: mean += (x − mean) / r. ``x`` (fp32) is consumed."""
    mean.add_(x.sub_(mean).div_(r))
