"""π-StepNFT loss identities (ALGORITHM.md §4, §5)."""

import math

import pytest
import torch

from stepnft_ros.algo.stepnft import (
    StepNFTConfig,
    StepNFTTrainer,
    branch_errors,
    executed_mask,
    grpo_loss,
    mirrored_branches,
    push_pull_loss,
    step_error,
    step_log_likelihood,
    stepnft_loss,
    trust_region,
    weighted_loss,
)
from stepnft_ros.policy.sampler import grid_at, sde_mean, sde_sigma, sde_std
from stepnft_ros.policy.types import Trace

K = 4


def make_trace(b=8, h=5, d=3, a=0.4, seed=0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, K, (b,), generator=g)
    x_k, v_old = torch.randn(b, h, d, generator=g), torch.randn(b, h, d, generator=g)
    tau_k, tau_next, delta_k = grid_at(k, K)
    sigma = sde_sigma(tau_k, tau_next, a)
    x_next = sde_mean(x_k, v_old, tau_k, tau_next, sigma) + \
        sde_std(sigma, delta_k)[:, None, None] * torch.randn(b, h, d, generator=g)
    return Trace(x_k=x_k, x_next=x_next, v_old=v_old, k=k, a=torch.full((b,), a),
                 x_final=torch.randn(b, h, d, generator=g))


def gaussian_log_density(x, mu, s):
    return torch.distributions.Normal(mu, s[:, None, None]).log_prob(x).flatten(1).sum(1)


def test_lemma_4_2_ranking_margin_is_a_log_likelihood_ratio():
    trace = make_trace()
    v_theta = trace.v_old + 0.1 * torch.randn_like(trace.v_old)
    cfg = StepNFTConfig(eps_s=0.0, delta_max=1e9)
    e_plus, e_minus, _ = branch_errors(v_theta, trace, cfg, K)
    tau_k, tau_next, delta_k = grid_at(trace.k, K)
    sigma = sde_sigma(tau_k, tau_next, trace.a)
    s = sde_std(sigma, delta_k)
    v_plus, v_minus = mirrored_branches(trace.v_old, v_theta - trace.v_old, 1.0)
    log_ratio = gaussian_log_density(trace.x_next, sde_mean(trace.x_k, v_plus, tau_k, tau_next, sigma), s) - \
        gaussian_log_density(trace.x_next, sde_mean(trace.x_k, v_minus, tau_k, tau_next, sigma), s)
    assert torch.allclose(-(e_plus - e_minus) / 2, log_ratio, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('loss_form', ['ranking'])
def test_loss_is_log2_at_the_old_policy(loss_form):
    trace = make_trace()
    y = torch.tensor([1.0, -1.0] * 4)
    loss, metrics = stepnft_loss(trace.v_old.clone(), trace, y, (y + 1) / 2, torch.ones(8),
                                 StepNFTConfig(loss_form=loss_form), K)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics['e_plus'] == pytest.approx(metrics['e_minus'])


@pytest.mark.parametrize('target', ['next_step', 'terminal'])
@pytest.mark.parametrize('y', [1.0, -1.0])
def test_gradient_moves_the_mean_toward_success_and_away_from_failure(y, target):
    trace = make_trace(b=1, seed=5)
    v_theta = trace.v_old.clone().requires_grad_(True)
    cfg = StepNFTConfig(target=target, lambda_kl=0.0)
    loss, _ = stepnft_loss(v_theta, trace, torch.tensor([y]), torch.tensor([(y + 1) / 2]), torch.ones(1), cfg, K)
    loss.backward()
    v_new = (v_theta - 1e-3 * v_theta.grad).detach()
    tau_k, tau_next, _ = grid_at(trace.k, K)
    sigma = sde_sigma(tau_k, tau_next, trace.a)
    if target == 'next_step':
        goal = trace.x_next
        before, after = (sde_mean(trace.x_k, v, tau_k, tau_next, sigma) for v in (trace.v_old, v_new))
    else:
        goal = trace.x_final
        before, after = (trace.x_k - tau_k[:, None, None] * v for v in (trace.v_old, v_new))
    closer = (after - goal).norm() < (before - goal).norm()
    assert closer == (y > 0)


def test_trust_region_clips_the_norm_over_the_whole_chunk():
    dv = torch.zeros(3, 2, 2)
    dv[0] = 0.1
    dv[1] = 1.0
    dv[2, 0, 0] = 0.5
    clipped, hit = trust_region(dv, 0.5)
    norms = clipped.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([0.2, 0.5, 0.5]))
    assert hit.tolist() == [False, True, False]
    assert torch.allclose(clipped[1] / clipped[1].norm(), dv[1] / dv[1].norm())  # direction kept


