"""CUDA-graph paths (``graph=True``) give the same results as the eager paths; skipped without a GPU.

The CPU suite cannot reach these code paths (``graph=True`` falls back to eager on the CPU), so
they are run on the device machine: ``python -m pytest tests/test_cuda_graphs.py``.
"""

import pytest
import torch

from implicit.solvers import anderson, picard, solve_recurrence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Contraction(torch.nn.Module):
    """z -> tanh(W z + x) with ||W|| < 1: one fixed point per input."""

    def __init__(self, d=16, batch=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(d, d, generator=g)
        self.W = torch.nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))
        self.x = torch.nn.Parameter(torch.randn(batch, d, generator=g))

    def forward(self, z):
        return torch.tanh(z @ self.W.T + self.x)


@pytest.mark.parametrize("solver", [anderson, picard])
def test_solver_graph_matches_eager_and_replays(solver):
    f = Contraction().cuda()
    for seed in (1, 2):  # the second call replays the cached graph from a new start
        z0 = torch.randn(5, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        eager = solver(f, z0, tol=1e-6, max_iter=60, graph=False)
        graphed = solver(f, z0, tol=1e-6, max_iter=60, graph=True)
        assert torch.equal(eager.n_iter, graphed.n_iter)
        torch.testing.assert_close(graphed.z, eager.z, rtol=0, atol=1e-6)
        assert float((f(graphed.z) - graphed.z).abs().max()) < 1e-5


def test_one_captured_loop_serves_every_iteration_budget():
    """The budget is a device tensor of the cached loop: solves with different ``max_iter`` replay one
    graph (one memory pool) and each stops at its own budget, as the eager loop does."""
    from implicit.solvers._loop import _LOOP_CACHE

    f = Contraction().cuda()
    z0 = torch.randn(5, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    for max_iter in (60, 8, 21, 60):
        eager = anderson(f, z0, tol=1e-9, max_iter=max_iter, graph=False)
        graphed = anderson(f, z0, tol=1e-9, max_iter=max_iter, graph=True)
        assert torch.equal(eager.n_iter, graphed.n_iter)
        assert int(graphed.n_iter.max()) == max_iter
        torch.testing.assert_close(graphed.z, eager.z, rtol=0, atol=1e-6)
    assert len(_LOOP_CACHE[f]) == 1


class Step(torch.nn.Module):
    """x_{k+1} = 0.9 x_k + 0.1 tanh(A x_k + b_k): a nonlinear recurrence over K steps."""

    def __init__(self, d=8, K=40):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = torch.nn.Parameter(torch.randn(d, d, generator=g) / d ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(K, d, generator=g))

    def forward(self, x, k):
        return 0.9 * x + 0.1 * torch.tanh(x @ self.A.T + self.b[k])


@pytest.mark.parametrize("options", [dict(method="anderson"), dict(method="window", window=8, compact=True),
                                     dict(method="window", window=8)])
def test_recurrence_graph_matches_sequential(options):
    from implicit.solvers import rollout

    step = Step().cuda()
    x0 = torch.randn(3, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    reference = rollout(step, x0, 40)
    for _ in range(2):  # capture, then replay
        res = solve_recurrence(step, x0, 40, tol=1e-6, graph=True, backward=None, **options)
        # a relative tolerance of 1e-6 on the whole trajectory leaves single states ~1e-5 off
        torch.testing.assert_close(res.z, reference, rtol=0, atol=5e-5)


def test_graphed_ddim_matches_eager():
    diffusers = pytest.importorskip("diffusers")
    from implicit.diffusion import DDIMSchedule, UNetEps, ddim, deq_ddim

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    eps = UNetEps(unet.cuda().double().eval().requires_grad_(False))  # float64: a random UNet's chain
    # with clipping amplifies float32 rounding past any useful tolerance
    schedule = DDIMSchedule.create()
    x_T = torch.randn(2, 1, 8, 8, device="cuda", dtype=torch.float64)
    eager = ddim(eps, x_T, schedule, 50)
    for _ in range(2):
        torch.testing.assert_close(ddim(eps, x_T, schedule, 50, graph=True), eager, rtol=0, atol=1e-10)
        x0, res = deq_ddim(eps, x_T, schedule, 50, method="window", window=8, compact=True, tol=1e-6,
                           graph=True, backward=None)
        torch.testing.assert_close(x0, eager, rtol=0, atol=1e-5)


def test_fno_deq_training_step_with_a_graphed_solve_matches_eager():
    """FNO-DEQ with ``solver_graph``: after an optimiser step (weights changed in place) the replayed
    solve still gives the eager model's outputs and gradients, in training and in evaluation."""
    from pde.models import build_model
    from pde.train import TrainConfig

    torch.manual_seed(0)
    x = torch.randn(4, 1, 24, 24, device="cuda")
    y = torch.randn(4, 1, 24, 24, device="cuda")
    nets = []
    for graph in (False, True):
        cfg = TrainConfig(model="fno-deq", width=8, modes=4, max_iter=12, tol=1e-8, backward="phantom",
                          pretrain_steps=0, solver_graph=graph)
        torch.manual_seed(1)
        nets.append(build_model("fno-deq", **cfg.model_kwargs(1, 1)).cuda())
    eager, graphed = nets
    assert graphed.deq.solver_options.get("graph") is True
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]
    for step in range(3):  # the second and third replay the graph captured in the first
        grads = []
        for net, opt in zip(nets, opts):
            net.train()
            opt.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            grads.append([p.grad.clone() for p in net.parameters()])
            opt.step()
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for net in nets:
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(graphed(x), eager(x), rtol=1e-4, atol=1e-5)


def _maze_deq(graph: bool = True):
    """A small maze DEQ of the path-independence study, seeded, on the GPU."""
    from implicit.studies.models import build_model

    torch.manual_seed(0)
    spec = {"kind": "deq", "width": 16, "budget": [4, 12], "norm": True, "tol": 1e-4}
    return build_model("maze", dict(spec, solver_options={"graph": True} if graph else None)).cuda()


def _solve_fixed_budget(net, x, iters: int = 12):
    """One no-grad solve of ``net`` on mazes ``x`` with a fixed budget (non-convergence is by design)."""
    import warnings

    from implicit.solvers import NonConvergenceWarning

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        e = net.encoder(x)
        net.solve(e, torch.zeros_like(e), iters)


@pytest.mark.filterwarnings("ignore::implicit.solvers.NonConvergenceWarning")  # budgets of 6 and 12 by design
def test_study_deq_with_graphed_solves_matches_eager():
    """A maze DEQ of the path-independence study with ``solver_options = {graph = true}``: its training
    solves and gradients match the eager model's, across budgets and a batch of another size (an
    epoch's last), and back to the first size (whose captured graphs it reuses)."""
    from implicit.studies.mazes import make_mazes

    nets = [_maze_deq(graph) for graph in (False, True)]
    x = make_mazes(8, 5, seed=0).x.cuda()
    for batch in (x, x[:3], x):
        for iters in (6, 12):
            outs, grads = [], []
            for net in nets:
                net.train()
                net.zero_grad()
                e = net.encoder(batch)
                z, _ = net.solve(e, torch.zeros_like(e), iters)
                net.head(z).square().mean().backward()
                outs.append(z.detach())
                grads.append([p.grad.clone() for p in net.parameters()])
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert len(nets[1].deq._graph_inputs) == 2  # one static input per batch shape


def _graphed_rollout(step, x0):
    from implicit.solvers.sequential import graphed_rollout

    return graphed_rollout(step, x0, 40)


def _graphed_recurrence(**options):
    return lambda step, x0: solve_recurrence(step, x0, 40, tol=1e-6, graph=True, backward=None, **options).z


def _graphed_odeint(step, x0):
    from implicit.ode import odeint_parallel

    field = lambda t, y: step(y, torch.zeros(y.shape[0], dtype=torch.long, device=y.device)) - y  # noqa: E731
    step.field = field  # the field lives exactly as long as the module
    return odeint_parallel(field, x0, torch.linspace(0, 1, 41, device="cuda"), method="euler", graph=True)[0]


@pytest.mark.parametrize("run", [_graphed_rollout, _graphed_recurrence(method="anderson"),
                                 _graphed_recurrence(method="window", window=8),
                                 _graphed_recurrence(method="window", window=8, compact=True), _graphed_odeint],
                         ids=["rollout", "anderson", "window", "window-compact", "odeint"])
def test_captured_graphs_do_not_keep_their_step_alive(run):
    """Every CUDA-graph cache is keyed weakly on the user's step (or field); its cached objects call
    that step through a weak reference, so deleting the step frees the step, its graphs and buffers."""
    import gc
    import weakref

    step = Step().cuda()
    x0 = torch.randn(3, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    for _ in range(2):  # capture, then replay
        run(step, x0)
    alive = weakref.ref(step)
    del step
    gc.collect()
    assert alive() is None


def test_release_graphs_frees_the_captured_loops_and_their_memory():
    """``DEQ.release_graphs`` (what the study's evaluation calls when out of GPU memory) drops the static
    inputs of graphed solves, and with them the cached solver loops, their CUDA graphs and memory."""
    import gc

    from implicit.solvers._loop import _LOOP_CACHE
    from implicit.studies.mazes import make_mazes

    net = _maze_deq().eval()
    x = make_mazes(64, 9, seed=0).x.cuda()
    gc.collect()
    loops = len(_LOOP_CACHE)
    _solve_fixed_budget(net, x)  # the first capture also sets up per-stream library workspaces, which stay
    net.deq.release_graphs()
    base = torch.cuda.memory_allocated()
    _solve_fixed_budget(net, x)
    held = torch.cuda.memory_allocated()
    assert len(_LOOP_CACHE) > loops and held > base
    net.deq.release_graphs()
    assert len(_LOOP_CACHE) == loops  # freed by reference counting, no collector needed
    assert torch.cuda.memory_allocated() <= base


def test_deleting_a_graphed_deq_frees_its_captured_loops_at_once():
    """A DEQ's static-input functions refer to its layer, not to the DEQ, so dropping the model frees its
    cached solver loops and CUDA graphs by reference counting (a cycle would wait for the collector)."""
    import gc

    from implicit.solvers._loop import _LOOP_CACHE
    from implicit.studies.mazes import make_mazes

    gc.collect()
    loops = len(_LOOP_CACHE)
    net = _maze_deq().eval()
    x = make_mazes(16, 9, seed=0).x.cuda()
    gc.disable()
    try:
        _solve_fixed_budget(net, x)
        assert len(_LOOP_CACHE) > loops
        del net
        assert len(_LOOP_CACHE) == loops
    finally:
        gc.enable()
