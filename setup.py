from setuptools import find_packages, setup

setup(
    name="llmc",
    version="0.1.0",
    description="Post-training quantization of vision-language models: RTN, AWQ, GPTQ, rotation, SmoothQuant.",
    packages=find_packages(include=["llmc", "llmc.*"]),
    package_data={"llmc": ["assets/*/*"]},  # the trained tiny VLM (builtin:tiny_vlm)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "torchvision", "transformers>=5.0,<6", "accelerate>=1.0", "safetensors", "tokenizers",
        "loguru", "pyyaml", "tqdm", "pillow", "numpy", "psutil",
    ],
    extras_require={
        # lmms-eval 0.7.3 imports filelock._api, which filelock 4.3 removed
        "eval": ["lmms-eval==0.7.3", "filelock<4.3", "matplotlib"],
        "export": ["compressed-tensors==0.20.0", "gguf>=0.17"],
        "dev": ["pytest"],
    },
    entry_points={
        "console_scripts": ["llmc=llmc.cli:main"],
        # `python -m lmms_eval --model llmc --model_args pretrained=SAVED_DIR ...`
        "lmms_eval.models": ["llmc = llmc.eval.lmms_entry:lmms_manifest"],
    },
)
