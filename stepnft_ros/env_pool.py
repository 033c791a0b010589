"""Many environments feeding one batched policy, ROS-free: the rollout engine of the online loop.

Each environment lives in its own worker process (simulators are single-threaded and crash now and
then); the parent answers every worker that waits for a decision in one batched forward pass, so
the cores stay busy simulating while the policy is cheap. One message round trip per decision: a
worker executes a whole chunk and reports back. A worker that dies is restarted and its in-flight
episode discarded and re-run from its seed, so a crash costs time, never a corrupt episode.

`EnvPool(make_env, num_workers=0)` runs one environment in this process: deterministic, for tests.
With workers, which robots share a batch depends on timing, so Flow-SDE draws are not bit-repeatable
across runs; ODE evaluations are (each episode draws its initial noise from its own seed).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import multiprocessing.connection
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stepnft_ros.episodes.schema import Decision, Episode
from stepnft_ros.policy.policy import SamplingPolicy
from stepnft_ros.policy.sampler import CorrelatedStepNoise
from stepnft_ros.rollout import Env, episode_noise, to_observation

EnvFactory = Callable[[], Env]


def _step_chunk(env: Env, chunk: np.ndarray) -> tuple[Any, bool, bool, int]:
    """Execute the (already clipped) actions until the env reports done: (raw obs, success, done, executed)."""
    raw, success, done, executed = None, False, False, 0
    for action in chunk:
        raw, success, done = env.step(action)
        executed += 1
        if done:
            break
    return raw, bool(success), bool(done), executed


def _worker_main(make_env: EnvFactory, conn: mp.connection.Connection) -> None:
    torch.set_num_threads(1)
    env = make_env()
    conn.send(('ready', env.action_low, env.action_high))
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == 'reset':
                conn.send(('obs', env.reset(arg)))
            elif cmd == 'chunk':
                conn.send(('stepped', *_step_chunk(env, arg)))
            else:
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        close = getattr(env, 'close', None)
        if close is not None:
            close()


class WorkerCrash(RuntimeError):
    """A worker process died or stopped answering."""


@dataclass
class _Running:
    episode: Episode
    noise: torch.Generator
    step_noise: CorrelatedStepNoise | None = None  # SDE policies with step_noise_correlation > 0
    recorded_steps: torch.Generator | None = None  # antithetic pairs: the k* stream the pair shares
    pending: tuple[Decision, np.ndarray] | None = None


@dataclass
class _Worker:
    process: mp.process.BaseProcess | None
    conn: mp.connection.Connection | None
    env: Env | None = None  # in-process mode
    running: _Running | None = None
    inbox: deque = field(default_factory=deque)


class EnvPool:
    """`num_workers` environment processes (0: one environment in this process)."""

    def __init__(self, make_env: EnvFactory, num_workers: int = 0, start_method: str = 'spawn',
                 log: Callable[[str], None] = print, reply_timeout_s: float = 120.0) -> None:
        if num_workers < 0:
            raise ValueError(f'num_workers must be >= 0, got {num_workers}')
        self.make_env, self.log, self.reply_timeout_s = make_env, log, reply_timeout_s
        self.ctx = mp.get_context(start_method)
        self.restarts = 0
        if num_workers == 0:
            env = make_env()
            self.action_low, self.action_high = env.action_low, env.action_high
            self.workers = [_Worker(process=None, conn=None, env=env)]
        else:
            self.workers = [self._spawn() for _ in range(num_workers)]
            for w in self.workers:
                self._handshake(w)

    # ---- worker processes ------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=_worker_main, args=(self.make_env, child), daemon=True)
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    def _handshake(self, w: _Worker) -> None:
        reply = self._recv(w, timeout=300.0)  # env creation can take seconds (rendering backends)
        if reply[0] != 'ready':
            raise WorkerCrash(f'unexpected first message {reply[0]!r}')
        self.action_low, self.action_high = reply[1], reply[2]

    def _recv(self, w: _Worker, timeout: float) -> tuple:
        if not w.conn.poll(timeout):
            raise WorkerCrash(f'no reply within {timeout:.0f} s')
        try:
            return w.conn.recv()
        except (EOFError, OSError) as err:
            raise WorkerCrash(f'connection lost ({type(err).__name__})') from None

    def _restart(self, index: int, why: str) -> None:
        old = self.workers[index]
        if old.process is not None and old.process.is_alive():
            old.process.kill()
        if old.process is not None:
            old.process.join(timeout=5)
        self.restarts += 1
        self.log(f'env worker {index} failed ({why}); restarting it and re-running its episode')
        fresh = self._spawn()
        self._handshake(fresh)
        self.workers[index] = fresh

    def _send(self, w: _Worker, message: tuple) -> None:
        if w.env is not None:  # in-process: do the work now, queue the reply
            cmd, arg = message
            w.inbox.append(('obs', w.env.reset(arg)) if cmd == 'reset' else ('stepped', *_step_chunk(w.env, arg)))
            return
        try:
            w.conn.send(message)
        except (BrokenPipeError, OSError) as err:
            raise WorkerCrash(f'cannot send ({type(err).__name__})') from None

    def _ready(self, busy: list[int]) -> list[tuple[int, tuple | None, str]]:
        """(worker index, reply or None, crash reason) for every busy worker with news."""
        if self.workers[0].env is not None:
            return [(i, self.workers[i].inbox.popleft(), '') for i in busy]
        conns = {self.workers[i].conn: i for i in busy}
        ready = mp.connection.wait(list(conns), timeout=self.reply_timeout_s)
        if not ready:
            return [(i, None, f'no reply within {self.reply_timeout_s:.0f} s') for i in busy]
        out = []
        for conn in ready:
            i = conns[conn]
            try:
                out.append((i, conn.recv(), ''))
            except (EOFError, OSError) as err:
                out.append((i, None, f'connection lost ({type(err).__name__})'))
        return out

    # ---- episodes --------------------------------------------------------------------------

    def run_episodes(self, policy: SamplingPolicy, seeds: Sequence[int], actions_per_chunk: int,
                     weights_version: int = 0, id_prefix: str = 'ep', antithetic: bool = False) -> list[Episode]:
        """One episode per seed (repeat a seed for a group of episodes from one initial state), in
        the order of `seeds`. Every decision's initial noise comes from a generator seeded by
        (seed, the seed's occurrence), so an ODE policy's episodes do not depend on batching.

        antithetic (correlated step noise only): occurrences 2j and 2j+1 of a seed are a mirrored pair:
        the same ε and k* streams, step noise ξ and −ξ. Whatever the noise does to success regardless of
        its sign (mostly harm) then cancels between the two, as in antithetic evolution strategies."""
        todo: deque[tuple[int, int, int]] = deque()  # (position, seed, occurrence)
        seen: dict[int, int] = {}
        for position, seed in enumerate(seeds):
            todo.append((position, seed, seen.get(seed, 0)))
            seen[seed] = seen.get(seed, 0) + 1
        results: dict[int, Episode] = {}
        tags: dict[int, tuple[int, int, int]] = {}
        cfg_h, cfg_d = policy_shape(policy)
        num_steps = policy.model.config.num_steps if antithetic else 0
        correlated = policy.correlates_step_noise
        if antithetic and not correlated:
            raise ValueError('antithetic pairs need an SDE policy with step_noise_correlation > 0')

        def start(i: int) -> None:
            position, seed, occurrence = todo.popleft()
            stream, sign = (occurrence - occurrence % 2, (-1.0) ** occurrence) if antithetic else (occurrence, 1.0)
            noise = episode_noise(seed, stream)
            episode = Episode(episode_id=f'{id_prefix}-seed{seed}-{occurrence}', weights_version=weights_version,
                              seed=int(seed))
            step_noise = CorrelatedStepNoise(policy.step_noise_correlation, episode_noise(seed, stream, 'step'),
                                             sign) if correlated else None
            recorded_steps = episode_noise(seed, stream, 'recorded_step') if antithetic else None
            self.workers[i].running = _Running(episode=episode, noise=noise, step_noise=step_noise,
                                               recorded_steps=recorded_steps)
            tags[i] = (position, seed, occurrence)
            self._send(self.workers[i], ('reset', int(seed)))

        def crashed(i: int, why: str) -> None:
            todo.appendleft(tags.pop(i))
            self.workers[i].running = None
            self._restart(i, why)

        busy: list[int] = []
        for i in range(len(self.workers)):
            if todo:
                try:
                    start(i)
                    busy.append(i)
                except WorkerCrash as err:
                    crashed(i, str(err))
        while busy:
            waiting: list[tuple[int, Any]] = []  # workers whose env needs a decision: (index, raw obs)
            for i, reply, why in self._ready(busy):
                if reply is None:
                    busy.remove(i)
                    crashed(i, why)
                    continue
                run = self.workers[i].running
                if reply[0] == 'stepped':
                    raw, success, done, executed = reply[1:]
                    decision, chunk = run.pending
                    run.episode.decisions.append(dataclasses.replace(decision, executed=executed))
                    run.episode.env_steps += executed
                    if done:
                        run.episode.success = success
                        results[tags.pop(i)[0]] = run.episode
                        self.workers[i].running = None
                        busy.remove(i)
                        continue
                else:
                    raw = reply[1]
                waiting.append((i, raw))
            if waiting:
                observations = [to_observation(raw) for _, raw in waiting]
                noise = torch.stack([torch.randn((cfg_h, cfg_d), generator=self.workers[i].running.noise)
                                     for i, _ in waiting])
                step_noise = torch.stack([self.workers[i].running.step_noise.next((cfg_h, cfg_d))
                                          for i, _ in waiting]) if correlated else None
                recorded_steps = torch.cat([torch.randint(0, num_steps, (1,),
                                                          generator=self.workers[i].running.recorded_steps)
                                            for i, _ in waiting]) if antithetic else None
                out = policy.infer_batch(observations, initial_noise=noise, step_noise=step_noise,
                                         recorded_steps=recorded_steps)
                for j, (i, _) in enumerate(waiting):
                    decision = Decision(observation=observations[j], chunk=out.chunks[j],
                                        trace=out.trace.index(torch.tensor([j])))
                    chunk = np.clip(out.chunks[j][:actions_per_chunk], self.action_low, self.action_high)
                    self.workers[i].running.pending = (decision, chunk)
                    try:
                        self._send(self.workers[i], ('chunk', chunk))
                    except WorkerCrash as err:
                        busy.remove(i)
                        crashed(i, str(err))
            for i in range(len(self.workers)):  # idle workers take the next seeds
                if todo and i not in busy and self.workers[i].running is None:
                    try:
                        start(i)
                        busy.append(i)
                    except WorkerCrash as err:
                        crashed(i, str(err))
        return [results[p] for p in range(len(seeds))]

    def evaluate(self, policy: SamplingPolicy, seeds: Sequence[int],
                 actions_per_chunk: int) -> tuple[float, list[bool]]:
        """Success rate and per-seed outcomes over `seeds` (use an ODE policy: the paper's protocol)."""
        episodes = self.run_episodes(policy, seeds, actions_per_chunk, id_prefix='eval')
        outcomes = [bool(e.success) for e in episodes]
        return float(np.mean(outcomes)), outcomes

    def close(self) -> None:
        for w in self.workers:
            if w.env is not None:
                close = getattr(w.env, 'close', None)
                if close is not None:
                    close()
                continue
            try:
                w.conn.send(('close', None))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 10.0
        for w in self.workers:
            if w.process is not None:
                w.process.join(timeout=max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    w.process.kill()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def policy_shape(policy: SamplingPolicy) -> tuple[int, int]:
    cfg = policy.model.config
    return cfg.horizon, cfg.action_dim
