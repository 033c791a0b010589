"""docs/configuration.md, generated from the parameter declarations themselves.

Every node reads its parameters through `Params` (nodes/common.py: get, required, untyped,
number_list); this reads those calls from the node sources (no rclpy, nothing started) and
sets beside each the value, and the comment, that each shipped graph config gives it. A test keeps
the page current:

    python -m stepnft_ros.config_reference --write    # regenerate docs/configuration.md
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / 'docs' / 'configuration.md'
GRAPH_CONFIGS = ('train_sim', 'eval_sim', 'deploy_real')

# node name (as in the launch files and params files) -> the sources that declare its parameters
NODES: dict[str, tuple[str, ...]] = {
    'policy_server': ('stepnft_ros/nodes/policy_server.py',),
    'learner': ('stepnft_ros/nodes/learner.py',),
    'maniskill_bridge': ('sim_bridge/bridge_node.py', 'sim_bridge/maniskill_node.py'),
    'libero_bridge': ('sim_bridge/bridge_node.py', 'sim_bridge/libero_node.py'),
    'maniskill_evaluator': ('sim_bridge/maniskill_evaluator.py',),
    'eval_recorder': ('sim_bridge/eval_recorder.py',),
    'arm_bridge': ('stepnft_ros/nodes/arm_bridge.py',),
    'safety_layer': ('stepnft_ros/nodes/safety_layer.py',),
    'episode_operator': ('stepnft_ros/nodes/episode_operator.py',),
    'standin_arm': ('sim_bridge/standin_arm.py',),
    'lifecycle_manager': ('stepnft_ros/nodes/lifecycle_manager.py',),
}


@dataclass(frozen=True)
class Declared:
    name: str
    default: str  # source text of the default, or 'required (<type>)'
    source: str   # file:line


# Params' reads (nodes/common.py) -> how the reference shows the default, from the call's other arguments
_READS = {
    'get': lambda args: ast.unparse(args[0]),
    'required': lambda args: f'required ({ast.unparse(args[0])})',
    'untyped': lambda args: 'unset (any type)',
    'number_list': lambda args: '[] (numbers)',
}


def declared_parameters(path: Path) -> list[Declared]:
    """The `Params` reads of one source file, in source order (a name read twice is listed once)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    params_names = {'p'}  # the convention; also any name bound to Params(...) or annotated Params
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Name) and node.value.func.id == 'Params':
            params_names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if isinstance(node, ast.arg) and isinstance(node.annotation, ast.Name) and node.annotation.id == 'Params':
            params_names.add(node.arg)
    out: dict[str, Declared] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _READS and isinstance(node.func.value, ast.Name)
                and node.func.value.id in params_names and node.args):
            continue
        name_node = node.args[0]
        if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
            raise ValueError(f'{path}:{node.lineno}: a parameter name must be a string literal to be documented')
        default = _READS[node.func.attr](node.args[1:])
        where = f'{path.relative_to(REPO)}:{node.lineno}'
        out.setdefault(name_node.value, Declared(name_node.value, default, where))
    return sorted(out.values(), key=lambda d: (d.source.split(':')[0], int(d.source.split(':')[1])))


_LINE = re.compile(r'^(?P<indent>\s*)(?P<key>[A-Za-z_/*][\w/*]*):(?P<rest>.*)$')


def config_values(path: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """{section: {parameter: (value as written, its comment)}} of a ROS params file; sections are its
    top-level keys ('/**', 'policy_server', '/**/maniskill_bridge', ...)."""
    data = yaml.safe_load(path.read_text()) or {}
    comments: dict[tuple[str, str], str] = {}
    section = None
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        if not m.group('indent'):
            section = m.group('key')
        elif section is not None and len(m.group('indent')) >= 4:
            comment = m.group('rest').split(' #', 1)[1].strip() if ' #' in m.group('rest') else ''
            comments[(section, m.group('key'))] = comment
    out = {}
    for section, body in data.items():
        params = (body or {}).get('ros__parameters', {}) or {}
        out[section] = {k: (yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix('...')
                            .strip(), comments.get((section, k), '')) for k, v in params.items()}
    return out


def _applies(section: str, node: str) -> bool:
    return section in ('/**', node, f'/**/{node}')


def _cell(text: str) -> str:
    return text.replace('|', '\\|')


def render() -> str:
    configs = {name: config_values(REPO / 'config' / f'{name}.yaml') for name in GRAPH_CONFIGS}
    lines = [
        '# Configuration reference',
        '',
        '<!-- generated by `python -m stepnft_ros.config_reference --write`; edit the sources, not this page -->',
        '',
        'Every parameter each node declares, with its default, and the value each shipped params file',
        '(`config/<graph>.yaml`, a blank cell: the default) sets for it, with that file\'s comment. Parameters',
        'are ROS 2 parameters: set them in a params file (`--params-file`, or `params_file:=` for the launch',
        'files) or with `--ros-args -p name:=value`. A missing required parameter or a value of the wrong',
        'type stops the node at start-up with exit code 2 and a one-line reason.',
        '',
    ]
    for node, sources in NODES.items():
        declared: dict[str, Declared] = {}
        for source in sources:
            for d in declared_parameters(REPO / source):
                declared.setdefault(d.name, d)
        lines += [f'## `{node}`', '', f'Declared in {", ".join(f"`{s}`" for s in sources)}.', '',
                  '| parameter | default | ' + ' | '.join(GRAPH_CONFIGS) + ' | note (from the params files) |',
                  '|---|---|' + '---|' * len(GRAPH_CONFIGS) + '---|']
        for d in declared.values():
            values, notes = [], []
            for graph in GRAPH_CONFIGS:
                found = [(v, c) for section, params in configs[graph].items() if _applies(section, node)
                         for k, (v, c) in params.items() if k == d.name]
                values.append(f'`{_cell(found[-1][0])}`' if found else '')
                notes += [c for _, c in found if c and c not in notes]
            lines.append(f'| `{d.name}` | `{_cell(d.default)}` | ' + ' | '.join(values)
                         + f' | {_cell("; ".join(notes))} |')
        lines.append('')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--write', action='store_true', help=f'write {PAGE.relative_to(REPO)} (default: print)')
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        PAGE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
