"""Checkpoints, bad observations, SFT pieces, labels."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from stepnft_ros.algo.labels import advantage_to_preference, terminal_binary_label
from stepnft_ros.algo.sft import flow_matching_loss, sample_flow_time
from stepnft_ros.episodes import Decision, Episode, collate_episodes
from stepnft_ros.policy import (
    CheckpointError,
    FlowPolicy,
    FlowVLA,
    Observation,
    ObservationError,
    PolicyConfig,
    load_checkpoint,
    save_checkpoint,
)
from stepnft_ros.policy.types import stack_observations

VISION = PolicyConfig(state_dim=4, action_dim=3, horizon=2, camera_names=('wrist', 'scene'), image_size=16,
                      vision_patch=8, use_language=True, text_layers=1, d_model=32, n_heads=2)


def obs(state=None, size=16, dtype=np.uint8, instruction='pick the cube'):
    image = np.zeros((size, size, 3), dtype)
    return Observation(state=np.zeros(4, np.float32) if state is None else state,
                       images={'wrist': image, 'scene': image}, instruction=instruction)


def test_vision_language_policy_runs_end_to_end():
    out = FlowPolicy(FlowVLA(VISION), mode='sde').infer_batch([obs(), obs(instruction='push it')])
    assert out.chunks.shape == (2, 2, 3) and np.isfinite(out.chunks).all()


def test_given_initial_noise_makes_an_ode_chunk_independent_of_its_batch():
    # The policy server keeps one noise stream per robot in eval mode: a robot's chunk must not
    # depend on which other robots share the batch, nor on the policy's own generator.
    cfg = PolicyConfig(state_dim=4, action_dim=3, horizon=2, d_model=32, n_heads=2)
    policy = FlowPolicy(FlowVLA(cfg), mode='ode')
    a, b = obs(state=np.ones(4, np.float32)), obs(state=-np.ones(4, np.float32))
    noise = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(1))
    together = policy.infer_batch([a, b], initial_noise=noise).chunks
    policy.reset(seed=123)
    alone = policy.infer_batch([b], initial_noise=noise[1:]).chunks
    np.testing.assert_allclose(together[1], alone[0], atol=1e-6)
    assert not np.allclose(together[0], together[1])
    with pytest.raises(ValueError, match='initial_noise has shape'):
        policy.infer_batch([a], initial_noise=noise)


def test_given_recorded_steps_are_the_traced_k_star():
    cfg = PolicyConfig(state_dim=4, action_dim=3, horizon=2, d_model=32, n_heads=2, num_steps=4)
    policy = FlowPolicy(FlowVLA(cfg), mode='sde', noise_level=0.5, sde_noise='recorded_step')
    observations = [obs(state=np.ones(4, np.float32))] * 3
    out = policy.infer_batch(observations, recorded_steps=torch.tensor([3, 0, 2]))
    assert out.trace.k.tolist() == [3, 0, 2]
    for bad in (torch.tensor([0, 4, 1]), torch.tensor([-1, 0, 0]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match='recorded_steps must be 3 solver steps'):
            policy.infer_batch(observations, recorded_steps=bad)


@pytest.mark.parametrize('bad, message', [
    (obs(state=np.array([0, np.nan, 0, 0], np.float32)), 'non-finite'),
    (obs(state=np.zeros(5, np.float32)), r'shape \(5,\)'),
    (obs(size=32), r'image has shape \(32, 32, 3\)'),
    (obs(dtype=np.float32), 'dtype float32'),
    (Observation(state=np.zeros(4, np.float32), images={'wrist': np.zeros((16, 16, 3), np.uint8)}), "'scene' missing"),
])
def test_bad_observations_are_rejected_with_a_clear_error(bad, message):
    with pytest.raises(ObservationError, match=message):
        stack_observations([obs(), bad], VISION)


def test_checkpoint_round_trip(tmp_path):
    model = FlowVLA(VISION)
    model.normalizer.fit(np.random.rand(10, 4), np.random.rand(10, 3))
    save_checkpoint(tmp_path, model, {'weights_version': 3})
    loaded, meta = load_checkpoint(tmp_path, expected=VISION)
    assert meta == {'weights_version': 3} and loaded.config == VISION
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / 'config.json').read_text())['camera_names'] == ['wrist', 'scene']
    assert not list(tmp_path.glob('*.tmp'))  # atomic writes leave no temp files


def test_corrupt_checkpoint_fails_clearly(tmp_path):
    save_checkpoint(tmp_path, FlowVLA(VISION))
    path = tmp_path / 'model.safetensors'
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match='model.safetensors'):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match='no checkpoint'):
        load_checkpoint(tmp_path / 'missing')


def test_mismatched_checkpoint_fails_clearly(tmp_path):
    save_checkpoint(tmp_path, FlowVLA(VISION))
    with pytest.raises(CheckpointError, match='action_dim is 3, expected 7'):
        load_checkpoint(tmp_path, expected=PolicyConfig(state_dim=4, action_dim=7))
    # tensors that disagree with the config in the header
    tensors = safetensors.torch.load_file(tmp_path / 'model.safetensors')
    with safetensors.safe_open(str(tmp_path / 'model.safetensors'), 'pt') as f:
        header = f.metadata()
    tensors['action_expert.action_out.weight'] = torch.zeros(5, 5)
    safetensors.torch.save_file(tensors, tmp_path / 'model.safetensors', metadata=header)
    with pytest.raises(CheckpointError, match='wrong shape'):
        load_checkpoint(tmp_path)


def test_non_finite_weights_are_refused(tmp_path):
    model = FlowVLA(PolicyConfig(state_dim=2, action_dim=2, d_model=16, n_heads=2))
    with torch.no_grad():
        model.action_expert.action_out.bias[0] = float('nan')
    save_checkpoint(tmp_path, model)
    with pytest.raises(CheckpointError, match='non-finite'):
        load_checkpoint(tmp_path)


def test_bad_policy_configs_name_the_field():
    with pytest.raises(ValueError, match='image_size'):
        PolicyConfig(state_dim=1, camera_names=('a',), image_size=60, vision_patch=8)
    with pytest.raises(ValueError, match='at least one input'):
        PolicyConfig(state_dim=0)
    with pytest.raises(ValueError, match='unknown PolicyConfig fields'):
        PolicyConfig.from_dict({'state_dim': 1, 'colour': 'red'})


def test_flow_time_sampler_matches_its_formula_bit_for_bit():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    tau = sample_flow_time(1000, 'beta', g1)
    assert torch.equal(tau, torch.rand(1000, generator=g2).pow(1 / 1.5) * 0.999 + 0.001)
    assert 0.001 <= tau.min() and tau.max() <= 1.0
    assert tau.mean().item() == pytest.approx(0.6 * 0.999 + 0.001, abs=0.03)  # Beta(1.5, 1) mean = 0.6


def test_flow_matching_loss_is_zero_for_the_true_velocity_and_masks_padding():
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=3, d_model=16, n_heads=2)
    model = FlowVLA(cfg)
    batch = stack_observations([Observation(state=np.zeros(2, np.float32))] * 4, cfg)
    actions = torch.randn(4, 3, 2)
    loss = flow_matching_loss(model, batch, actions, torch.ones(4, 3), generator=torch.Generator().manual_seed(0))
    assert loss.item() > 0
    masked = flow_matching_loss(model, batch, actions, torch.zeros(4, 3))
    assert masked.item() == 0.0


def test_labels():
    assert terminal_binary_label(True) == 1.0 and terminal_binary_label(False) == -1.0
    assert advantage_to_preference(5.0, 2.0) == (1.0, 1.0)
    assert advantage_to_preference(-1.0, 2.0) == (0.25, -0.5)
    with pytest.raises(ValueError):
        advantage_to_preference(float('nan'), 1.0)


def test_collation_weights_average_per_episode_and_skip_invalid():
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=2, d_model=16, n_heads=2)
    policy = FlowPolicy(FlowVLA(cfg))
    o = Observation(state=np.zeros(2, np.float32))

    def decision(valid=True):
        out = policy.infer(o)
        return Decision(observation=o, chunk=out.chunks[0], trace=out.trace, valid=valid)
    a = Episode('a', 0, [decision(), decision(), decision(valid=False)], success=True)
    b = Episode('b', 0, [decision()], success=False)
    batch = collate_episodes([a, b], cfg)
    assert batch.weight.tolist() == [0.5, 0.5, 0.0, 1.0]
    assert batch.y.tolist() == [1, 1, 1, -1] and batch.n_episodes == 2
    with pytest.raises(ValueError, match='without an outcome'):
        collate_episodes([Episode('c', 0, [decision()])], cfg)


def test_batch_mean_labels_follow_the_general_form():
    from stepnft_ros.algo.labels import episode_labels
    labels = episode_labels([True, False, False, False], 'batch_mean')
    assert labels[0] == pytest.approx((0.875, 0.75)) and labels[1] == pytest.approx((0.375, -0.25))
    assert episode_labels([True, False], 'terminal_binary') == [(1.0, 1.0), (0.0, -1.0)]
    with pytest.raises(ValueError, match='label scheme'):
        episode_labels([True], 'reward')


def test_group_mean_labels_compare_episodes_from_the_same_initial_state():
    from stepnft_ros.algo.labels import episode_labels
    # two groups: seed 1 succeeds 1 of 4 times, seed 2 always: its episodes carry no signal
    labels = episode_labels([True, False, False, False, True, True], 'group_mean', groups=[1, 1, 1, 1, 2, 2])
    assert [y for _, y in labels] == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.0, 0.0])
    assert [r for r, _ in labels] == pytest.approx([0.875, 0.375, 0.375, 0.375, 0.5, 0.5])
    with pytest.raises(ValueError, match='group key'):
        episode_labels([True, False], 'group_mean')


def test_collate_groups_by_seed_and_carries_executed_counts():
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=3, d_model=16, n_heads=2)
    out = FlowPolicy(FlowVLA(cfg)).infer(Observation(state=np.zeros(2, np.float32)))

    def episode(name, seed, success, executed, first=0):
        return Episode(name, 0, [Decision(Observation(state=np.zeros(2, np.float32)), out.chunks[0], out.trace,
                                          executed=n, executed_from=first) for n in executed],
                       success=success, seed=seed)
    batch = collate_episodes([episode('a', 7, True, [3, 1]), episode('b', 7, False, [None]),
                              episode('c', 8, True, [5]), episode('d', 8, False, [2], first=1)], cfg, 'group_mean')
    assert batch.y.tolist() == pytest.approx([0.5, 0.5, -0.5, 0.5, -0.5])
    # None (an old bag) counts as the whole chunk; a count past the horizon is capped; a late chunk keeps its start
    assert batch.executed.tolist() == [3, 1, 3, 3, 2] and batch.executed_from.tolist() == [0, 0, 0, 0, 1]


def test_decisions_that_led_into_a_takeover_are_failures_whatever_the_outcome():
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=3, d_model=16, n_heads=2)
    out = FlowPolicy(FlowVLA(cfg)).infer(Observation(state=np.zeros(2, np.float32)))
    decisions = [Decision(Observation(state=np.zeros(2, np.float32)), out.chunks[0], out.trace, led_to_intervention=led)
                 for led in (False, True, False)]
    episode = Episode('a', 0, decisions, success=True, interventions=[(5, 9)])
    batch = collate_episodes([episode], cfg)
    assert batch.y.tolist() == [1.0, -1.0, 1.0] and batch.r.tolist() == [1.0, 0.0, 1.0]
    assert collate_episodes([episode], cfg, intervention_negatives=False).y.tolist() == [1.0, 1.0, 1.0]


def test_pretrained_text_encoder_from_a_local_directory(tmp_path):
    import transformers

    tokenizer = transformers.ByT5Tokenizer()
    encoder = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    tokenizer.save_pretrained(tmp_path)
    encoder.save_pretrained(tmp_path)
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=2, use_language=True, text_encoder_path=str(tmp_path),
                       d_model=16, n_heads=2)
    model = FlowVLA(cfg)
    assert model.prefix_encoder.text.encoder.config.hidden_size == 24  # the saved encoder, not a fresh one
    out = FlowPolicy(model).infer(Observation(state=np.zeros(2, np.float32), instruction='open the drawer'))
    assert np.isfinite(out.chunks).all()