def test_step_error_divides_by_the_step_variance():
    e = step_error(torch.ones(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([0.5]), 1e-4)
    assert e.item() == pytest.approx(4 / (0.25 + 1e-4))


def test_push_pull_and_weighted_forms():
    e_plus, e_minus = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    assert torch.allclose(push_pull_loss(e_plus, e_minus, torch.tensor([1.0, 1.0]), 1.0),
                          torch.nn.functional.softplus(torch.tensor([-1.0, 1.0])))
    assert torch.allclose(weighted_loss(e_plus, e_minus, torch.tensor([1.0, 0.25])), torch.tensor([1.0, 1.5]))


def test_per_episode_averaging_and_masking():
    trace = make_trace(b=4)
    v_theta = trace.v_old + 0.2 * torch.randn_like(trace.v_old)
    y = torch.tensor([1.0, 1.0, 1.0, -1.0])
    cfg = StepNFTConfig(lambda_kl=0.0)
    per_sample = push_pull_loss(*branch_errors(v_theta, trace, cfg, K)[:2], y, cfg.b)
    # episode A = decisions 0, 1, 2 (decision 2 masked); episode B = decision 3
    weight = torch.tensor([0.5, 0.5, 0.0, 1.0])
    loss, metrics = stepnft_loss(v_theta, trace, y, (y + 1) / 2, weight, cfg, K)
    expected = ((per_sample[0] + per_sample[1]) / 2 + per_sample[3]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a masked decision changes nothing, whatever its value
    v_theta2 = v_theta.clone()
    v_theta2[2] += 10.0
    assert stepnft_loss(v_theta2, trace, y, (y + 1) / 2, weight, cfg, K)[0].item() == pytest.approx(loss.item())
    assert 0.0 <= metrics['preference_accuracy'] <= 1.0


def test_kl_term_is_weighted_by_lambda():
    trace = make_trace(b=2)
    v_theta = trace.v_old + 1.0
    y, w = torch.ones(2), torch.ones(2)
    base, m = stepnft_loss(v_theta, trace, y, y, w, StepNFTConfig(lambda_kl=0.0), K)
    with_kl, _ = stepnft_loss(v_theta, trace, y, y, w, StepNFTConfig(lambda_kl=0.5), K)
    assert with_kl.item() == pytest.approx(base.item() + 0.5 * m['kl'], rel=1e-5)
    assert m["kl"] == pytest.approx(1.0, rel=1e-5)  # mean of 1² over the (5, 3) chunk, not the sum


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match='loss_form'):
        StepNFTConfig(loss_form='mse')
    with pytest.raises(ValueError, match='delta_max'):
        StepNFTConfig(delta_max=0.0)
    with pytest.raises(ValueError, match='outside'):
        StepNFTConfig(step_selection='7').fixed_step(4)
    with pytest.raises(ValueError, match="'uniform', 'last' or a step index"):
        StepNFTConfig(step_selection='first')
    assert [StepNFTConfig(step_selection=s).fixed_step(4) for s in ('uniform', 'last', '2')] == [None, 3, 2]


def test_unexecuted_actions_get_no_gradient():
    trace = make_trace(b=4)
    v_theta = (trace.v_old + 0.05 * torch.randn_like(trace.v_old)).requires_grad_(True)
    y, w = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4)
    mask = executed_mask(torch.tensor([0, 0, 0, 1]), torch.tensor([2, 5, 0, 3]), 5)
    assert mask[3].tolist() == [0, 1, 1, 1, 0], 'a late chunk: its skipped first action did not run'
    loss, _ = stepnft_loss(v_theta, trace, y, (y + 1) / 2, w, StepNFTConfig(), K, mask)
    loss.backward()
    grad_per_action = v_theta.grad.abs().sum(-1)  # (B, H)
    assert (grad_per_action[mask == 0] == 0).all()
    assert (grad_per_action[mask == 1] > 0).all()
    # the whole-chunk ablation is the all-ones mask
    full, _ = stepnft_loss(v_theta.detach(), trace, y, (y + 1) / 2, w, StepNFTConfig(), K, None)
    ones, _ = stepnft_loss(v_theta.detach(), trace, y, (y + 1) / 2, w, StepNFTConfig(), K, torch.ones(4, 5))
    assert full.item() == pytest.approx(ones.item())


