"""Argument checks shared by every entry point (one place that says what a valid call is), and the
two numeric conventions every path shares: the accumulation dtype and the exact softplus.

Errors name the caller's argument and what was expected (docs/losses.md, "Edge cases").

Shapes, dtypes, devices and option values are checked on the host, always. Checks that depend on
tensor values (pos_idx in [0, B), one-hot mask rows, finite scores) follow the strict mode:
- strict: the values are read back from the device (a host synchronisation) and a clear
  ValueError is raised;
- not strict: no host read. The flag stays on the device and turns the outputs into NaN
  (`poison`), so a bad call can never return a plausible number, training stays asynchronous
  and the call can be captured in a CUDA graph or traced by torch.compile.
`resolve_strict` says which applies: strict on CPU tensors in eager mode, not strict on CUDA
tensors, under torch.compile and under torch.func.vmap; AMDIM_KERNELS_STRICT=1 makes eager calls
strict on every device.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ESTIMATORS = ("nce", "jsd", "dv")
# The per-row statistic of the negatives each estimator is formed from (docs/design.md): the
# logsumexp for "nce" and "dv", the sum of softplus for "jsd".
NEG_REDUCTION = {"nce": "logsumexp", "jsd": "softplus_sum", "dv": "logsumexp"}
STRICT_ENV = "AMDIM_KERNELS_STRICT"

_F32 = torch.finfo(torch.float32)
# The kernels compute in float32 for every input dtype but float64. tclip scales the scores
# (a / tclip, tclip * tanh(.), (s / tclip)^2): tclip and tclip^2 must be normal float32 numbers.
TCLIP_RANGE = (math.sqrt(_F32.tiny), math.sqrt(_F32.max))          # about [1.1e-19, 1.8e19]
# The mixture epilogue forms tau * nce, 1 / tau, alpha * H(q) and tau * (1 - alpha * tau) in
# float32: these bounds keep them finite (|tau * (1 - alpha * tau)| <= 1e18). For nce gaps of
# order 1, q is already within 1e-6 of uniform at tau = 1e-6 and one-hot at tau = 1e6.
TAU_RANGE = (1e-6, 1e6)
ALPHA_MAX = 1e6


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype: fp32, or fp64 for fp64 inputs (so gradcheck is meaningful)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), exact for every x (F.softplus returns x itself for x > 20)."""
    return torch.logaddexp(x, x.new_zeros(()))


def autocast_disabled(device: torch.device):
    """The losses accumulate in fp32 whatever autocast is active around them (docs/losses.md)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- strict mode

def _tracing() -> bool:
    return torch.compiler.is_compiling()


JIT_TRACE_UNSUPPORTED = (
    "the amdim_kernels losses cannot be traced with torch.jit.trace: a trace records one call's "
    "Python decisions as constants, so it would drop the value checks (an invalid pos_idx or a NaN "
    "input would give a finite loss) and keep this call's sizes in the DV estimator. Use "
    "torch.compile or torch.export, which keep both (invalid values give NaN), or call the loss "
    "outside the traced function.")


def _in_vmap() -> bool:
    """Under torch.func.vmap a value cannot be read back (data-dependent control flow)."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def resolve_strict(strict: Optional[bool], like) -> bool:
    """Whether value checks read back and raise (True) or poison the outputs (False).

    strict=None: AMDIM_KERNELS_STRICT=1 makes it True; otherwise True for CPU tensors only.
    Under torch.compile and vmap it is always False: nothing can be read back there.
    Every public loss calls this first, so that torch.jit.trace of any of them raises here.
    """
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(f"strict must be True, False or None, got {strict!r}")
    if torch.jit.is_tracing():
        raise RuntimeError(JIT_TRACE_UNSUPPORTED)
    if _tracing():
        return False
    if strict is None:
        env = os.environ.get(STRICT_ENV, "")
        if env not in ("", "0", "1"):
            raise ValueError(f"the environment variable {STRICT_ENV} must be 1 (strict checks on "
                             f"every device), 0 or unset, got {env!r}")
        device = like.device.type if isinstance(like, torch.Tensor) else "cpu"
        strict = env == "1" or device == "cpu"
    return strict and not _in_vmap()


