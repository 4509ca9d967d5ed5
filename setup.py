from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="causalvdm",
    version="0.1.0",
    description="Autoregressive video diffusion with causal generation and KV-cache sharing (Ca2-VDM)",
    packages=find_packages(include=["causalvdm", "causalvdm.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "wandb": ["wandb"],
        "test": ["pytest>=7", "scikit-video"],
    },
)
