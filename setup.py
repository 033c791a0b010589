from glob import glob

from setuptools import find_packages, setup

package_name = 'stepnft_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['stepnft_ros', 'stepnft_ros.*', 'sim_bridge', 'sim_bridge.*']),
    package_data={'stepnft_ros': ['episodes/msg/*.msg']},  # episode bag types, registered at run time
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.json')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='stepnft_ros maintainers',
    maintainer_email='dev@stepnft.local',
    description='pi-StepNFT online RL fine-tuning of flow-based VLA policies as ROS 2 nodes',
    license='Apache-2.0',
    python_requires='>=3.10',
    entry_points={
        'console_scripts': [
            'stepnft = stepnft_ros.cli:main',
            'policy_server = stepnft_ros.nodes.policy_server:main',
            'learner = stepnft_ros.nodes.learner:main',
            'episode_operator = stepnft_ros.nodes.episode_operator:main',
            'demo_recorder = stepnft_ros.nodes.demo_recorder:main',
            'maniskill_bridge = sim_bridge.maniskill_node:main',
            'maniskill_evaluator = sim_bridge.maniskill_evaluator:main',
            'libero_bridge = sim_bridge.libero_node:main',
            'eval_recorder = sim_bridge.eval_recorder:main',
            'arm_bridge = stepnft_ros.nodes.arm_bridge:main',
            'safety_layer = stepnft_ros.nodes.safety_layer:main',
            'lifecycle_manager = stepnft_ros.nodes.lifecycle_manager:main',
            'standin_arm = sim_bridge.standin_arm:main',
        ],
    },
)
