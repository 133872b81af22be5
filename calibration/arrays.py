"""The array libraries the decision rule runs on: numpy, torch (CPU or GPU) and array-API libraries.

The score formulas (:mod:`exitwise.calibration.rule`, :mod:`exitwise.calibration.topk`) are
written once, against the small set of operations of a :class:`Namespace`; :func:`namespace`
picks the one of an input array. numpy is the reference: :data:`NUMPY` maps every operation to
the numpy call the rule always made, so the solver, the certification and the runtime on numpy
compute the same bits as before. torch is supported without being a dependency: a tensor is
recognised by its type's module and the ``torch`` module is taken from ``sys.modules`` (it is
loaded if a tensor exists). Other libraries with ``__array_namespace__`` (CuPy, JAX, ...) go
through the standard's functions (:class:`ArrayAPINamespace`).

Arithmetic is float64 wherever the device has it; results then equal numpy's to ~1e-12 (top-k
scores at T != 1: to ~1e-16 / m, m the tail mass, see :mod:`exitwise.calibration.topk`). Apple's
MPS has no float64: there the rule computes in float32 (:meth:`Namespace.float_dtype`), scores
differ from numpy's by up to ~1e-5 and a score that close to its threshold may decide
differently; for a vocabulary policy with a temperature above 1 the tail mass is then known to
~1e-7 only and a small tail's scores can be off by ~1e-2 (move such logits to the CPU). numpy
and the standard library only.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from contextlib import nullcontext
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["NUMPY", "ArrayAPINamespace", "Namespace", "NumpyNamespace", "TorchNamespace", "namespace"]


class Namespace(ABC):
    """The operations the decision rule needs from one array library (``name``, module ``xp``).

    Subclasses map each to the library's call; arrays stay on the device of the input (``like``).
    """

    name: str
    xp: Any

    def prepare(self, x: Any) -> Any:
        """The input as an array of this library (no copy; detached from any autograd graph)."""
        return x

    def device_key(self, like: Any) -> Hashable:
        """A hashable name of ``like``'s device (keys the per-device copies of a policy's arrays)."""
        return None

    def float_dtype(self, like: Any) -> Any:
        """float64, or float32 on a device without float64 (MPS)."""
        return self.xp.float64

    @abstractmethod
    def to_float(self, x: Any) -> Any:
        """``x`` in :meth:`float_dtype` (float64 when the device has it)."""

    @abstractmethod
    def from_host(self, arr: np.ndarray, like: Any, floating: bool = False) -> Any:
        """A numpy array copied to ``like``'s device (float: :meth:`float_dtype`; ints: int64; bools: bool)."""

    def errstate(self, **kwargs: str) -> Any:
        """numpy's floating-point warning control; other libraries do not warn."""
        return nullcontext()

    # elementwise and reductions ----------------------------------------------------------------
    def exp(self, x: Any) -> Any:
        return self.xp.exp(x)

    def iexp(self, x: Any) -> Any:
        """exp, in place where the library allows (returns the result)."""
        return self.xp.exp(x)

    def log(self, x: Any) -> Any:
        return self.xp.log(x)

    def log1p(self, x: Any) -> Any:
        return self.xp.log1p(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.xp.where(cond, a, b)

    def clip(self, x: Any, lo: float, hi: float) -> Any:
        return self.xp.clip(x, lo, hi)

    def maximum(self, x: Any, lo: float) -> Any:
        """Elementwise max(x, lo) for a Python scalar ``lo``."""
        return self.xp.clip(x, lo, None)

    def sum(self, x: Any, axis: int, keepdims: bool = False) -> Any:
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def amax(self, x: Any, axis: int, keepdims: bool = False) -> Any:
        return self.xp.max(x, axis=axis, keepdims=keepdims)

    def argmax(self, x: Any, axis: int) -> Any:
        return self.xp.argmax(x, axis=axis)

    def stack(self, arrays: Sequence[Any], axis: int) -> Any:
        return self.xp.stack(list(arrays), axis=axis)

    def rowdot(self, a: Any, b: Any) -> Any:
        """sum_j a[i, j] * b[i, j] for every row i."""
        return self.xp.sum(a * b, axis=1)

    def lincomb(self, phi: Any, coef: Sequence[float]) -> Any:
        """phi (n, m) @ coef (m,): the Platt logit, coefficients given as Python numbers."""
        out = phi[:, 0] * float(coef[0])
        for j in range(1, len(coef)):
            out = out + phi[:, j] * float(coef[j])
        return out

    def second_largest(self, e: Any) -> Any:
        """The second largest entry of each row (the largest again if it is tied); rows have >= 2 entries."""
        return self.xp.sort(e, axis=1)[:, -2]

    def take(self, x: Any, idx: Any) -> Any:
        """x[idx] for a 1-d ``x`` and an integer array ``idx``."""
        return self.xp.take(x, idx)

    def lookup(self, table: Any, rows: Any, k: int, cols: Any) -> Any:
        """table[rows[i], k, cols[i]] for every i (the threshold of each sample)."""
        plane = table[:, k, :]
        return self.xp.take(self.xp.reshape(plane, (-1,)), rows * plane.shape[1] + cols)

    def take_rows(self, x: Any, idx: Any) -> Any:
        """x[i, idx[i]] for every row i."""
        return self.xp.take_along_axis(x, idx[:, None], axis=1)[:, 0]

    def put_rows(self, x: Any, idx: Any, values: Any) -> Any:
        """x with x[i, idx[i]] = values[i] (may modify ``x``)."""
        cols = self.xp.arange(x.shape[1], device=x.device)
        return self.xp.where(cols[None, :] == idx[:, None], values[:, None], x)

    def max_excluding(self, x: Any, idx: Any) -> Any:
        """max_{j != idx[i]} x[i, j] for every row i (x has >= 2 columns)."""
        cols = self.xp.arange(x.shape[1], device=x.device)
        return self.amax(self.xp.where(cols[None, :] == idx[:, None], -math.inf, x), axis=1)

    def topk_values(self, z: Any, k: int) -> Any:
        """The k largest entries of each row, descending (no ids: the scores need only these)."""
        return self.topk(z, k)[0]

    def topk(self, z: Any, k: int) -> tuple[Any, Any]:
        """The k largest entries of each row, descending, and their column ids (int64).

        Canonical under ties: of equal values the lower ids come first and are the ones kept,
        so ``ids[:, 0]`` is the argmax and every library gives the same ids.
        """
        ids = self.xp.argsort(-z, axis=1, stable=True)[:, :k]
        return self.xp.take_along_axis(z, ids, axis=1), self.xp.astype(ids, self.xp.int64)

    # creation ----------------------------------------------------------------------------------
    def zeros(self, n: int, like: Any) -> Any:
        """(n,) zeros of ``like``'s dtype and device."""
        return self.xp.zeros(n, dtype=like.dtype, device=like.device)

    def ones(self, n: int, like: Any) -> Any:
        return self.xp.ones(n, dtype=like.dtype, device=like.device)

    def empty_float(self, n: int, like: Any) -> Any:
        return self.xp.empty(n, dtype=self.float_dtype(like), device=like.device)

    def empty_int(self, n: int, like: Any) -> Any:
        return self.xp.empty(n, dtype=self.xp.int64, device=like.device)

    def full_bool(self, n: int, value: bool, like: Any) -> Any:
        return self.xp.full(n, bool(value), dtype=self.xp.bool, device=like.device)

    def zeros_index(self, n: int, like: Any) -> Any:
        return self.xp.zeros(n, dtype=self.xp.int64, device=like.device)

    def count_true(self, mask: Any) -> int:
        """Number of True entries (a host integer: on a GPU this waits for the device)."""
        return int(self.xp.sum(self.xp.astype(mask, self.xp.int64)))


class NumpyNamespace(Namespace):
    """numpy: exactly the calls the rule made before it ran on other libraries (same bits)."""

    name = "numpy"
    xp = np

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    where = staticmethod(np.where)
    clip = staticmethod(np.clip)
    maximum = staticmethod(np.maximum)
    stack = staticmethod(np.stack)
    errstate = staticmethod(np.errstate)

    def prepare(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def float_dtype(self, like: Any) -> Any:
        return np.float64

    def to_float(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def from_host(self, arr: np.ndarray, like: Any, floating: bool = False) -> np.ndarray:
        return arr

    def iexp(self, x: np.ndarray) -> np.ndarray:
        return np.exp(x, out=x)

    sum = staticmethod(np.add.reduce)  # what ndarray.sum calls
    amax = staticmethod(np.maximum.reduce)  # what ndarray.max calls
    argmax = staticmethod(np.argmax)

    def rowdot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", a, b)

    def lincomb(self, phi: np.ndarray, coef: Sequence[float]) -> np.ndarray:
        return phi @ np.asarray(coef, dtype=np.float64)

    def second_largest(self, e: np.ndarray) -> np.ndarray:
        return np.partition(e, -2, axis=1)[:, -2]

    def take(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return x[idx]

    def lookup(self, table: np.ndarray, rows: np.ndarray, k: int, cols: np.ndarray) -> np.ndarray:
        return table[rows, k, cols]

    def take_rows(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return x[np.arange(x.shape[0]), idx]

    def put_rows(self, x: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        x[np.arange(x.shape[0]), idx] = values
        return x

    def max_excluding(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        masked = x.copy()
        masked[np.arange(x.shape[0]), idx] = -np.inf
        return masked.max(axis=1)

    def topk_values(self, z: np.ndarray, k: int) -> np.ndarray:
        return _numpy_topk(z, k, canonical=False)[0]

    def topk(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return _numpy_topk(z, k, canonical=True)

    def zeros(self, n: int, like: Any) -> np.ndarray:
        return np.zeros(n)

    def ones(self, n: int, like: Any) -> np.ndarray:
        return np.ones(n)

    def empty_float(self, n: int, like: Any) -> np.ndarray:
        return np.empty(n, dtype=np.float64)

    def empty_int(self, n: int, like: Any) -> np.ndarray:
        return np.empty(n, dtype=np.int64)

    def full_bool(self, n: int, value: bool, like: Any) -> np.ndarray:
        return np.ones(n, dtype=bool) if value else np.zeros(n, dtype=bool)

    def zeros_index(self, n: int, like: Any) -> np.ndarray:
        return np.zeros(n, dtype=np.intp)

    def count_true(self, mask: Any) -> int:
        return int(np.count_nonzero(mask))


def _numpy_topk(z: np.ndarray, k: int, canonical: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by partition then a sort of the k; ``canonical``: also fix which tied ids are kept."""
    n, v = z.shape
    if k < v:
        part = np.argpartition(-z, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(v), (n, v))
    vals = np.take_along_axis(z, part, axis=1)
    if canonical and k < v:
        fixed = _lowest_tied_ids(z, vals, part, k)
        if fixed is not part:
            part, vals = fixed, np.take_along_axis(z, fixed, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # value descending, then id ascending
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)


def _lowest_tied_ids(z: np.ndarray, vals: np.ndarray, part: np.ndarray, k: int) -> np.ndarray:
    """Make the selected ids canonical where the k-th value is tied with unselected entries:
    keep the entries above it and the lowest ids equal to it (argpartition keeps any of them)."""
    kth = vals.min(axis=1)
    over = np.flatnonzero((z >= kth[:, None]).sum(axis=1) > k)
    if over.size == 0:
        return part
    part = part.copy()
    for r in over:
        above = np.flatnonzero(z[r] > kth[r])
        tied = np.flatnonzero(z[r] == kth[r])[: k - above.size]
        part[r] = np.concatenate([above, tied])
    return part


NUMPY = NumpyNamespace()


class ArrayAPINamespace(Namespace):
    """A library implementing the array API standard (2023.12+), through its ``__array_namespace__``."""

    def __init__(self, xp: ModuleType | Any) -> None:
        self.xp = xp
        self.name = getattr(xp, "__name__", type(xp).__name__)
        self._float: dict[Hashable, Any] = {}

    def device_key(self, like: Any) -> Hashable:
        return str(like.device)

    def float_dtype(self, like: Any) -> Any:
        key = self.device_key(like)
        if key not in self._float:
            try:
                self.xp.zeros(1, dtype=self.xp.float64, device=like.device)
                self._float[key] = self.xp.float64
            except (TypeError, ValueError, RuntimeError):  # a device without float64 (Apple MPS)
                self._float[key] = self.xp.float32
        return self._float[key]

    def to_float(self, x: Any) -> Any:
        return self.xp.astype(x, self.float_dtype(x))

    def errstate(self, **kwargs: str) -> Any:
        errstate = getattr(self.xp, "errstate", None)  # numpy-like libraries warn on log(0)
        return nullcontext() if errstate is None else errstate(**kwargs)

    def from_host(self, arr: np.ndarray, like: Any, floating: bool = False) -> Any:
        dtype = self.float_dtype(like) if floating else self.xp.bool if arr.dtype == np.bool_ else self.xp.int64
        return self.xp.asarray(np.ascontiguousarray(arr), dtype=dtype, device=like.device)


class TorchNamespace(ArrayAPINamespace):
    """torch, whose main namespace differs from the standard in a few calls (max, astype, take_along_axis)."""

    def __init__(self, torch: ModuleType) -> None:
        super().__init__(torch)
        self.name = "torch"

    def prepare(self, x: Any) -> Any:
        return x.detach()

    def to_float(self, x: Any) -> Any:
        return x.to(self.float_dtype(x))

    def from_host(self, arr: np.ndarray, like: Any, floating: bool = False) -> Any:
        torch = self.xp
        dtype = self.float_dtype(like) if floating else torch.bool if arr.dtype == np.bool_ else torch.int64
        return torch.as_tensor(np.ascontiguousarray(arr)).to(device=like.device, dtype=dtype)

    def iexp(self, x: Any) -> Any:
        return x.exp_()

    def maximum(self, x: Any, lo: float) -> Any:
        return self.xp.clamp(x, min=lo)

    def sum(self, x: Any, axis: int, keepdims: bool = False) -> Any:
        return self.xp.sum(x, dim=axis, keepdim=keepdims)

    def amax(self, x: Any, axis: int, keepdims: bool = False) -> Any:
        return self.xp.amax(x, dim=axis, keepdim=keepdims)

    def argmax(self, x: Any, axis: int) -> Any:
        return self.xp.argmax(x, dim=axis)  # the first maximal index, like numpy

    def stack(self, arrays: Sequence[Any], axis: int) -> Any:
        return self.xp.stack(list(arrays), dim=axis)

    def second_largest(self, e: Any) -> Any:
        return self.xp.topk(e, 2, dim=1).values[:, 1]

    def take(self, x: Any, idx: Any) -> Any:
        return x[idx]

    def lookup(self, table: Any, rows: Any, k: int, cols: Any) -> Any:
        return table[rows, k, cols]

    def take_rows(self, x: Any, idx: Any) -> Any:
        return x[self.xp.arange(x.shape[0], device=x.device), idx]

    def put_rows(self, x: Any, idx: Any, values: Any) -> Any:
        x[self.xp.arange(x.shape[0], device=x.device), idx] = values
        return x

    def max_excluding(self, x: Any, idx: Any) -> Any:
        masked = x.clone()
        masked[self.xp.arange(x.shape[0], device=x.device), idx] = -math.inf
        return self.xp.amax(masked, dim=1)

    def topk_values(self, z: Any, k: int) -> Any:
        return self.xp.topk(z, k, dim=1, largest=True, sorted=True).values

    def topk(self, z: Any, k: int) -> tuple[Any, Any]:
        torch = self.xp
        vals, ids = torch.topk(z, k, dim=1, largest=True, sorted=True)
        if k < z.shape[1]:
            kth = vals[:, -1:]
            over = (z >= kth).sum(dim=1) > k  # the k-th value is tied with unselected entries
            if bool(over.any()):
                # lowest ids among ties: rank by (value desc, id asc) over the whole row, for those rows only
                rows = torch.nonzero(over).flatten()
                order = torch.argsort(-z[rows], dim=1, stable=True)[:, :k]
                ids[rows] = order
                vals[rows] = torch.gather(z[rows], 1, order)
        order = torch.argsort(ids, dim=1)  # ids ascending, then a stable sort by value descending
        ids, vals = torch.gather(ids, 1, order), torch.gather(vals, 1, order)
        order = torch.argsort(-vals, dim=1, stable=True)
        return torch.gather(vals, 1, order), torch.gather(ids, 1, order)

    def zeros(self, n: int, like: Any) -> Any:
        return self.xp.zeros(n, dtype=like.dtype, device=like.device)

    def full_bool(self, n: int, value: bool, like: Any) -> Any:
        return self.xp.full((n,), bool(value), dtype=self.xp.bool, device=like.device)

    def count_true(self, mask: Any) -> int:
        return int(self.xp.count_nonzero(mask))


_NAMESPACES: dict[int, Namespace] = {}


def namespace(x: Any) -> Namespace:
    """The :class:`Namespace` of an array: numpy for numpy arrays, lists and anything unknown,
    torch for a torch tensor (torch is never imported here), else its ``__array_namespace__()``."""
    if type(x) is np.ndarray or isinstance(x, np.ndarray | list | tuple | np.generic):
        return NUMPY
    torch = sys.modules.get("torch")  # never imported here: loaded if a tensor exists
    if torch is not None and type(x).__module__.startswith("torch") and isinstance(x, torch.Tensor):
        ns = _NAMESPACES.get(id(torch))
        if ns is None:
            ns = _NAMESPACES[id(torch)] = TorchNamespace(torch)
        return ns
    get = getattr(x, "__array_namespace__", None)
    if get is None:
        return NUMPY
    xp = get()
    if xp is np:
        return NUMPY
    ns = _NAMESPACES.get(id(xp))
    if ns is None:
        ns = _NAMESPACES[id(xp)] = ArrayAPINamespace(xp)
    return ns

