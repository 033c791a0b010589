"""The documentation stays true to the code: the generated configuration reference is current,
every parameter a shipped params file sets is one its node declares, and no link is broken."""

from __future__ import annotations

import re

import pytest
from ros_harness import REPO

from stepnft_ros import config_reference as ref


def test_the_configuration_reference_is_generated_from_the_current_sources():
    assert ref.PAGE.read_text() == ref.render(), 'run: python -m stepnft_ros.config_reference --write'


def test_every_node_that_declares_parameters_is_in_the_reference():
    listed = {source for sources in ref.NODES.values() for source in sources}
    declaring = {str(p.relative_to(REPO)) for d in ('stepnft_ros', 'sim_bridge') for p in (REPO / d).rglob('*.py')
                 if 'Params(self)' in p.read_text()}
    assert declaring <= listed


@pytest.mark.parametrize('graph', ref.GRAPH_CONFIGS)
def test_every_parameter_a_params_file_sets_is_declared_by_its_node(graph):
    declared = {node: {d.name for s in sources for d in ref.declared_parameters(REPO / s)}
                for node, sources in ref.NODES.items()}
    unknown = []
    for section, params in ref.config_values(REPO / 'config' / f'{graph}.yaml').items():
        node = section.rsplit('/', 1)[-1]
        known = set().union(*declared.values()) if node == '**' else declared.get(node)
        assert known is not None, f'config/{graph}.yaml: no node named {node!r}'
        unknown += [f'{section}: {name}' for name in params if name not in known]
    assert not unknown, f'config/{graph}.yaml sets parameters no node declares (typos?): {unknown}'


def test_a_misspelt_parameter_in_a_params_file_is_caught(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('learner:\n  ros__parameters:\n    episodes_per_updat: 8   # typo\n')
    assert ref.config_values(bad) == {'learner': {'episodes_per_updat': ('8', 'typo')}}
    declared = {d.name for s in ref.NODES['learner'] for d in ref.declared_parameters(REPO / s)}
    assert 'episodes_per_updat' not in declared and 'episodes_per_update' in declared


def test_relative_links_in_the_readme_and_docs_resolve():
    broken = []
    for page in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]:
        for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', page.read_text()):
            if not re.match(r'[a-z]+://', target) and not (page.parent / target).exists():
                broken.append(f'{page.relative_to(REPO)} -> {target}')
    assert not broken, broken
