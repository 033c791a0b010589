"""FlowPolicy(cuda_graph=True): the ODE chunk replayed from a CUDA graph.

The capture itself needs a GPU (the last test, skipped elsewhere; bench/gpu_check.py measures it). On the
CPU the tests check what surrounds it: the options it refuses, that the graphed path draws ε and k*
exactly as the eager sampler does (a replay must compute the eager chunk), and that a hot swap drops
the graphs captured with the old weights.
"""

import numpy as np
import pytest
import torch

from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig
from stepnft_ros.policy.cuda_graph import GraphedODE
from stepnft_ros.policy.onnx_backend import make_policy
from stepnft_ros.policy.sampler import sample_chunk

CFG = PolicyConfig(state_dim=3, action_dim=2, horizon=4, d_model=32, n_heads=2, num_steps=4)


def _model() -> FlowVLA:
    torch.manual_seed(0)
    return FlowVLA(CFG)


def _observations(n: int) -> list[Observation]:
    rng = np.random.default_rng(0)
    return [Observation(state=rng.standard_normal(3).astype(np.float32)) for _ in range(n)]


@pytest.mark.parametrize('mode, device', [('sde', 'cpu'), ('ode', 'cpu'), ('sde', 'cuda')])
def test_cuda_graph_is_refused_off_the_ode_sampler_on_cuda(mode, device):
    with pytest.raises(ValueError, match="cuda_graph needs mode 'ode' on a CUDA device"):
        FlowPolicy(_model(), mode=mode, device=device, cuda_graph=True)


def test_cuda_graph_is_a_torch_backend_option():
    with pytest.raises(ValueError, match='torch-backend option'):
        make_policy(_model(), backend='onnxruntime', mode='ode', cuda_graph=True)


class EagerStandIn(GraphedODE):
    """GraphedODE's interface solved eagerly, so the CPU can check what FlowPolicy hands it."""

    def __call__(self, velocity, prefix, noise, k_star):
        self.calls = getattr(self, 'calls', 0) + 1
        return sample_chunk(lambda x, tau: velocity(x, tau, prefix), noise, self.num_steps, 0.0, k_star=k_star)


@pytest.mark.parametrize('fixed_step', [None, 2])
def test_the_graphed_path_draws_noise_and_recorded_step_as_the_eager_sampler(fixed_step):
    model = _model()
    eager = FlowPolicy(model, mode='ode', seed=3, fixed_step=fixed_step)
    graphed = FlowPolicy(model, mode='ode', seed=3, fixed_step=fixed_step)
    graphed._graphs = EagerStandIn(CFG.num_steps)
    obs = _observations(5)
    for _ in range(2):  # the second chunk too: the generator advanced by the same draws
        a, b = eager.infer_batch(obs), graphed.infer_batch(obs)
        assert np.array_equal(a.chunks, b.chunks)
        for x, y in zip(a.trace.as_tuple(), b.trace.as_tuple(), strict=True):
            assert torch.equal(x, y)
    assert graphed._graphs.calls == 2


def test_replacing_the_model_drops_the_captured_graphs():
    policy = FlowPolicy(_model(), mode='ode')
    policy._graphs = GraphedODE(CFG.num_steps)
    policy._graphs._solves[('stale',)] = object()
    policy.model = _model()
    assert len(policy._graphs) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA device')
def test_replayed_chunks_equal_the_eager_loop_on_cuda():
    model = _model()
    eager = FlowPolicy(model, mode='ode', seed=0, device='cuda')
    graphed = FlowPolicy(model, mode='ode', seed=0, device='cuda', cuda_graph=True)
    for n in (1, 3, 1):  # a new batch size captures a second graph; the first is reused
        obs = _observations(n)
        a, b = eager.infer_batch(obs), graphed.infer_batch(obs)
        np.testing.assert_allclose(a.chunks, b.chunks, atol=1e-5)
        assert torch.equal(a.trace.k, b.trace.k)
    assert len(graphed._graphs) == 2