def range_flag(pos_idx: torch.Tensor, b: int) -> torch.Tensor:
    """0-dim bool on the device: some pos_idx outside [0, B)."""
    return ((pos_idx < 0) | (pos_idx >= b)).any()


def score_flag(sumsq: torch.Tensor, src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
    """0-dim bool on the device: some score a = <src_i, trg_m> / sqrt(D) is not finite.

    sum(a^2) is finite iff every score is, except that the squares of finite scores above
    sqrt(FLT_MAX) overflow too. Those cannot be told apart from sumsq alone, so an Inf sumsq
    counts only when the scores can overflow at all: |a| <= sqrt(D) * max|src| * max|trg|. NaN or
    Inf inputs make that bound NaN or Inf, so they are always flagged.
    """
    acc = sumsq.dtype
    bound = math.sqrt(src.shape[-1]) * _max_abs(src).to(acc) * _max_abs(trg).to(acc)
    can_overflow = ~(bound < torch.finfo(acc).max)
    return ~torch.isfinite(sumsq) & can_overflow


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    # no |x| temporary; NaN propagates. (vector_norm(x, inf) was ~70x slower on the CPU.)
    return torch.maximum(x.amax(), -x.amin())


def check_scores(sumsq: torch.Tensor, strict: bool, **inputs: torch.Tensor) -> Optional[torch.Tensor]:
    """The finiteness check of a fused call from its sumsq; `inputs` are (src, trg) by the
    caller's names. Not strict: return score_flag. Strict: read isfinite(sumsq) back (and the
    overflow bound only when it is not finite), raise naming the input at fault, return None."""
    src, trg = inputs.values()
    if not strict:
        return score_flag(sumsq, src, trg)
    if not bool(torch.isfinite(sumsq)) and bool(score_flag(sumsq, src, trg)):
        raise_non_finite(**inputs)
    return None


def poison(outputs: tuple, bad: Optional[torch.Tensor]) -> tuple:
    """The outputs, NaN where `bad` (a 0-dim bool on their device; None: nothing to flag)
    holds: no host read."""
    if bad is None:
        return outputs
    return tuple(torch.where(bad, math.nan, x) for x in outputs)


def raise_non_finite(**tensors: torch.Tensor) -> None:
    """Called when the scores are not finite: name the input that caused it."""
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    a, b = tensors.keys()
    raise ValueError(f"the scores <{a}, {b}> / sqrt(D) overflow to Inf: {a} and {b} are finite "
                     f"but too large in magnitude")


def regulariser(mean_sq: torch.Tensor, reg_weight: float) -> torch.Tensor:
    """reg_weight * mean(a^2). With reg_weight = 0 it is 0 even where finite scores' squares
    overflow to Inf (0 * Inf would be NaN); NaN stays NaN."""
    if reg_weight == 0:
        return mean_sq.clamp(max=torch.finfo(mean_sq.dtype).max) * 0.0
    return mean_sq * reg_weight


# ------------------------------------------------------------------------------- argument checks

def check_strided(x: torch.Tensor, name: str) -> None:
    """The kernels and the reference read plain dense memory: sparse, MKLDNN and nested tensors
    would fail deep inside them."""
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor: pass one "
                        f"padded tensor, or one call per nested component")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: convert "
                        f"it with .to_dense()")


