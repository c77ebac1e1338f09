"""sim.core.optim.Adam is torch's Adam, bit for bit, without the ~2 s ``torch._dynamo`` import."""
import subprocess
import sys

import pytest
import torch

from sim.core.optim import Adam


def _train(opt_cls, steps: int = 25, reload_at: int = 10):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = opt_cls(net.parameters(), lr=1e-2)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if i == reload_at:  # a checkpoint's round trip (sim/core/arrays.py) keeps the state
            opt.load_state_dict(opt.state_dict())
    return [p.detach().clone() for p in net.parameters()], opt.state_dict()


@pytest.mark.numeric
def test_the_parameters_and_the_state_are_torchs_to_the_last_bit():
    ours, ours_state = _train(Adam)
    theirs, theirs_state = _train(torch.optim.Adam)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    for idx, st in theirs_state["state"].items():
        for name, v in st.items():
            assert torch.equal(ours_state["state"][idx][name], v), (idx, name)
    net = torch.nn.Linear(2, 2)
    torch.optim.Adam(net.parameters()).load_state_dict(Adam(net.parameters()).state_dict())  # interchangeable


def test_a_differentiable_adam_is_refused():
    opt = Adam(torch.nn.Linear(2, 2).parameters(), differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        opt.step()


def test_training_imports_no_torch_dynamo():
    """If this fails, torch no longer keeps its undecorated optimizer methods as ``__wrapped__``:
    Adam is still right, but every training process pays the ``torch._dynamo`` import again
    (sim/core/optim.py)."""
    code = ("import sys, torch\n"
            "from sim.core.training import train_minibatch\n"
            "net = torch.nn.Linear(4, 3)\n"
            "x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))\n"
            "train_minibatch(list(net.parameters()), [x, y], lambda a, b: torch.nn.functional.cross_entropy(net(a), b),"
            " epochs=2, batch_size=8, seed=0)\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"torch._dynamo was imported: {r.stdout.strip()}"
