"""Starts a node graph from launch_description without `ros2 launch` (pip-only machines).

Each NodeSpec becomes a `python -m <module> --ros-args ...` process. Parameters come from the
graph's config YAML plus a generated YAML of the per-instance values, so nothing is escaped on
a command line. Ctrl-C (or a node whose exit ends the graph) stops every process. A node whose
spec allows it (training sim bridges) is restarted when it dies, with a delay and a bound.

Node output goes to the console, or, with `log_dir`, to one file per node (<log_dir>/<ns>_<name>.log,
appended across respawns) so that the console keeps only what the caller prints (train_sim: a
line per update); a node that fails then has the end of its log printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from stepnft_ros.atomic import atomic_write_text
from stepnft_ros.launch_description import MAX_RESPAWNS, RESPAWN_DELAY_S, NodeSpec


def instance_params_yaml(specs: Sequence[NodeSpec]) -> str:
    return yaml.safe_dump({s.full_name: {'ros__parameters': dict(s.parameters)} for s in specs if s.parameters},
                          sort_keys=True)


def node_command(module: str, name: str, namespace: str, params_files: Sequence[Path]) -> list[str]:
    """`python -m <module> --ros-args ...`: one node process with its name, namespace and parameter files."""
    cmd = [sys.executable, '-m', module, '--ros-args', '-r', f'__node:={name}']
    for params_file in params_files:
        cmd += ['--params-file', str(params_file)]
    if namespace:
        cmd += ['-r', f'__ns:=/{namespace}']
    return cmd


def log_path(log_dir: Path, spec: NodeSpec) -> Path:
    return log_dir / f"{spec.full_name.strip('/').replace('/', '_')}.log"


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return ''.join(path.read_text(errors='replace').splitlines(keepends=True)[-lines:])
    except OSError:
        return ''


def node_parameter(specs: Sequence[NodeSpec], params_file: Path, full_name: str, name: str, default):
    """The value a node will read for parameter `name`: its spec's, else the params file's entry for
    the node (by full name, bare name or /**/name), else its /** section's, else `default`."""
    for spec in specs:
        if spec.full_name == full_name and name in spec.parameters:
            return spec.parameters[name]
    sections = yaml.safe_load(Path(params_file).read_text()) or {}
    bare = full_name.rsplit('/', 1)[-1]
    for key in (full_name, full_name.lstrip('/'), f'/**/{bare}', '/**'):
        params = (sections.get(key) or {}).get('ros__parameters') or {}
        if name in params:
            return params[name]
    return default


def ros_environment(log_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')  # open it up explicitly for multi-host graphs
    env.setdefault('ROS_LOG_DIR', str(log_dir))
    env.setdefault('PYTHONUNBUFFERED', '1')
    return env


def launch(specs: Sequence[NodeSpec], params_file: Path, run_dir: Path, stop_timeout_s: float = 15.0,
           respawn_delay_s: float = RESPAWN_DELAY_S, max_respawns: int = MAX_RESPAWNS,
           log_dir: Path | None = None, on_tick: Callable[[], None] | None = None) -> int:
    """Run until a node whose exit ends the graph exits (its code is returned) or SIGINT/SIGTERM arrives.

    log_dir: node output goes to files there instead of the console. on_tick: called about every
    0.2 s while the graph runs (e.g. a progress display)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    generated = atomic_write_text(run_dir / 'launch_params.yaml', instance_params_yaml(specs))
    env = ros_environment(run_dir / 'ros_log')
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[NodeSpec, subprocess.Popen]] = {}
    respawns: dict[str, int] = {}
    due: dict[str, tuple[float, NodeSpec]] = {}  # nodes waiting to be respawned: (monotonic time, spec)

    def start(spec: NodeSpec, announce: bool = True) -> None:
        cmd = node_command(spec.module, spec.name, spec.namespace, [params_file, generated])
        if log_dir is None:
            proc = subprocess.Popen(cmd, env=env)
        else:
            with open(log_path(log_dir, spec), 'ab') as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs[spec.full_name] = (spec, proc)
        if announce:
            print(f'[launch] started {spec.full_name} (pid {proc.pid})', flush=True)

    stop = {'signal': None}

    def on_signal(signum, _frame):
        stop['signal'] = signum

    # Before any node starts: a handler resets to the default in the children on exec, whereas
    # an ignored SIGINT (a launcher started from a background job or nohup) would be inherited
    # and leave every node deaf to the SIGINT that asks it to finish its episode.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:  # a node that fails to start still has the ones before it stopped and the handlers restored
        for spec in specs:
            start(spec, announce=log_dir is None)
        if log_dir is not None:
            print(f'[launch] started {len(specs)} nodes; their output goes to {log_dir}/', flush=True)
        while stop['signal'] is None:
            exited = [(name, spec, p.returncode) for name, (spec, p) in procs.items() if p.poll() is not None]
            for name, spec, rc in exited:
                del procs[name]
                print(f'[launch] {name} exited with code {rc}', flush=True)
                if log_dir is not None and rc != 0:
                    path = log_path(log_dir, spec)
                    print(f'[launch] last lines of {path}:\n{log_tail(path).rstrip()}', flush=True)
                if spec.ends_graph == 'exit' or (spec.ends_graph == 'failure' and rc != 0):
                    code = code or rc
                    stop['signal'] = 'ended'
                elif spec.respawn and rc not in (0, 2):  # 0: its work is done; 2: bad config, would repeat
                    respawns[name] = respawns.get(name, 0) + 1
                    if respawns[name] > max_respawns:
                        print(f'[launch] {name} died {respawns[name]} times: not respawned again', flush=True)
                    else:
                        print(f'[launch] respawning {name} in {respawn_delay_s:g} s '
                              f'(respawn {respawns[name]}/{max_respawns})', flush=True)
                        due[name] = (time.monotonic() + respawn_delay_s, spec)
            for name, (when, spec) in list(due.items()):
                if stop['signal'] is None and time.monotonic() >= when:
                    del due[name]
                    start(spec)
            if not procs and not due:
                break
            if on_tick is not None:
                try:
                    on_tick()
                except Exception as err:  # a display must not stop the graph it shows
                    print(f'[launch] progress display stopped: {err!r}', flush=True)
                    on_tick = None
            time.sleep(0.2)
    finally:
        try:  # still ours: a second signal must not kill the launcher and orphan its nodes
            stop_processes([p for spec, p in procs.values() if spec.stops_first], stop_timeout_s)
            stop_processes([p for spec, p in procs.values() if not spec.stops_first], stop_timeout_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return code


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """SIGINT (nodes finish writing episodes), then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for p in alive:
            p.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in alive):
            time.sleep(0.1)
