"""SMART: adversarial smoothness regularisation and momentum Bregman proximal point (MBPP).

Jiang et al., ACL 2020: F(θ) = L(θ) + λ_s R_s(θ) + μ D_Breg(θ, θ̃), with
R_s(θ) = 1/n Σ_i max_{‖δ_i‖ ≤ ε} ℓ_s(f(x_i + δ_i; θ), f(x_i; θ)) (the inner max by K projected
ascent steps from δ₀ ~ N(0, σ²I)), D_Breg = 1/n Σ_i ℓ_s(f(x_i; θ), f(x_i; θ̃)) and the teacher
θ̃ ← (1 − β) θ + β θ̃ after every optimizer step. ℓ_s is the symmetric KL (classification; the
Bernoulli one for a binary logit) or the squared error (regression). ``noise="r3f"`` is R3F's one
noisy pass instead of the ascent; ``layer=k`` perturbs the input of encoder layer k.

Registered as the regularizer ``"smart"`` (see :mod:`minbert.regularizers`); the trainer builds
one per task from ``TrainConfig.smart_for(task)``. The derivation, the update rules, dropout in the
extra passes, the teacher's sharing and sharding, non-finite handling and every option with its
default are in docs/smart.md.
"""
from __future__ import annotations

import contextlib
import math
import types
import warnings
import zlib
from typing import Any, Dict, List, Optional

import torch

from .ema import ParameterEMA  # MBPP's teacher θ̃ is a moving average of the parameters
from .regularizers import Regularizer, register
from .tasks import BINARY, PROBLEM_TYPES, REGRESSION, SINGLE_LABEL
from .train_config import ConfigError

NORMS = ("inf", "l2")
RULES = ("projection", "mtdnn")
NORM_LEVELS = ("token", "sequence")
DROPOUTS = ("eval", "shared")
NOISES = ("adversarial", "r3f")
DISTRIBUTIONS = ("normal", "uniform")

_MASK64 = (1 << 64) - 1


