"""Helpers for tests that run real nodes as separate processes on a private loopback DDS domain."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import yaml

from stepnft_ros.launcher import node_command, stop_processes
from stepnft_ros.policy import PolicyConfig, save_checkpoint
from stepnft_ros.policy.modeling import FlowVLA

REPO = Path(__file__).resolve().parents[1]
PICKCUBE_STATE_DIM, PICKCUBE_ACTION_DIM = 42, 7


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f'bench_{name}', REPO / 'bench' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_checkpoint(path: Path, state_dim: int = PICKCUBE_STATE_DIM, action_dim: int = PICKCUBE_ACTION_DIM,
                    camera_names: tuple[str, ...] = (), image_size: int = 32, seed: int = 0,
                    weights_version: int = 0) -> Path:
    """A small untrained policy (fast to load and run) saved as a checkpoint directory."""
    torch.manual_seed(seed)
    cfg = PolicyConfig(state_dim=state_dim, action_dim=action_dim, horizon=4, d_model=32, n_heads=2,
                       prefix_layers=1, expert_layers=1, num_steps=3, noise_level=0.5,
                       camera_names=camera_names, image_size=image_size, vision_patch=8)
    save_checkpoint(path, FlowVLA(cfg), {'stage': 'test', 'weights_version': weights_version})
    return path


class NodeProcess:
    """One node in its own process; its console output goes to a file the test can search."""

    def __init__(self, module: str, name: str, params: dict, log_dir: Path, namespace: str = '',
                 params_files: tuple[Path, ...] = ()) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        tag = f'{namespace}_{name}'.strip('_')
        params_file = log_dir / f'{tag}.params.yaml'
        full_name = f'/{namespace}/{name}' if namespace else f'/{name}'
        params_file.write_text(yaml.safe_dump({full_name: {'ros__parameters': params}}))
        cmd = node_command(module, name, namespace, [*params_files, params_file])
        self.log_path = log_dir / f'{tag}.log'
        self._log = open(self.log_path, 'w')
        env = dict(os.environ, PYTHONUNBUFFERED='1', ROS_LOG_DIR=str(log_dir / 'ros_log'))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.name = full_name

    def output(self) -> str:
        return self.log_path.read_text(errors='replace')

    def wait_for(self, pattern: str, timeout: float = 60.0, count: int = 1) -> list[str]:
        """Wait until the output matches `pattern` `count` times; fail with the output on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            hits = re.findall(pattern, self.output())
            if len(hits) >= count:
                return hits
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = f'exited with {self.proc.returncode}' if self.proc.poll() is not None else 'timed out'
                raise AssertionError(f'{self.name} {state} before printing {pattern!r} x{count}; '
                                     f'output:\n{self.output()[-4000:]}')
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        """SIGINT for an orderly stop (escalating if it hangs); SIGKILL to simulate a crash."""
        if sig == signal.SIGKILL:
            self.proc.kill()
            self.proc.wait()
        else:
            stop_processes([self.proc], timeout)
        self._log.close()
        return self.proc.returncode


class Graph:
    """Starts NodeProcesses and guarantees they are gone when the test ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.nodes: list[NodeProcess] = []

    def start(self, module: str, name: str, params: dict, namespace: str = '') -> NodeProcess:
        node = NodeProcess(module, name, params, self.log_dir, namespace)
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


def run_launch(args: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    """`stepnft launch <args>` to its end; its console goes to `log` too. Past `timeout` the launcher
    gets SIGINT (it stops its nodes, no orphans left on the domain) and the test fails with the tail
    of its console and of any node logs under a `--run-dir`."""
    proc = subprocess.Popen([sys.executable, '-m', 'stepnft_ros.cli', 'launch', *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_processes([proc], 20)
        stdout, stderr = proc.communicate()
    log.write_text(stdout + stderr)
    if timed_out:
        run_dir = Path(args[args.index('--run-dir') + 1]) if '--run-dir' in args else None
        node_logs = ''.join(f'\n--- {p.name}:\n{p.read_text()[-1500:]}'
                            for p in sorted(run_dir.glob('logs/*.log'))) if run_dir else ''
        raise AssertionError(f'`stepnft launch {args[0]}` still running after {timeout} s:\n'
                             f'{(stdout + stderr)[-4000:]}{node_logs}')
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def spin_until(executor, condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        executor.spin_once(timeout_sec=0.05)
