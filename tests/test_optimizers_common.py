"""Contract shared by every optimizer: resume from a state_dict, reduce a loss, reject bad arguments; registry."""

import io

import pytest
import torch
from torch import nn

from nested_learning.optimizers import (
    DGD,
    M3,
    OPTIMIZER_NAMES,
    AdaGradAsMemory,
    AdamAsMemory,
    DeepMomentumGD,
    DeltaRuleMomentum,
    MomentumAsMemory,
    Muon,
    PreconditionedMomentum,
    build_optimizer,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second thread only adds synchronisation, which dominates on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _regression_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def _regression_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen)) + 0.5 * x[:, :1] * x[:, 1:2]
    return x, y


REGISTRY_LRS = {
    "adamw": 1e-2, "adam": 1e-2, "sgd": 5e-2, "muon": 1e-2, "m3": 1e-3, "dgd": 5e-2, "deep_momentum": 5e-2,
    "delta_momentum": 0.1, "preconditioned_momentum": 1e-3, "adam_memory": 1e-2, "adagrad_memory": 5e-2,
}


def _registry_factory(name, lr):
    return lambda model: build_optimizer(name, model, lr=lr)


# Every registry name plus the non-default variants, each with a learning rate that suits the net above.
FACTORIES = {name: _registry_factory(name, lr) for name, lr in REGISTRY_LRS.items()}
FACTORIES.update({
    "momentum_memory_nesterov": lambda m: MomentumAsMemory(m.parameters(), lr=5e-2, momentum=0.9, nesterov=True),
    "deep_momentum_l2_depth3": lambda m: DeepMomentumGD(m.parameters(), lr=0.3, memory_depth=3, objective="l2"),
    "deep_momentum_elementwise": lambda m: DeepMomentumGD(m.parameters(), lr=5e-2, memory="elementwise"),
    "delta_momentum_matrix_poly2": lambda m: DeltaRuleMomentum(m.parameters(), lr=5e-2, form="matrix", feature_map="poly2"),
    "preconditioned_adagrad": lambda m: PreconditionedMomentum(m.parameters(), lr=2e-3, preconditioner="adagrad"),
    "m3_accumulate_inside_cubic": lambda m: M3(
        m.parameters(), lr=3e-3, frequency=3, momentum_mode="accumulate", eps_mode="inside", ns_coefficients="cubic"
    ),
    "muon_plain_params": lambda m: Muon(m.parameters(), lr=2e-2, adamw_lr=1e-2),
    "dgd_sequential": lambda m: build_optimizer("dgd", m, lr=5e-2, batch_mode="sequential"),
})


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _train(model, opt, steps, batches):
    for x, y in batches[:steps]:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_resume_is_exact(name):
    x, y = _regression_data()
    batches = [(x[i::4], y[i::4]) for i in range(4)] * 3  # 12 steps over 4 mini-batches
    total, split = 12, 5
    straight = _regression_net()
    _train(straight, FACTORIES[name](straight), total, batches)

    first = _regression_net()
    opt = FACTORIES[name](first)
    _train(first, opt, split, batches)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = _regression_net()
    resumed.load_state_dict(saved["model"])
    opt2 = FACTORIES[name](resumed)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, total - split, batches[split:])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_step_with_closure_equals_manual_step(name):
    x, y = _regression_data()
    manual, closed = _regression_net(), _regression_net()
    _train(manual, FACTORIES[name](manual), 2, [(x, y)] * 2)
    opt = FACTORIES[name](closed)

    def closure():
        opt.zero_grad()
        loss = _loss(closed, x, y)
        loss.backward()
        return loss

    losses = [opt.step(closure) for _ in range(2)]
    assert all(isinstance(loss, torch.Tensor) for loss in losses)
    for p, q in zip(manual.parameters(), closed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# DGD is left out: Eq 56 adds ||W x||^2 / 2 per layer, so it stops at a regularised point (see test_optimizers_dgd).
@pytest.mark.parametrize("name", sorted(n for n in FACTORIES if not n.startswith("dgd")))
def test_reduces_regression_loss(name):
    x, y = _regression_data()
    model = _regression_net()
    opt = FACTORIES[name](model)
    with torch.no_grad():
        before = _loss(model, x, y).item()
    for _ in range(150):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    with torch.no_grad():
        after = _loss(model, x, y).item()
    assert after < 0.5 * before, f"{name}: {before:.4f} -> {after:.4f}"


def _param():
    return [nn.Parameter(torch.zeros(3, 3))]


INVALID = {
    "negative lr (adam memory)": lambda: AdamAsMemory(_param(), lr=-1e-3),
    "beta1 = 1 (adam memory)": lambda: AdamAsMemory(_param(), betas=(1.0, 0.999)),
    "beta2 < 0 (adam memory)": lambda: AdamAsMemory(_param(), betas=(0.9, -0.1)),
    "negative eps (adagrad memory)": lambda: AdaGradAsMemory(_param(), eps=-1.0),
    "negative lr_decay (adagrad memory)": lambda: AdaGradAsMemory(_param(), lr_decay=-1.0),
    "nesterov without momentum": lambda: MomentumAsMemory(_param(), lr=0.1, nesterov=True),
    "negative lr (momentum memory)": lambda: MomentumAsMemory(_param(), lr=-0.1),
    "memory_depth 0": lambda: DeepMomentumGD(_param(), memory_depth=0),
    "momentum 1 (deep)": lambda: DeepMomentumGD(_param(), momentum=1.0),
    "unknown objective": lambda: DeepMomentumGD(_param(), objective="cosine"),
    "unknown memory": lambda: DeepMomentumGD(_param(), memory="columns"),
    "negative memory_lr": lambda: DeepMomentumGD(_param(), memory_lr=-1.0),
    "delta > 1": lambda: DeltaRuleMomentum(_param(), delta=1.5),
    "unknown form": lambda: DeltaRuleMomentum(_param(), form="tensor"),
    "unknown feature map": lambda: DeltaRuleMomentum(_param(), feature_map="poly9"),
    "unknown preconditioner": lambda: PreconditionedMomentum(_param(), preconditioner="hessian"),
    "negative momentum": lambda: PreconditionedMomentum(_param(), momentum=-0.5),
    "negative lr (dgd)": lambda: DGD(_param(), lr=-1.0),
    "unknown batch mode": lambda: DGD(_param(), batch_mode="median"),
    "frequency 0": lambda: M3(_param(), frequency=0),
    "beta3 = 1": lambda: M3(_param(), betas=(0.9, 0.999, 1.0)),
    "two betas for M3": lambda: M3(_param(), betas=(0.9, 0.999)),
    "negative alpha": lambda: M3(_param(), alpha=-0.1),
    "unknown momentum mode": lambda: M3(_param(), momentum_mode="sum"),
    "unknown eps mode": lambda: M3(_param(), eps_mode="both"),
    "muon on a vector": lambda: Muon([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}]),
    "negative lr (muon)": lambda: Muon(_param(), lr=-0.02),
    "momentum 1 (muon)": lambda: Muon(_param(), momentum=1.0),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_arguments_raise_value_error(case):
    with pytest.raises(ValueError):
        INVALID[case]()


class _TinyLM(nn.Module):
    """Embedding, a norm, a hidden matrix, a raw 2-D parameter and a tied head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = h + torch.tanh(self.mix(h) @ self.gate)
        return self.head(h)


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.conv = nn.Conv1d(1, 2, 3)

    def forward(self, x):
        return self.conv(x * self.scale).sum(-1)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("model_cls", [_TinyLM, _NoLinear])
def test_build_optimizer_steps_any_module(name, model_cls):
    torch.manual_seed(0)
    model = model_cls()
    inputs = torch.randint(0, 11, (2, 5)) if model_cls is _TinyLM else torch.randn(2, 1, 4)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, model, lr=1e-2, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(inputs).pow(2).mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="adamw.*m3"):
        build_optimizer("lion", _TinyLM(), lr=1e-3)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_weight_decay_spares_biases_norms_and_embeddings(name):
    model = _TinyLM()
    opt = build_optimizer(name, model, lr=1e-3, weight_decay=0.1)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model.mix.weight), id(model.gate)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_groups_orthogonalise_hidden_matrices_only():
    model = _TinyLM()
    opt = build_optimizer("muon", model, lr=1e-3)
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert muon == {id(model.mix.weight), id(model.gate)}
    m3 = build_optimizer("m3", model, lr=1e-3, adam_lr=5e-3)
    for group in m3.param_groups:
        assert group["lr"] == (1e-3 if group["orthogonalize"] else 5e-3)