def _kernels():
    """The SMART kernel functions, looked up in their modules at call time (tests may patch them)."""
    import minbert.kernels.smart_noise as noise
    import minbert.kernels.smart_perturb as perturb
    import minbert.kernels.symmetric_kl as skl

    return types.SimpleNamespace(smart_noise=noise.smart_noise, smart_perturb_step=perturb.smart_perturb_step,
                                 symmetric_kl=skl.symmetric_kl,
                                 binary_to_two_class_logits=skl.binary_to_two_class_logits)


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash of ``x`` (SplitMix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# --- RNG state (shared dropout) ------------------------------------------------------------------

def _get_rng(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _RngTap:
    """A forward pre-hook on one encoder layer: records the RNG state each time the trainer's clean
    pass enters it (once per sentence), then replays those states in the perturbed passes."""

    def __init__(self, module: torch.nn.Module, device: torch.device, sentences: int):
        self.device = device
        self.sentences = sentences
        self.states: List[Any] = []
        self.mode = "record"
        self.index = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.mode == "record":
            self.states.append(_get_rng(self.device))
            if len(self.states) == self.sentences:
                self.mode = "off"
        elif self.mode == "replay":
            if self.index >= len(self.states):
                raise RuntimeError(
                    f"smart (dropout='shared'): the perturbed pass entered the perturbed layer {self.index + 1} "
                    f"times but the clean pass only {len(self.states)}")
            _set_rng(self.states[self.index], self.device)
            self.index += 1

    def replay(self) -> None:
        self.mode, self.index = "replay", 0

    def off(self) -> None:
        self.mode = "off"

    def remove(self) -> None:
        self.handle.remove()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Every module in eval mode (no dropout); each module's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# --- option validation ---------------------------------------------------------------------------

def _number(where, name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: option '{name}' must be a finite number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{where}: option '{name}' must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: option '{name}' must be <= {hi:g}, got {value!r}")
    return value


def _integer(where, name, value, lo):
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{where}: option '{name}' must be an integer >= {lo}, got {value!r}")
    return value


def _choice(where, name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{where}: option '{name}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


# --- the regularizer -----------------------------------------------------------------------------

@register("smart")
class SMART(Regularizer):
    """SMART's smoothness term λ_s·R_s and MBPP's Bregman term μ·D_Breg for one task (see the
    module docstring for the equations and every option).

    Returns ``{"smart": λ_s R_s, "bregman": μ D_Breg}`` from :meth:`__call__`, leaving out a term
    whose weight is 0 (with ``lambda_s = mu = 0`` it does nothing at all).
    """

    name = "smart"
    OPTIONS = ("lambda_s", "mu", "steps", "sigma", "step_size", "epsilon", "norm", "rule", "norm_level",
               "dropout", "beta", "layer", "noise", "r3f_distribution")

    def __init__(self, task: Optional[str] = None, kind: str = SINGLE_LABEL, lambda_s: float = 1.0,
                 mu: float = 1.0, steps: int = 1, sigma: float = 1e-5, step_size: float = 1e-3,
                 epsilon: float = 1e-5, norm: str = "inf", rule: str = "projection", norm_level: str = "token",
                 dropout: str = "eval", beta: float = 0.99, layer: int = 0, noise: str = "adversarial",
                 r3f_distribution: str = "normal", **unknown):
        where = f"smart (task {task})" if task else "smart"
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigError(f"{where}: unknown option '{bad}'; expected one of {', '.join(self.OPTIONS)} (or enabled)")
        self.where = where
        self.task = task
        self.kind = _choice(where, "kind", kind, PROBLEM_TYPES)
        self.lambda_s = _number(where, "lambda_s", lambda_s, lo=0.0)
        self.mu = _number(where, "mu", mu, lo=0.0)
        self.steps = _integer(where, "steps", steps, 0)
        self.sigma = _number(where, "sigma", sigma, lo=0.0)
        self.step_size = _number(where, "step_size", step_size, lo=0.0)
        self.epsilon = _number(where, "epsilon", epsilon, lo=0.0)
        self.norm = _choice(where, "norm", norm, NORMS)
        self.rule = _choice(where, "rule", rule, RULES)
        self.norm_level = _choice(where, "norm_level", norm_level, NORM_LEVELS)
        self.dropout = _choice(where, "dropout", dropout, DROPOUTS)
        self.beta = _number(where, "beta", beta, lo=0.0, hi=1.0)
        self.layer = _integer(where, "layer", layer, 0)
        self.noise = _choice(where, "noise", noise, NOISES)
        self.r3f_distribution = _choice(where, "r3f_distribution", r3f_distribution, DISTRIBUTIONS)
        self.active = self.lambda_s > 0 or self.mu > 0
        # seeds of δ₀: the run's seed (set by the trainer before building regularizers), the task, a counter
        self.base_seed = _splitmix64((torch.initial_seed() & _MASK64) ^ zlib.crc32((task or "").encode()))
        self.calls = 0
        self.skipped = 0
        self.bregman_skipped = 0
        self.last_rs: Optional[float] = None
        self.momentum_teacher: Optional[ParameterEMA] = ParameterEMA(self.beta, where) if self.mu > 0 else None
        self.owns_teacher = True  # False once bind() hands this task another task's teacher
        self._pending: Optional[Dict[str, Any]] = None
        self._precision_warned = False

    # --- hooks around the trainer's clean forward ------------------------------------------------
    def before_forward(self, model, batch) -> None:
        """Ask the model to keep the input of the perturbed layer, and (``dropout="shared"``) record
        the RNG states the clean pass starts from."""
        self._clear(model)
        if not self.active:
            return
        num_layers = model.bert.config.num_hidden_layers
        if self.layer >= num_layers:
            raise ConfigError(f"{self.where}: option 'layer' must be in [0, {num_layers - 1}] for this "
                              f"{num_layers}-layer encoder, got {self.layer}")
        device = batch.input_ids.device
        self._check_precision(device)
        pending: Dict[str, Any] = {"device": device, "captured": None, "tap": None}
        if self.dropout == "shared":
            pending["rng_start"] = _get_rng(device)
            if self.lambda_s > 0:
                sentences = len(model.masks(batch))  # 1, 2 (bi-encoded pair) or 3 (hybrid)
                pending["tap"] = _RngTap(model.bert.encoder.layer[self.layer], device, sentences)
        if self.lambda_s > 0:
            model.capture_layer = self.layer

            def after_clean_forward(module, args, output):
                # the clean pass is done: keep what it captured before anything else runs the model
                pending["captured"] = module.captured
                module.captured = None
                module.capture_layer = None
                if pending["tap"] is not None:
                    pending["tap"].off()
                pending["post"].remove()

            pending["post"] = model.register_forward_hook(after_clean_forward)
        self._pending = pending

    def perturbation_scale(self) -> float:
        """The largest |δ| entry the perturbed pass sees (ε for ``projection``, 1 for ``mtdnn``, σ-ish for R3F)."""
        if self.noise == "r3f" or self.steps == 0:
            return self.sigma
        return self.epsilon if self.rule == "projection" else 1.0

    def _check_precision(self, device: torch.device) -> None:
        """Warn once when autocast runs the perturbed layer in a precision that cannot represent δ.

        bf16 keeps 8 significant bits: x + δ rounds back to x for |δ| below ~2⁻⁸·|x|, and the encoder
        inputs are O(1) (LayerNorm outputs). The default ε = 1e-5 is then lost in the first matmul, and
        R_s measures only what else differs between the passes (dropout with ``dropout="eval"``). With
        ``rule="mtdnn"`` (|δ| ≈ 1) the perturbation survives."""
        from minbert.kernels._dispatch import autocast_dtype

        dtype = autocast_dtype(device.type)
        if self._precision_warned or self.lambda_s == 0 or dtype is None:
            return
        resolution = torch.finfo(dtype).eps / 2  # relative rounding step: bf16 2^-8, fp16 2^-11
        if self.perturbation_scale() < resolution:
            warnings.warn(f"{self.where}: the perturbation (|δ| ≤ {self.perturbation_scale():g}) is below {dtype}'s "
                          f"resolution ({resolution:g} of |x|) under autocast, so x + δ rounds to x in the perturbed "
                          f"pass; R_s then measures only the other differences between the passes (dropout). Use "
                          f"autocast: null for the paper's SMART, or rule: mtdnn for a perturbation that survives",
                          stacklevel=2)
        self._precision_warned = True

    def _clear(self, model) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.get("tap") is not None:
            pending["tap"].remove()
        if pending.get("post") is not None:
            pending["post"].remove()
            if model.capture_layer == self.layer:
                model.capture_layer = None
                model.captured = None

    # --- the terms -----------------------------------------------------------------------------
    def __call__(self, model, batch, output: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.active:
            return {}
        pending = self._pending
        if pending is None:
            raise RuntimeError(f"{self.where}: before_forward(model, batch) must be called before the forward "
                               "pass whose output is passed to the regularizer")
        device = pending["device"]
        entry_rng = _get_rng(device)
        terms: Dict[str, torch.Tensor] = {}
        try:
            self.calls += 1
            if self.lambda_s > 0:
                captured = pending["captured"]
                if captured is None:
                    raise RuntimeError(f"{self.where}: the model's forward after before_forward() did not run "
                                       "(no captured encoder inputs)")
                rs = self.smoothness(model, batch, output, captured, pending)
                terms["smart"] = self.lambda_s * rs
            if self.mu > 0:
                terms["bregman"] = self.mu * self.bregman(model, batch, output, pending)
        finally:
            self._clear(model)
            if self.dropout == "shared":
                _set_rng(entry_rng, device)  # SMART consumes none of the run's randomness
        return terms

    def divergence(self, p: torch.Tensor, q: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
        """ℓ_s(p, q) for this task's kind; ``reduction`` is ``"batchmean"`` or ``"sum"`` over examples."""
        K = _kernels()
        want = 2 if self.kind == SINGLE_LABEL else 1
        if p.dim() != want or p.shape != q.shape:
            raise ValueError(f"{self.where}: a {self.kind} output must have shape "
                             f"{'(B, C)' if want == 2 else '(B,)'}, got {tuple(p.shape)} and {tuple(q.shape)}")
        if self.kind == REGRESSION:
            sq = (p - q).pow(2)
            return sq.sum() if reduction == "sum" else sq.mean()
        if self.kind == BINARY:
            p, q = K.binary_to_two_class_logits(p), K.binary_to_two_class_logits(q)
        return K.symmetric_kl(p, q, reduction=reduction)

    def _seed(self, index: int) -> int:
        return _splitmix64(self.base_seed ^ _splitmix64((self.calls << 8) | index)) & ((1 << 63) - 1)

    def draw_noise(self, like: torch.Tensor, mask: torch.Tensor, seed: int, distribution: str) -> torch.Tensor:
        """σ-scaled noise of ``like``'s shape, zero on padded tokens (see the module docstring)."""
        from minbert.kernels._dispatch import use_triton

        K = _kernels()
        if use_triton(like, op="smart_noise"):
            return K.smart_noise(tuple(like.shape), self.sigma, seed, token_mask=mask, distribution=distribution,
                                 device=like.device, dtype=like.dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if distribution == "normal":
            z = torch.randn(like.shape, generator=gen, dtype=torch.float32)
        else:
            z = torch.rand(like.shape, generator=gen, dtype=torch.float32).mul_(2.0).sub_(1.0)
        z = z.mul_(self.sigma).to(device=like.device, dtype=like.dtype)
        return z.masked_fill_(~(mask != 0)[..., None], 0.0)

    def _skip(self, output: torch.Tensor) -> torch.Tensor:
        return output.new_zeros(())

    @contextlib.contextmanager
    def _perturbed_pass(self, model, pending):
        """Dropout for one perturbed pass: all off (``eval``), or the clean pass's masks replayed (``shared``)."""
        if self.dropout == "eval":
            with _eval_mode(model):
                yield
            return
        tap = pending.get("tap")
        if tap is not None:
            tap.replay()
        try:
            yield
        finally:
            if tap is not None:
                tap.off()

    def smoothness(self, model, batch, output, captured: List[torch.Tensor], pending) -> torch.Tensor:
        """R_s (unweighted): K ascent steps on δ, then ℓ_s(f(x + δ_K), f(x)) differentiable in θ."""
        K = _kernels()
        masks = model.masks(batch)
        if len(captured) != len(masks):
            raise RuntimeError(f"{self.where}: captured {len(captured)} encoder inputs for {len(masks)} sentences")
        k = self.layer
        distribution = "normal" if self.noise == "adversarial" else self.r3f_distribution
        deltas = [self.draw_noise(x, m, self._seed(i), distribution) for i, (x, m) in enumerate(zip(captured, masks))]
        if self.noise == "adversarial" and self.steps > 0:
            clean = output.detach()
            fixed = [x.detach() for x in captured]
            for _ in range(self.steps):
                leaves = [d.requires_grad_(True) for d in deltas]
                with torch.enable_grad(), self._perturbed_pass(model, pending):
                    adv = model(batch, inputs=[x + d for x, d in zip(fixed, leaves)], start_layer=k)
                    loss = self.divergence(adv, clean, reduction="sum")
                grads = torch.autograd.grad(loss, leaves)  # δ only: no parameter gradient is formed
                finite = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads]).all()
                if not bool(finite):
                    self.skipped += 1
                    return self._skip(output)
                deltas = [K.smart_perturb_step(d.detach(), g, self.step_size, self.epsilon, norm=self.norm,
                                               rule=self.rule, token_mask=m, norm_level=self.norm_level)
                          for d, g, m in zip(deltas, grads, masks)]
        with torch.enable_grad(), self._perturbed_pass(model, pending):
            adv = model(batch, inputs=[x + d for x, d in zip(captured, deltas)], start_layer=k)
        rs = self.divergence(adv, output, reduction="batchmean")
        if not bool(torch.isfinite(rs)):
            self.skipped += 1
            return self._skip(output)
        self.last_rs = float(rs.detach())
        return rs

    # --- MBPP -----------------------------------------------------------------------------------
    def bind(self, regularizers) -> None:
        """Share one :class:`ParameterEMA` among all tasks' SMART regularizers with the same β: the
        first of them owns it (updates and saves it), the others use it."""
        if self.momentum_teacher is None:
            return
        group = [r for r in regularizers if isinstance(r, SMART) and r.momentum_teacher is not None
                 and r.beta == self.beta]
        owner = group[0] if group else self
        self.momentum_teacher = owner.momentum_teacher
        self.owns_teacher = owner is self

    @property
    def teacher(self) -> Optional[Dict[str, torch.Tensor]]:
        """θ̃ as ``{name: tensor}`` (None before the first MBPP call); all-gathered when sharded."""
        mt = self.momentum_teacher
        return mt.tensors() if mt is not None and mt.ready else None

    def bregman(self, model, batch, output, pending) -> torch.Tensor:
        """D_Breg (unweighted): ℓ_s(f(x; θ), f(x; θ̃)) with the teacher's output under no_grad."""
        self.momentum_teacher.ensure(model)
        device = pending["device"]
        with torch.no_grad():
            if self.dropout == "eval":
                ctx = _eval_mode(model)
            else:
                _set_rng(pending["rng_start"], device)  # the clean pass's masks, from its first draw
                ctx = contextlib.nullcontext()
            with ctx:
                target = torch.func.functional_call(model, self.momentum_teacher.tensors(), (batch,))
        d = self.divergence(output, target, reduction="batchmean")
        if not bool(torch.isfinite(d)):
            self.bregman_skipped += 1
            return self._skip(output)
        return d

    def after_step(self, model) -> None:
        """θ̃ ← (1 − β) θ + β θ̃ for the trainable parameters (once the teacher exists; by its owner only)."""
        if self.momentum_teacher is not None and self.owns_teacher:
            self.momentum_teacher.update(model)

    # --- logging and resume -----------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """``task``, ``smart_calls``, ``smart_skipped`` (R_s skipped: non-finite), ``bregman_skipped``
        (with MBPP) and ``smart_rs`` (the last unweighted R_s); empty until the first call."""
        if not self.active or self.calls == 0:
            return {}
        out: Dict[str, Any] = {"task": self.task, "smart_calls": self.calls, "smart_skipped": self.skipped}
        if self.mu > 0:
            out["bregman_skipped"] = self.bregman_skipped
        if self.lambda_s > 0 and self.last_rs is not None:
            out["smart_rs"] = self.last_rs
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"calls": self.calls, "skipped": self.skipped, "bregman_skipped": self.bregman_skipped,
                "base_seed": self.base_seed, "last_rs": self.last_rs,
                "teacher": (self.momentum_teacher.state_dict() if self.momentum_teacher is not None
                            and self.owns_teacher else None)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        self.skipped = int(state.get("skipped", 0))
        self.bregman_skipped = int(state.get("bregman_skipped", 0))
        self.base_seed = int(state.get("base_seed", self.base_seed))
        self.last_rs = state.get("last_rs")
        if self.momentum_teacher is not None and self.owns_teacher:
            self.momentum_teacher.load_state_dict(state.get("teacher"))
