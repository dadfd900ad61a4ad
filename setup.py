from setuptools import find_packages, setup

setup(
    name="megajepa",
    version="0.1.0",
    description="Distributed LLM-JEPA pretraining: DeepSpeed ZeRO-3, streaming view pairs, Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["megajepa", "megajepa.*", "kernels", "kernels.*"]),
    package_data={"megajepa": ["assets/*"]},
    # Exact versions live in requirements/*.lock; these are the direct dependencies.
    install_requires=[
        "torch",
        "torchvision",
        "transformers>=4.57,<5",
        "datasets>=4,<5",
        "huggingface-hub<1",
        "mosaicml-streaming==0.13.0",
        "deepspeed>=0.19,<0.20",
        "triton",
        "accelerate",  # transformers needs it for ZeRO-3 aware construction and loading
        "tokenizers",
        "omegaconf",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "psutil",
        "peft>=0.21,<0.22",  # LoRA (model.lora.*), injected in place
        "liger-kernel>=0.8.5,<0.9",  # fused linear CE on CUDA (megajepa/model/head.py); torch + triton only
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["megajepa=megajepa.cli:main"]},
)
