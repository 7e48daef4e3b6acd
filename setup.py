"""Distribution `minbert`.

Folders map to import names through ``package_dir``: ``kernels/`` is installed as
``minbert.kernels`` and ``distributed/`` as ``minbert.distributed``. PyPI already has
packages called ``kernels`` and ``distributed``, so neither becomes a top-level name.
"""
from setuptools import setup

setup(
    name="minbert",
    version="0.1.0",
    description="Fast, distributed multitask fine-tuning of BERT encoders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["minbert", "minbert.kernels", "minbert.distributed", "minbert.weighting", "minbert.heads",
              "minbert.data"],
    package_dir={
        "minbert": "minbert",
        "minbert.kernels": "kernels",
        "minbert.distributed": "distributed",
        "minbert.weighting": "minbert/weighting",
        "minbert.heads": "minbert/heads",
        "minbert.data": "minbert/data",
    },
    package_data={"minbert.distributed": ["configs/*.json"]},
    install_requires=[
        "torch>=2.3",
        "triton; platform_system == 'Linux'",
        "deepspeed",
        "numpy",
        "tokenizers",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        # `distributed` (dask) is here for tests/test_import_names.py: the PyPI packages named like the
        # kernels/ and distributed/ folders must import and work beside minbert.
        "dev": ["pytest", "pytest-benchmark", "transformers", "ninja", "distributed"],
    },
    entry_points={"console_scripts": ["minbert=minbert.cli:main"]},
)
