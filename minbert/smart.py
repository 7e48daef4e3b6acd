r"""SMART: adversarial smoothness regularisation and momentum Bregman proximal point (MBPP).

Registered as the regularizer ``"smart"`` (see :mod:`minbert.regularizers`); the trainer builds
one per task from the config's global ``smart:`` block merged with ``tasks.<name>.smart``.

The objective (Jiang et al., *SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
Language Models through Principled Regularized Optimization*, ACL 2020)
-------------------------------------------------------------------------------------------

.. math::

    F(θ) = L(θ) + λ_s R_s(θ) + μ D_{Breg}(θ, \tilde θ)

    L(θ) = \frac1n \sum_i ℓ(f(x_i; θ), y_i)                                    (the task loss)

    R_s(θ) = \frac1n \sum_i \max_{‖δ_i‖ ≤ ε} ℓ_s\big(f(x_i + δ_i; θ),\ f(x_i; θ)\big)

    D_{Breg}(θ, \tilde θ) = \frac1n \sum_i ℓ_s\big(f(x_i; θ),\ f(x_i; \tilde θ)\big)

    \tilde θ ← (1 - β)\, θ + β\, \tilde θ        (after every optimizer step; the "momentum" teacher)

``x_i`` is the encoder input of sentence i (the embedding-layer output, or with ``layer=k`` the
input of encoder layer k) exactly as the trainer's clean pass computed it -- after that pass's
embedding dropout (and, for k > 0, its dropout in the layers below k) -- and δ_i a perturbation
of it. ℓ_s is

* classification: the symmetric KL between the softmax distributions,
  ℓ_s(P, Q) = KL(P‖Q) + KL(Q‖P) (:func:`minbert.kernels.symmetric_kl.symmetric_kl`, stable when a probability
  underflows);
* binary (Quora, one logit z): the same on the two-class logits [0, z]
  (:func:`minbert.kernels.symmetric_kl.binary_to_two_class_logits`), i.e. the Bernoulli symmetric KL;
* regression (STS): the squared error ℓ_s(p, q) = (p - q)².

The inner max (paper, Algorithm 1) is approximated by K ascent steps from δ₀ ~ N(0, σ²I):

.. math::

    g_k = ∇_δ\, ℓ_s\big(f(x + δ_k; θ),\ \mathrm{sg}[f(x; θ)]\big)

    δ_{k+1} = \mathrm{update}(δ_k, g_k)        (the ``rule`` below, :func:`minbert.kernels.smart_perturb.smart_perturb_step`)

and then R_s is evaluated at δ_K **with gradients to θ through both arguments** of ℓ_s (the
perturbed output and the clean output, as the paper's R_s(θ) is written; δ_K itself is a
constant). This costs nothing extra: the trainer's single backward already runs through the clean
graph for the task loss. (Some public implementations stop the gradient through part of ℓ_s.)

Update rules (``rule``; ‖·‖ is ``norm`` = ∞ or 2, per token or per sequence by ``norm_level``)

* ``"projection"`` -- the paper's projected normalised ascent,
  δ ← Π_{‖δ‖ ≤ ε}(δ + η g / ‖g‖): every step has length η and δ stays in the ε-ball
  (for the ∞-norm the projection is the element-wise clamp to [-ε, ε]). As ε → 0, δ → 0 and
  R_s → 0 (exactly 0 at ε = 0 with ``dropout="shared"``, or without dropout).
* ``"mtdnn"`` -- mt-dnn's ``perturbation.py`` rule: δ ← (δ + η g) / (‖δ + η g‖ + ε). g is not
  normalised, ε only guards the division and there is no ε-ball: δ comes out with unit norm per
  token (∞-norm: every real token's largest |entry| ≈ 1) and is used as is, like mt-dnn does. It is
  a much larger perturbation than ``projection``'s ε = 1e-5.

The ascent loss sums ℓ_s over the batch (``reduction="sum"``), so g_i is the gradient of example
i's own ℓ_s whatever the batch size (it matters for ``mtdnn``, where η weighs g against δ);
R_s and D_Breg average over the batch (``"batchmean"``). Padded tokens are never perturbed: δ₀
and every update are zero there.

Dropout in the extra passes (``dropout``)

* ``"eval"`` (default): the extra passes (ascent, adversarial, teacher) run with dropout off
  (every module temporarily in eval mode, each module's mode restored after). It is the cheaper
  choice (no random masks to draw in three extra forwards; on the CPU benchmark a no-grad forward
  without dropout costs ~2/3 of one with dropout). R_s and D_Breg are
  measured against the trainer's clean output, which had dropout, so they also penalise the gap
  between the dropout and the no-dropout network (R_s > 0 at δ = 0, D_Breg > 0 at θ = θ̃) -- like
  mt-dnn, whose adversarial passes draw fresh masks.
* ``"shared"``: the perturbed passes (and the teacher's pass) use the same dropout masks as the
  trainer's clean pass, so R_s is a pure smoothness term (R_s = 0 at δ = 0) and D_Breg = 0 at
  θ = θ̃. The torch RNG state (CPU, and the batch's CUDA device) is recorded when the clean pass
  enters the perturbed layer (once per sentence; at the start of the forward for the teacher)
  and restored before the same point of each extra pass. Masks are then equal because the
  forward draws its random numbers in the same order and with the same shapes from that point on
  -- true for minbert's dropout and attention (the math path the CPU takes with autograd, and
  torch's CPU SDPA that the no-grad teacher pass takes, draw the same attention-dropout mask; the
  Triton attention's seed comes from the CPU generator); the tests check it bit for bit on the
  CPU. Anything that draws randomness in another order breaks the equality (R_s and D_Breg then
  also measure dropout noise). The generator is restored to
  its state at the regularizer's entry afterwards, so SMART consumes none of the run's
  randomness.

Cheaper relatives
-----------------

* ``noise="r3f"`` -- R3F (Aghajanyan et al., *Better Fine-Tuning by Reducing Representational
  Collapse*, 2020): L(θ) + λ_s ℓ_s(f(x + z; θ), f(x; θ)) with z ~ N(0, σ²I)
  (``r3f_distribution="normal"``) or U(-σ, σ) (``"uniform"``); no ascent step, one extra forward.
* ``layer=k`` -- perturb the input of encoder layer k instead of the embeddings. The trainer's
  clean forward keeps that input (``model.capture_layer = k``), and the extra passes run only
  layers ≥ k; the final perturbed pass starts from the kept activation (with its graph), so the
  gradient still reaches every parameter, and the layers below k are computed once.

Efficiency: the clean output f(x) is the trainer's (no recomputation), the ascent pass takes
``torch.autograd.grad`` with respect to δ only (no parameter gradients are formed or
accumulated), and the teacher's pass runs under ``no_grad`` with ``torch.func.functional_call``
swapping in the teacher's tensors. The teacher holds only the trainable parameters
(``requires_grad``), so with LoRA it costs only the adapters and the heads. There is one θ̃ for
the model, as in the paper: the trainer calls :meth:`SMART.bind` with every regularizer of the
run, and all tasks whose β is equal share one :class:`ParameterEMA` (a task configured with
another β gets its own). Under ``torch.distributed`` (DeepSpeed ZeRO 0-2) each rank stores only
its 1/N slice of θ̃ and all-gathers it for the teacher's pass. MBPP refuses DeepSpeed ZeRO
stage 3, whose partitioned parameters cannot be copied whole.

Non-finite values: if the δ-gradient or the ascent loss is NaN/Inf, or R_s / D_Breg is, that term
is skipped for the step (a zero with no graph is returned), counted in :meth:`SMART.stats`, and
nothing is raised; the weights are never touched by it.

δ₀ and R3F's noise come from :func:`minbert.kernels.smart_noise.smart_noise` (in-kernel Philox) when the
Triton path is taken (CUDA, or the CPU interpreter). On the CPU reference path they come from a
``torch.Generator`` seeded with the same per-call seed (the reference Philox in plain torch is
far too slow for a training step there). Seeds derive from the run's seed, the task name and a
call counter, so runs are reproducible and resumable; the global RNG is not used.

The teacher is created as θ̃ = θ at the first MBPP call of any task sharing it, updated once
per optimizer step by its owner (the first of those tasks), and saved in the owner's
:meth:`SMART.state_dict` (with the call counter that seeds δ₀), so a resumed run continues the
same sequence. Its state is rank-local (each rank saves its own slice).

Options (per task; defaults): ``lambda_s=1``, ``mu=1``, ``steps=1`` (K; 0 keeps δ₀),
``sigma=1e-5``, ``step_size=1e-3`` (η), ``epsilon=1e-5`` (ε), ``norm="inf"|"l2"``,
``rule="projection"|"mtdnn"``, ``norm_level="token"|"sequence"``, ``dropout="eval"|"shared"``,
``beta=0.99``, ``layer=0``, ``noise="adversarial"|"r3f"``, ``r3f_distribution="normal"|"uniform"``.
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
