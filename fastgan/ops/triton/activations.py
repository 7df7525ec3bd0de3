"""Triton helpers for the activation table of ``fastgan/ops/activations.py``.

``ACT`` is the row's ``index`` (a ``tl.constexpr``, so each kernel is compiled for one activation
and the untaken branches vanish). ``KERNEL_ACTIVATIONS`` names the ids these helpers have code for;
the ops send a row here only where its name is at its id, and run any other row unfused (see
``fastgan/ops/activations.py``). Fusing a new activation: its name below and one branch in each
helper. Math is done in the dtype of ``x`` / ``y``; kernels pass float32.
"""
import triton
import triton.language as tl

KERNEL_ACTIVATIONS = ("linear", "relu", "lrelu", "tanh", "sigmoid")  # by id

@triton.jit
def _tanh(x):
    # tanh without libdevice (not available under the interpreter): exp(-2|x|) never overflows;
    # below |x| = 1/16 the odd Taylor series avoids the cancellation in 1 - e (error < 1e-9 rel).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(ax < 0.0625, small, tl.where(x < 0, -t, t))


@triton.jit
def _sigmoid(x):
    # exp(-|x|) never overflows; the two branches give sigmoid(x) and sigmoid(-x) accurately.
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    return tl.where(x >= 0, inv, e * inv)


@triton.jit
def apply_act(x, alpha, ACT: tl.constexpr):
    """The activation ``ACT`` applied to ``x`` (``alpha`` is lrelu's negative slope)."""
    if ACT == 1:
        x = tl.where(x < 0, 0.0, x)  # NaN stays NaN, as torch.relu
    elif ACT == 2:
        x = tl.where(x > 0, x, x * alpha)
    elif ACT == 3:
        x = _tanh(x)
    elif ACT == 4:
        x = _sigmoid(x)
    else:
        tl.static_assert(ACT == 0, "apply_act: no code for this activation id (see KERNEL_ACTIVATIONS)")
    return x


@triton.jit
def act_grad_from_output(y, alpha, ACT: tl.constexpr):
    """``f'(x)`` written in ``y = f(x)`` (the saved activation output)."""
    if ACT == 0:
        g = tl.full(y.shape, 1.0, y.dtype)
    elif ACT == 1:
        g = tl.where(y > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(y > 0, 1.0, alpha)
    elif ACT == 3:
        g = 1.0 - y * y
    else:
        tl.static_assert(ACT == 4, "act_grad_from_output: no code for this activation id (see KERNEL_ACTIVATIONS)")
        g = y * (1.0 - y)
    return g


@triton.jit
def act_backward(gy, y, alpha, ACT: tl.constexpr):
    """``gy * f'(x)`` from the saved output ``y``. relu selects, as torch's threshold_backward: 0 where
    ``y <= 0`` even for an inf / NaN ``gy`` (a product would give NaN there), ``gy`` elsewhere (NaN
    outputs included). The table's ``Activation.backward`` is the reference."""
    if ACT == 1:
        g = tl.where(y <= 0, 0.0, gy)
    else:
        g = gy * act_grad_from_output(y, alpha, ACT)
    return g