def test_grpo_step_log_likelihood_is_the_closed_form_gaussian():
    trace = make_trace(b=6)
    v = trace.v_old + 0.1 * torch.randn_like(trace.v_old)
    mask = executed_mask(torch.zeros(6, dtype=torch.int64), torch.tensor([5, 5, 3, 1, 5, 2]), 5)
    tau_k, tau_next, delta_k = grid_at(trace.k, K)
    sigma = sde_sigma(tau_k, tau_next, trace.a)
    s = sde_std(sigma, delta_k)
    mu = sde_mean(trace.x_k, v, tau_k, tau_next, sigma)
    density = torch.distributions.Normal(mu, s[:, None, None]).log_prob(trace.x_next)
    expected = (density * mask[:, :, None]).flatten(1).sum(1)
    assert torch.allclose(step_log_likelihood(v, trace, K, mask), expected, atol=1e-4)


def test_grpo_loss_at_the_old_policy_is_minus_the_advantage_and_follows_it():
    trace = make_trace(b=4)
    advantage = torch.tensor([1.0, -1.0, 0.5, 0.0])
    mask = torch.ones(4, 5)
    cfg = StepNFTConfig(algo='grpo', lambda_kl=0.0)
    v = trace.v_old.clone().requires_grad_(True)
    loss, m = grpo_loss(v, trace, advantage, torch.ones(4), cfg, K, mask)
    assert loss.item() == pytest.approx(-advantage.mean().item(), abs=1e-6)  # ratio 1 everywhere
    assert m['ratio'] == pytest.approx(1.0)
    loss.backward()
    # a gradient step raises the likelihood of the positive sample's step and lowers the negative's
    step = v.detach() - 1e-3 * v.grad
    logp_old = step_log_likelihood(trace.v_old, trace, K, mask)
    logp_new = step_log_likelihood(step, trace, K, mask)
    assert logp_new[0] > logp_old[0] and logp_new[1] < logp_old[1]
    assert torch.allclose(v.grad[3], torch.zeros_like(v.grad[3]))  # zero advantage: no gradient


def flat(module: torch.nn.Module) -> torch.Tensor:
    """All of a module's parameters as one vector."""
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _toy_batch(flip_episodes=()):
    """Six one-decision-per-step episodes of a tiny policy; labels of `flip_episodes` inverted."""
    import numpy as np

    from stepnft_ros.episodes import Decision, Episode, collate_episodes
    from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig

    torch.manual_seed(0)
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=3, d_model=16, n_heads=2)
    model = FlowVLA(cfg)
    policy = FlowPolicy(model, seed=1)
    episodes = []
    for i in range(6):
        obs = Observation(state=np.array([i, -i], np.float32))
        decisions = [Decision(obs, *(lambda o: (o.chunks[0], o.trace))(policy.infer(obs))) for _ in range(4)]
        episodes.append(Episode(f'e{i}', 0, decisions, success=(i % 2 == 0) != (i in flip_episodes)))
    return model, collate_episodes(episodes, cfg)


def test_held_out_episodes_do_not_move_the_policy_and_are_scored_after_the_update():
    cfg = StepNFTConfig(lr=1e-2, epochs=3, minibatch_size=8, holdout_fraction=1 / 3)
    model, batch = _toy_batch()
    trainer = StepNFTTrainer(model, cfg, seed=5)
    held = trainer._holdout(batch)
    assert held.sum() == 8 and len(set(batch.episode_index[held].tolist())) == 2  # 2 of 6 episodes
    held_episodes = set(batch.episode_index[held].tolist())

    def trained(flip):
        model, batch = _toy_batch(flip)
        metrics = StepNFTTrainer(model, cfg, seed=5).update(batch)
        return flat(model), metrics
    params, metrics = trained(())
    params_flipped, metrics_flipped = trained(held_episodes)  # only the held-out labels differ
    assert torch.equal(params, params_flipped)
    accuracy = metrics['holdout_preference_accuracy']
    assert 0.0 <= accuracy <= 1.0
    assert metrics_flipped['holdout_preference_accuracy'] == pytest.approx(1.0 - accuracy)
    assert {f'policy_loss_k{k}' for k in range(4)} <= metrics.keys()
    assert 'holdout_preference_accuracy' not in StepNFTTrainer(*_toy_batch()[:1], StepNFTConfig()).update(
        _toy_batch()[1])


