from setuptools import find_packages, setup

setup(
    name="slim_det",
    version="0.1.0",
    description="Slimmable neural networks (S-Nets / US-Nets) for detectron2",
    packages=find_packages(include=["slim_det", "slim_det.*"]),
    python_requires=">=3.9",
    install_requires=["fvcore", "pycocotools", "matplotlib"],
)
