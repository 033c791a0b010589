"""Data-parallel π-StepNFT updates: 2 CPU processes (gloo) take the step 1 process takes on the same batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stepnft_ros.algo.fsdp import full_state_dict
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
from stepnft_ros.episodes.schema import Decision, Episode, collate_episodes
from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig

CFG = PolicyConfig(state_dim=5, action_dim=3, horizon=4, d_model=32, n_heads=2, prefix_layers=1, expert_layers=1,
                   num_steps=4, noise_level=0.3)
# No gradient clipping: a clipped norm would hide a wrongly scaled sum.
ALGO = StepNFTConfig(lr=1e-3, epochs=2, minibatch_size=24, executed_only=True, grad_clip=1e6)


def model_and_batch():
    torch.manual_seed(0)
    model = FlowVLA(CFG)
    policy = FlowPolicy(model, mode='sde', seed=1)
    rng = np.random.default_rng(0)
    episodes = []
    for e, length in enumerate((9, 4, 13, 7, 11, 2)):  # unequal lengths: unequal decision weights per rank
        obs = [Observation(state=rng.standard_normal(CFG.state_dim).astype(np.float32)) for _ in range(length)]
        out = policy.infer_batch(obs)
        decisions = [Decision(o, out.chunks[j], out.trace.index(torch.tensor([j])), executed=2 + j % 3)
                     for j, o in enumerate(obs)]
        episodes.append(Episode(f'e{e}', 0, decisions, success=e % 3 == 0))
    return model, collate_episodes(episodes, CFG, 'batch_mean')


def updated(distributed: bool, fsdp: bool = False,
            algo: StepNFTConfig = ALGO) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    model, batch = model_and_batch()
    trainer = StepNFTTrainer(model, algo, seed=3, distributed=distributed, fsdp=fsdp)
    # Plain SGD: the step is the gradient itself. AdamW's normalization would blow the float noise of
    # gradients that are zero in exact arithmetic (e.g. attention key biases) up to lr-sized steps.
    trainer.optimizer = torch.optim.SGD(trainer.params, lr=0.05)
    metrics = trainer.update(batch)
    state = full_state_dict(model) if fsdp else model.state_dict()  # FSDP: a collective, rank 0 gets it
    return {k: v.detach().clone() for k, v in state.items()}, metrics


def rank_main(rank: int, world_size: int, init_file: str, out: str, fsdp: bool, algo: StepNFTConfig) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        state, metrics = updated(distributed=True, fsdp=fsdp, algo=algo)
        torch.save({'state': state, 'metrics': metrics}, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('fsdp, algo', [
    (False, ALGO),
    (True, ALGO),
    # micro-batches of 5 over 11 and 10 decisions: the ranks must still run as many passes as each other
    (True, dataclasses.replace(ALGO, microbatch_size=5, minibatch_size=21)),
], ids=['ddp', 'fsdp', 'fsdp_micro'])
def test_two_gloo_ranks_take_the_update_one_process_takes(tmp_path, fsdp, algo):
    single, single_metrics = updated(distributed=False, algo=algo)
    mp.spawn(rank_main, args=(2, str(tmp_path / 'rendezvous'), str(tmp_path / 'out'), fsdp, algo), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f'out.{r}', weights_only=True) for r in range(2)]
    before, _ = model_and_batch()
    moved = max((single[k] - v).abs().max().item() for k, v in before.state_dict().items())
    assert moved > 1e-3, 'the update changed the weights'
    if fsdp:  # sharded: only rank 0 holds the gathered weights
        assert ranks[1]['state'] == {}
        ranks = ranks[:1]
    for r in ranks:
        assert r['state'].keys() == single.keys()
        for key, value in single.items():
            assert torch.allclose(r['state'][key], value, atol=1e-6, rtol=1e-5), key
        assert r['metrics']['gradient_steps'] == single_metrics['gradient_steps']
        assert r['metrics']['loss'] == pytest.approx(single_metrics['loss'], rel=1e-4)
        assert r['metrics']['grad_norm'] == pytest.approx(single_metrics['grad_norm'], rel=1e-4)
    if not fsdp:
        assert all(torch.equal(ranks[0]['state'][k], ranks[1]['state'][k]) for k in single), 'the ranks stay identical'


def test_distributed_filtered_bc_is_refused():
    model, _ = model_and_batch()
    with pytest.raises(ValueError, match='distributed updates are for the stepnft and grpo losses'):
        StepNFTTrainer(model, StepNFTConfig(algo='filtered_bc'), distributed=True)
