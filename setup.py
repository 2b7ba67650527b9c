"""siglip_jax: SigLIP / CLIP image-text pretraining in JAX/Flax, from one CPU to a pod."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    (Path(__file__).parent / "siglip_jax" / "__init__.py").read_text()).group(1)

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "sentencepiece>=0.2",
    "safetensors>=0.4",
    "braceexpand>=0.1.7",   # WebDataset shard patterns: {00000..01242}, {a,b}
    "tensorboardX>=2.6",    # TensorBoard event files without TensorFlow
    "tokenizers>=0.19",     # the HF export's tokenizer.json (reproduces our text options)
]

EXTRAS = {
    # Real data sets: TFDS / ArrayRecord sources, Grain loader, TensorBoard to view the events.
    "data": ["grain>=0.2.12", "array-record>=0.7", "tensorflow-cpu", "tensorflow-datasets>=4.9",
             "tensorboard"],
    # gs:// workdirs: etils.epath reaches GCS through TensorFlow's gfile when TensorFlow is
    # installed, else through fsspec + gcsfs; orbax's step listing asks google-cloud-storage
    # whether the bucket has a hierarchical namespace. (Checkpoint arrays: TensorStore, built in.)
    "gcs": ["gcsfs", "google-cloud-storage"],
    "notebooks": ["matplotlib", "nbformat", "nbclient", "ipykernel"],
    # A CPU torch lies on this kind of machine's disk; an unpinned torch pulls a multi-GB CUDA build.
    "test": ["pytest>=8", "pytest-timeout", "torch==2.13.0", "transformers>=4.50", "matplotlib",
             "nbformat", "nbclient", "ipykernel", "grain>=0.2.12",
             # TensorBoard's own reader checks our TF-free event files (no TensorFlow needed).
             "tensorboard",
             # A TFDS data set prepared locally is one of the tested sources (only building it
             # imports TensorFlow; reading goes through tfds.data_source).
             "tensorflow-cpu", "tensorflow-datasets>=4.9"],
}

setup(
    name="siglip_jax",
    version=VERSION,
    description="SigLIP and CLIP image-text pretraining in JAX/Flax at pod scale",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["siglip_jax", "siglip_jax.*"]),
    package_data={"siglip_jax": ["data/assets/*"]},
    install_requires=CORE,
    extras_require=EXTRAS,
)
