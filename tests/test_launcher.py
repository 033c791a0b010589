"""The pip-only launcher's supervision loop, on stand-in node processes (no ROS needed)."""

from __future__ import annotations

import textwrap

import pytest

from stepnft_ros.launch_description import NodeSpec
from stepnft_ros.launcher import launch

# Stand-in nodes: each start appends its pid to <name>.pids, which is how the test counts starts.
NODES = {
    # a simulator bridge that runs until it is killed (or stopped by the launcher's SIGINT)
    'sleeper': '''
        import os, pathlib, time
        with open(pathlib.Path(os.environ['PIDS']) / 'sleeper.pids', 'a') as f:
            f.write(f'{os.getpid()}\\n')
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            pass
    ''',
    # a bridge whose simulator crashes at every start
    'crasher': '''
        import os, pathlib, sys
        with open(pathlib.Path(os.environ['PIDS']) / 'crasher.pids', 'a') as f:
            f.write(f'{os.getpid()}\\n')
        sys.exit(1)
    ''',
    # a bridge with a bad configuration: a restart would fail the same way
    'misconfigured': '''
        import os, pathlib, sys
        with open(pathlib.Path(os.environ['PIDS']) / 'misconfigured.pids', 'a') as f:
            f.write(f'{os.getpid()}\\n')
        sys.exit(2)
    ''',
    # the test's hand in the graph: kills the sleeper once, waits for its respawn and for the
    # crasher to use up its respawns, then exits, which ends the graph
    'killer': '''
        import os, pathlib, signal, sys, time
        pids = pathlib.Path(os.environ['PIDS'])
        def started(name):
            path = pids / f'{name}.pids'
            return path.read_text().split() if path.exists() else []
        def wait(condition):
            deadline = time.monotonic() + 30
            while not condition():
                if time.monotonic() > deadline:
                    sys.exit(3)
                time.sleep(0.05)
        wait(lambda: started('sleeper'))
        os.kill(int(started('sleeper')[0]), signal.SIGKILL)
        wait(lambda: len(started('sleeper')) == 2 and len(started('crasher')) == 3)
        time.sleep(1.0)  # long enough for a further respawn, if one were wrongly due
    ''',
}


def test_dead_bridges_are_respawned_with_a_bound_and_the_graph_ends_cleanly(tmp_path, monkeypatch, capfd):
    for name, source in NODES.items():
        (tmp_path / f'{name}.py').write_text(textwrap.dedent(source))
    pids = tmp_path / 'pids'
    pids.mkdir()
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))  # the launcher passes its environment on
    monkeypatch.setenv('PIDS', str(pids))
    specs = [NodeSpec('bridge', 'bridge', 'sleeper', namespace='env0', respawn=True),
             NodeSpec('bridge', 'bridge', 'crasher', namespace='env1', respawn=True),
             NodeSpec('bridge', 'bridge', 'misconfigured', namespace='env2', respawn=True),
             NodeSpec('learner', 'learner', 'crasher'),  # not respawnable: started once
             NodeSpec('killer', 'killer', 'killer', ends_graph='exit')]
    params = tmp_path / 'params.yaml'
    params.write_text('{}\n')

    code = launch(specs, params, tmp_path / 'run', stop_timeout_s=5.0, respawn_delay_s=0.1, max_respawns=2)

    out = capfd.readouterr().out
    assert code == 0, out
    sleeper = (pids / 'sleeper.pids').read_text().split()
    assert len(sleeper) == 2 and sleeper[0] != sleeper[1], 'the killed bridge was started again'
    assert '[launch] respawning /env0/bridge in 0.1 s (respawn 1/2)' in out
    assert len((pids / 'crasher.pids').read_text().split()) == 3 + 1, 'env1 bridge: 1 + 2 respawns; learner: 1'
    assert '[launch] respawning /env1/bridge in 0.1 s (respawn 2/2)' in out
    assert '[launch] /env1/bridge died 3 times: not respawned again' in out
    assert len((pids / 'misconfigured.pids').read_text().split()) == 1, 'exit 2 (bad configuration) is final'
    assert 'respawning /learner' not in out and 'respawning /env2' not in out
    assert '[launch] /killer exited with code 0' in out


def test_a_node_that_ends_the_graph_cannot_be_respawnable():
    with pytest.raises(ValueError, match='cannot be respawned'):
        NodeSpec('bridge', 'bridge', 'sim_bridge.maniskill_node', ends_graph='failure', respawn=True)


def test_with_a_log_dir_node_output_goes_to_files_and_a_failure_shows_its_tail(tmp_path, monkeypatch, capfd):
    (tmp_path / 'chatty.py').write_text(textwrap.dedent('''
        import sys, time
        for i in range(30):
            print(f'episode {i}: success')
        time.sleep(0.5)
    '''))
    (tmp_path / 'failing.py').write_text(textwrap.dedent('''
        import sys
        print('loading the simulator')
        sys.exit('simulator crashed')
    '''))
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    params = tmp_path / 'params.yaml'
    params.write_text('{}\n')
    ticks = []
    specs = [NodeSpec('bridge', 'bridge', 'failing', namespace='env0'),
             NodeSpec('learner', 'learner', 'chatty', ends_graph='exit')]

    code = launch(specs, params, tmp_path / 'run', stop_timeout_s=5.0, log_dir=tmp_path / 'run/logs',
                  on_tick=lambda: ticks.append(1))

    out = capfd.readouterr().out
    assert code == 0 and ticks, out
    assert 'episode' not in out, 'node output stays off the console'
    assert '[launch] started 2 nodes; their output goes to' in out
    assert (tmp_path / 'run/logs/learner.log').read_text().count('success') == 30
    assert '[launch] /env0/bridge exited with code 1' in out
    assert 'loading the simulator' in out and 'simulator crashed' in out, 'a failed node\'s last lines are shown'


def test_nodes_hear_sigint_even_when_the_launcher_was_started_with_it_ignored(tmp_path, monkeypatch, capfd):
    """A launcher run from a background job or nohup inherits an ignored SIGINT; its nodes must not,
    or the SIGINT that asks them to finish their episodes does nothing."""
    import signal
    import time

    (tmp_path / 'listener.py').write_text(textwrap.dedent('''
        import os, pathlib, signal, time
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        pathlib.Path(os.environ['PIDS'], 'listener').write_text('ignored' if ignored else 'heard')
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            pass
    '''))
    (tmp_path / 'ender.py').write_text(textwrap.dedent('''
        import os, pathlib, time
        deadline = time.monotonic() + 30
        while not pathlib.Path(os.environ['PIDS'], 'listener').exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    '''))
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    monkeypatch.setenv('PIDS', str(tmp_path))
    params = tmp_path / 'params.yaml'
    params.write_text('{}\n')
    specs = [NodeSpec('bridge', 'bridge', 'listener', namespace='env0'),
             NodeSpec('learner', 'learner', 'ender', ends_graph='exit')]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = time.monotonic()
        code = launch(specs, params, tmp_path / 'run', stop_timeout_s=30.0)
        elapsed = time.monotonic() - started
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0, capfd.readouterr().out
    assert (tmp_path / 'listener').read_text() == 'heard'
    assert elapsed < 20, 'the listener ended on the first SIGINT, not after the 30 s escalation to SIGTERM'
