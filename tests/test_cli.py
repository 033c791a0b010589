"""The `stepnft` command: SFT from a demo file, checkpoint info, and clear failures."""

import json

import numpy as np
from toy_env import expert_demos

from stepnft_ros.cli import main


def test_sft_then_info(tmp_path, capsys):
    states, actions, lengths = expert_demos(3, seed=0, action_noise=0.1)
    demos = tmp_path / 'demos.npz'
    np.savez(demos, obs=states, actions=actions, episode_lengths=lengths)
    assert main(['sft', '--demos', str(demos), '--out', str(tmp_path / 'ckpt'), '--steps', '5',
                 '--horizon', '4', '--d-model', '16', '--n-heads', '2']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['policy_config']['state_dim'] == 4 and report['policy_config']['action_dim'] == 2
    assert main(['info', str(tmp_path / 'ckpt')]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['metadata']['num_demos'] == 3 and info['config']['horizon'] == 4


def test_corrupt_inputs_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / 'ckpt').mkdir()
    (tmp_path / 'ckpt' / 'model.safetensors').write_bytes(b'not a checkpoint')
    assert main(['info', str(tmp_path / 'ckpt')]) == 2
    assert 'not a readable safetensors file' in capsys.readouterr().err
    np.savez(tmp_path / 'bad.npz', obs=np.zeros((3, 4)), actions=np.zeros((2, 2)), episode_lengths=np.array([3]))
    assert main(['sft', '--demos', str(tmp_path / 'bad.npz'), '--out', str(tmp_path / 'x')]) == 2
    assert 'demo arrays disagree' in capsys.readouterr().err


def test_sft_with_state_dropout_and_a_refused_half_of_it(tmp_path, capsys):
    states, actions, lengths = expert_demos(3, seed=0, action_noise=0.1)
    np.savez(tmp_path / 'demos.npz', obs=states, actions=actions, episode_lengths=lengths)
    small = ['--demos', str(tmp_path / 'demos.npz'), '--steps', '5', '--horizon', '4', '--d-model', '16',
             '--n-heads', '2']
    assert main(['sft', *small, '--out', str(tmp_path / 'ckpt'), '--state-dropout', '0.5',
                 '--state-dropout-dims', '2', '3']) == 0
    assert json.loads(capsys.readouterr().out)['policy_config']['state_dim'] == 4
    assert main(['sft', *small, '--out', str(tmp_path / 'x'), '--state-dropout', '0.5']) == 2  # which dims?
    assert '> 0 exactly when state_dropout_dims are given' in capsys.readouterr().err
    assert main(['sft', *small, '--out', str(tmp_path / 'y'), '--state-dropout', '0.5',
                 '--state-dropout-dims', '4']) == 2
    assert 'are not all dims of the 4-dim state' in capsys.readouterr().err
