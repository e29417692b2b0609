import torch, time
from implicit.solvers import anderson, broyden, picard
torch.manual_seed(0)
n=1024
W = torch.randn(n,n,device="cuda"); W = 0.9*W/torch.linalg.matrix_norm(W,2)
x = torch.randn(64,n,device="cuda")
f = lambda z: torch.tanh(z@W.T + x)
for s in (anderson, broyden, picard):
    a = s(f, torch.zeros_like(x), tol=1e-5, max_iter=100)
    b = s(f, torch.zeros_like(x), tol=1e-5, max_iter=100, graph=True)
    print(s.__name__, "eager", a.n_iter.max().item(), "graph", b.n_iter.max().item(), "maxdiff", (a.z-b.z).abs().max().item(), b.converged.all().item())
# DEQ with graph=True: same answers and gradients as eager, across calls with new inputs
from implicit.deq import DEQ
from torch import nn
layer = nn.Sequential(nn.Linear(n, n)).cuda()
class Cell(nn.Module):
    def __init__(s):
        super().__init__(); s.lin = nn.Linear(n, n)
        with torch.no_grad(): s.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(s.lin.weight, 2))
    def forward(s, z, x): return torch.tanh(s.lin(z) + x)
cell = Cell().cuda()
eager = DEQ(cell, tol=1e-6, max_iter=50)
graphed = DEQ(cell, tol=1e-6, max_iter=50, solver_options={"graph": True})
for trial in range(3):
    xin = torch.randn(64, n, device="cuda")
    ze, re = eager(xin); zg, rg = graphed(xin)
    ge = torch.autograd.grad(ze.square().sum(), cell.lin.weight)[0]
    gg = torch.autograd.grad(zg.square().sum(), cell.lin.weight)[0]
    print("deq graph trial", trial, (ze - zg).abs().max().item(), (ge - gg).abs().max().item(), re.n_iter.max().item(), rg.n_iter.max().item())
