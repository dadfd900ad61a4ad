from setuptools import find_packages, setup

setup(
    name="megajepa",
    version="0.1.0",
    description="Distributed LLM-JEPA pretraining: DeepSpeed ZeRO-3, streaming view pairs, Triton kernels",
    python_requires=">=3.12",
    packages=find_packages(include=["megajepa", "megajepa.*"]),
    package_data={"megajepa": ["assets/*"]},
    # The ranges the project supports and tests: the lower ends are the GPU machine's own packages
    # (torch 2.11, transformers 5.17), the upper ones requirements/cpu.lock, which pins every
    # package of the development set and CI exactly.
    install_requires=[
        "torch>=2.11,<2.16",
        "transformers>=5.17,<6",
        "streaming-community>=0.14.2,<0.15",  # mosaicml-streaming's maintained fork: same `import streaming`, same MDS
        "deepspeed>=0.19,<0.20",
        "triton>=3.6",
        "numpy>=2.1,<3",
        "accelerate>=1.15",  # transformers needs it for ZeRO-3 aware construction and loading
        "tokenizers>=0.23",
        "omegaconf>=2.3,<3",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "psutil",
        "peft>=0.21,<0.22",  # LoRA (model.lora.*), injected in place
        "liger-kernel>=0.8.5,<0.9",  # fused linear cross-entropy on CUDA (megajepa/model/head.py)
    ],
    extras_require={"test": ["pytest"], "datasets": ["datasets>=4,<6"]},  # prepare from a local HF dataset directory
    entry_points={"console_scripts": ["megajepa=megajepa.cli:main"]},
)