def check_tensor(x, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    check_strided(x, name)
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(tclip, reg_weight) -> None:
    if tclip is not None:
        if not _is_real(tclip):
            raise TypeError(f"tclip must be a positive float or None, got {tclip!r}")
        lo, hi = TCLIP_RANGE
        if not tclip > 0:
            raise ValueError(f"tclip must be a positive finite float or None, got {tclip!r}")
        if not lo <= tclip <= hi:
            raise ValueError(f"tclip must be None or in [{lo:.2g}, {hi:.2g}] (tclip and tclip^2 must be "
                             f"normal float32 numbers), got {tclip!r}")
    if not _is_real(reg_weight):
        raise TypeError(f"reg_weight must be a float >= 0, got {reg_weight!r}")
    if not 0 <= reg_weight <= _F32.max:
        raise ValueError(f"reg_weight must be a finite float >= 0, at most {_F32.max:.3g} (float32), "
                         f"got {reg_weight!r}")


def check_estimator(estimator, b: int) -> None:
    """estimator names one of the DIM losses; "dv" needs negative pairs (B >= 2)."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "dv" and b == 1:
        # log of the mean of exp over an empty set: the DV bound is undefined without negatives.
        raise ValueError("estimator='dv' needs negative pairs, i.e. B >= 2 target samples, got B=1")


def check_nce_inputs(src, trg, pos_idx, tclip, reg_weight, *, strict: bool, src_name: str = "src",
                     trg_name: str = "trg") -> torch.Tensor:
    """Validate the arguments of the NCE loss; return pos_idx as a contiguous int64 tensor on src's
    device.

    The pos_idx range is read back only when strict; otherwise the caller flags it on the device
    (`range_flag`). The fused kernels never index memory with pos_idx (they compare it with
    column samples), so an out-of-range value is safe to compute with, then poisoned.
    """
    s, t = src_name, trg_name
    check_tensor(src, s, 2, "(N, D)")
    check_tensor(trg, t, 3, "(B, L, D)")
    if src.dtype != trg.dtype:
        raise TypeError(f"{s} and {t} must have the same dtype, got {s} {src.dtype} and {t} {trg.dtype}")
    if src.device != trg.device:
        raise ValueError(f"{s} and {t} must be on the same device, got {s} on {src.device} "
                         f"and {t} on {trg.device}")
    n, d = src.shape
    b, l, d_trg = trg.shape
    if d != d_trg:
        raise ValueError(f"{s} and {t} must have the same feature size D, got {s} (N={n}, D={d}) "
                         f"and {t} (B={b}, L={l}, D={d_trg})")
    if n == 0 or b == 0 or l == 0 or d == 0:
        raise ValueError(f"{s} and {t} must be non-empty, got {s} {tuple(src.shape)} "
                         f"and {t} {tuple(trg.shape)}")
    check_options(tclip, reg_weight)
    if pos_idx is None:
        if n != b:
            raise ValueError(f"pos_idx=None means row i's positives are sample i, which needs N == B; "
                             f"got N={n} and B={b}: pass pos_idx")
        return default_pos_idx(n, src.device)
    if not isinstance(pos_idx, torch.Tensor):
        raise TypeError(f"pos_idx must be an integer tensor of shape (N,) or None, "
                        f"got {type(pos_idx).__name__}")
    check_strided(pos_idx, "pos_idx")
    if pos_idx.dtype.is_floating_point or pos_idx.dtype.is_complex or pos_idx.dtype == torch.bool:
        raise TypeError(f"pos_idx must be an integer tensor (e.g. int64, int32 or uint8), "
                        f"got {pos_idx.dtype}")
    if pos_idx.shape != (n,):
        raise ValueError(f"pos_idx must have shape (N,) = ({n},), got {tuple(pos_idx.shape)}")
    if pos_idx.device != src.device:
        raise ValueError(f"pos_idx must be on the same device as {s} ({src.device}), "
                         f"got {pos_idx.device}")
    # Every integer dtype is accepted; the kernels take contiguous int64. Converted first: torch
    # has no min/max or comparisons for uint16/32/64. uint64 values of 2**63 or more become negative.
    as_int64 = pos_idx.long().contiguous()
    if strict:
        lo, hi = int(as_int64.min()), int(as_int64.max())
        if lo < 0 and pos_idx.dtype == torch.uint64:
            raise ValueError(f"pos_idx values must lie in [0, B) = [0, {b}), got uint64 values of "
                             f"2**63 or more")
        if lo < 0 or hi >= b:
            raise ValueError(f"pos_idx values must lie in [0, B) = [0, {b}), got values in [{lo}, {hi}]")
    return as_int64


# pos_idx=None is arange(N): on a GPU a launch (and ~5 us of host time) per call, in a forward of
# two or three launches at AMDIM's per-GPU sizes. Cached per (N, device, stream), never freed (a
# CUDA graph captured with a cached tensor keeps reading it; per stream, because a call on another
# stream could read it before the kernel that wrote it has run), within a budget of elements
# beyond which calls make their own (a loop over ever new N).
_ARANGE: dict = {}
ARANGE_BUDGET = 1 << 20   # int64 elements in all (8 MiB)


def default_pos_idx(n: int, device: torch.device) -> torch.Tensor:
    """arange(n) on `device`: from the cache in eager calls on CPU or CUDA tensors; made afresh
    where a cached tensor would be wrong: under torch.compile / export (traced into the graph),
    during CUDA-graph capture (its kernel would not run before replay) and under FakeTensorMode
    (its tensors must not outlive it)."""
    kind = device.type
    if _tracing() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return torch.arange(n, device=device)
    if kind == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.arange(n, device=device)
        key = (n, device, torch._C._cuda_getCurrentRawStream(device.index))
    elif kind == "cpu":
        key = (n, device, None)
    else:
        return torch.arange(n, device=device)
    cached = _ARANGE.get(key)
    if cached is None:
        with torch.inference_mode(False), torch.no_grad():   # usable by every later call
            cached = torch.arange(n, device=device)
        if n + sum(t.numel() for t in _ARANGE.values()) <= ARANGE_BUDGET:
            _ARANGE[key] = cached
    return cached


def check_mixture_inputs(src_mix, trg, pos_idx, tau, alpha, detach_q, tclip, reg_weight, *,
                         strict: bool) -> tuple[torch.Tensor, float]:
    """Validate the arguments of the mixture NCE loss; return (pos_idx as int64, alpha as a float)."""
    check_tensor(src_mix, "src_mix", 3, "(N, k, D)")
    check_tensor(trg, "trg", 3, "(B, L, D)")
    n, k, d = src_mix.shape
    if k == 0:
        raise ValueError(f"src_mix must have k >= 1 mixture components, got shape {tuple(src_mix.shape)}")
    if src_mix.dtype != trg.dtype:
        raise TypeError(f"src_mix and trg must have the same dtype, got src_mix {src_mix.dtype} "
                        f"and trg {trg.dtype}")
    if src_mix.device != trg.device:
        raise ValueError(f"src_mix and trg must be on the same device, got src_mix on "
                         f"{src_mix.device} and trg on {trg.device}")
    if d != trg.shape[2]:
        raise ValueError(f"src_mix and trg must have the same feature size D, got src_mix "
                         f"(N={n}, k={k}, D={d}) and trg {tuple(trg.shape)}")
    if n == 0 or d == 0 or trg.shape[0] == 0 or trg.shape[1] == 0:
        # here, not in check_nce_inputs below, which sees src_mix[:, 0] and would print its shape
        raise ValueError(f"src_mix and trg must be non-empty, got src_mix {tuple(src_mix.shape)} "
                         f"and trg {tuple(trg.shape)}")
    if not _is_real(tau):
        raise TypeError(f"tau must be a float, got {tau!r}")
    if alpha is not None and not _is_real(alpha):
        raise TypeError(f"alpha must be a float or None, got {alpha!r}")
    lo, hi = TAU_RANGE
    if not lo <= tau <= hi:
        raise ValueError(f"tau must be a float in [{lo:g}, {hi:g}] (the mixture epilogue computes "
                         f"tau * nce and 1 / tau in float32), got {tau!r}")
    alpha = 1.0 / tau if alpha is None else alpha
    if not 0 <= alpha <= ALPHA_MAX:
        raise ValueError(f"alpha must be a float in [0, {ALPHA_MAX:g}] or None (1 / tau), got {alpha!r}")
    if not isinstance(detach_q, bool):
        raise TypeError(f"detach_q must be a bool, got {detach_q!r}")
    # src_mix[:, 0] has the shape of an NCE source; what is left to check names src_mix
    pos_idx = check_nce_inputs(src_mix[:, 0], trg, pos_idx, tclip, reg_weight, strict=strict,
                               src_name="src_mix")
    return pos_idx, float(alpha)
