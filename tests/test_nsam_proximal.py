"""Every closed-form update is the argmin of its level's problem (Eq 19-20, 56), solved numerically by the generic
proximal solver, which knows no closed form."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory import ContinuumMemorySystem
from nested_learning.nsam import dot_objective, l2_objective, linearized_step, proximal_step
from nested_learning.ops import delta_rule, dgd_step, linear_attention

D = torch.float64


def _close(a, b, tol=1e-10):
    assert (a - b).abs().max().item() < tol * (1 + b.abs().max().item())


def _token(d_k=4, d_v=3):
    return torch.randn(d_k, dtype=D), torch.randn(d_v, dtype=D), torch.randn(d_v, d_k, dtype=D)


@pytest.mark.parametrize("decay", [False, True])
def test_linear_attention_step_is_the_argmin_of_eq17(decay):
    # Eq 17-18: one token of linear attention = argmin -<M k, v> + ||M - alpha M_t||^2 / 2 (lr 1)
    k, v, S = _token()
    alpha = torch.tensor(0.7, dtype=D) if decay else None
    _, S_op = linear_attention(
        k[None, None, None], k[None, None, None], v[None, None, None],
        None if alpha is None else alpha.reshape(1, 1, 1), initial_state=S[None, None], mode="recurrent",
    )
    argmin = proximal_step(dot_objective(k[None], v[None]), S, 1.0, anchor=S if alpha is None else alpha * S)
    _close(S_op[0, 0], argmin)


def test_deltanet_step_is_the_argmin_of_the_linearised_l2_problem():
    # Eq 65 = Eq 20 with the L2 objective 1/2 ||S k - v||^2 and rate beta
    k, v, S = _token()
    k = F.normalize(k, dim=0)
    beta = torch.tensor(0.6, dtype=D)
    _, S_op = delta_rule(k[None, None, None], k[None, None, None], v[None, None, None], beta.reshape(1, 1, 1),
                         None, initial_state=S[None, None], mode="recurrent")
    _close(S_op[0, 0], proximal_step(l2_objective(k[None], v[None]), S, beta))
    # the implicit (un-linearised) step with the same rate is a different update: the solver tells them apart
    implicit = proximal_step(l2_objective(k[None], v[None]), S, beta, linearize=False)
    assert (implicit - S_op[0, 0]).abs().max() > 1e-3


def test_dgd_step_is_the_argmin_of_eq56():
    # Eq 56: argmin 1/2 ||W x - u||^2 + ||W - W_t||^2 / (2 eta), u = -dL/dy; inputs of any norm
    x, grad_y, W = _token()
    x = 1.7 * x
    eta = 0.3
    argmin = proximal_step(l2_objective(x[None], -grad_y[None]), W, eta, linearize=False)
    _close(dgd_step(W, x, grad_y, eta), argmin)


def test_torch_sgd_momentum_buffer_is_the_argmin_of_eq12():
    # Eq 12-13 with retention mu and dampening d: m_{t+1} = argmin -<m, (1 - d) g> + ||m - mu m_t||^2 / 2
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=D))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.8, dampening=0.25)
    for step in range(4):
        p.grad = torch.randn_like(p)
        m_old = None if step == 0 else opt.state[p]["momentum_buffer"].clone()
        opt.step()
        if m_old is not None:  # the first step initialises the buffer to g (torch's convention)
            g = p.grad
            argmin = proximal_step(lambda m, g=g: -(m * g).sum(), m_old, 0.75, anchor=0.8 * m_old)
            _close(opt.state[p]["momentum_buffer"], argmin)


def test_torch_adam_moments_are_argmins_of_dot_product_memories():
    # Eq 102's recursions: M~ = argmin -<M, g> + ||M - b1 M_t||^2 / (2 (1 - b1)), H likewise with g^2
    p = torch.nn.Parameter(torch.randn(4, dtype=D))
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.8, 0.95))
    for _ in range(3):
        p.grad = torch.randn_like(p)
        state = opt.state[p]
        m1 = state["exp_avg"].clone() if state else torch.zeros_like(p)
        m2 = state["exp_avg_sq"].clone() if state else torch.zeros_like(p)
        opt.step()
        g = p.grad
        _close(state["exp_avg"], proximal_step(lambda m, g=g: -(m * g).sum(), m1, 0.2, anchor=0.8 * m1))
        _close(state["exp_avg_sq"], proximal_step(lambda m, g=g: -(m * g * g).sum(), m2, 0.05, anchor=0.95 * m2))


def test_cms_level_step_is_the_argmin_of_eq20_on_its_chunk():
    # Eq 71: at its boundary a level takes the linearised proximal step on the summed chunk objective, rate eta/C
    C, d = 3, 4
    cms = ContinuumMemorySystem(d, (C,), expansion=2, inner_lr=0.3, grad_clip=None).double()
    x = torch.randn(2, C, d, dtype=D)
    with torch.no_grad():
        _, state = cms(x)
    theta0 = cms.slow_weights(0).detach().expand(2, -1).clone()

    def chunk_objective(w):  # 1/2 sum_t ||MLP(x_t) - x_{t+1}||^2, one weight vector per stream
        W_up, b_up, W_down, b_down = cms.unpack(w)
        h = F.gelu(torch.einsum("bhd,btd->bth", W_up, x) + b_up[:, None])
        y = x + torch.einsum("bdh,bth->btd", W_down, h) + b_down[:, None]
        return 0.5 * (y[:, :-1] - x[:, 1:]).pow(2).sum()

    eta = cms.inner_lr()[0].item()
    _close(state.weights[0], proximal_step(chunk_objective, theta0, eta / C))


def test_linearized_step_is_the_closed_form_of_eq20():
    k, v, S = _token()
    objective = l2_objective(k[None], v[None])
    _close(linearized_step(objective, S, 0.4, anchor=0.9 * S), proximal_step(objective, S, 0.4, anchor=0.9 * S))