def test_filtered_bc_clones_only_the_successful_decisions():
    cfg = StepNFTConfig(algo='filtered_bc', lr=1e-2, epochs=2, minibatch_size=8)

    def trained(scramble_failures: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model, batch = _toy_batch()
        start = flat(model)
        if scramble_failures:  # what the failed episodes did must not matter
            failed = batch.y <= 0
            assert failed.any() and (~failed).any()
            batch.trace.x_final[failed] = 10.0 * torch.randn_like(batch.trace.x_final[failed])
        StepNFTTrainer(model, cfg, seed=5).update(batch)
        return start, flat(model)
    start, params = trained(False)
    assert not torch.equal(start, params)
    assert torch.equal(params, trained(True)[1])


@pytest.mark.parametrize('algo', ['stepnft', 'grpo'])
def test_micro_batches_give_the_same_update_as_the_whole_minibatch(algo):
    def trained(microbatch_size: int) -> tuple[torch.Tensor, dict[str, float]]:
        model, batch = _toy_batch()
        cfg = StepNFTConfig(algo=algo, lr=1e-2, epochs=2, minibatch_size=16, microbatch_size=microbatch_size)
        trainer = StepNFTTrainer(model, cfg, seed=5)
        trainer.optimizer = torch.optim.SGD(trainer.params, lr=0.1)  # Adam would magnify float-order noise
        metrics = trainer.update(batch)
        return flat(model), metrics
    whole, whole_metrics = trained(0)
    micro, micro_metrics = trained(5)  # uneven: 16 = 5 + 5 + 5 + 1
    assert torch.allclose(whole, micro, atol=1e-6)
    assert micro_metrics['loss'] == pytest.approx(whole_metrics['loss'], rel=1e-5)
    assert micro_metrics['gradient_steps'] == whole_metrics['gradient_steps']


def test_micro_batched_filtered_bc_learns_from_the_successes_only():
    cfg = StepNFTConfig(algo='filtered_bc', lr=1e-2, epochs=2, minibatch_size=16, microbatch_size=3)
    model, batch = _toy_batch()
    start = flat(model)
    metrics = StepNFTTrainer(model, cfg, seed=5).update(batch)
    assert metrics['gradient_steps'] == 4 and math.isfinite(metrics['loss'])
    assert not torch.equal(start, flat(model))


def test_weight_average_follows_the_updates_and_resumes_from_saved_state():
    cfg = StepNFTConfig(lr=1e-2, epochs=1, minibatch_size=8, ema_decay=0.75)
    model, batch = _toy_batch()
    trainer = StepNFTTrainer(model, cfg, seed=5)
    trainer.update(batch)
    first = flat(model)
    assert torch.equal(flat(trainer.averaged_model), first)  # the first update starts the average at θ1
    trainer.update(batch)
    second = flat(model)
    assert not torch.equal(first, second)
    assert torch.allclose(flat(trainer.averaged_model), 0.75 * first + 0.25 * second, atol=1e-6)

    saved = trainer.optimizer_tensors()
    resumed_model, _ = _toy_batch()
    resumed_model.load_state_dict(model.state_dict())
    resumed = StepNFTTrainer(resumed_model, cfg, seed=5)
    resumed.load_optimizer_tensors(saved)
    assert torch.equal(flat(resumed.averaged_model), flat(trainer.averaged_model))
    resumed.generator.set_state(trainer.generator.get_state())  # the same minibatch draws from here on
    trainer.update(batch)
    resumed.update(batch)
    assert torch.allclose(flat(resumed.averaged_model), flat(trainer.averaged_model), atol=1e-6)
    assert StepNFTTrainer(_toy_batch()[0], StepNFTConfig()).averaged_model is None
    with pytest.raises(ValueError, match='ema_decay'):
        StepNFTConfig(ema_decay=1.0)
