"""Helpers for the QLoRA course kit: one module per idea, each paired with its notebook.

runtime (profiles, dtype, loading), offline (the tiny base model and task), figures, summary,
notebook_setup (the Colab cell); lora, nf4, double_quant, memory, sft, merge as the notebooks
that teach them land.
"""
# The one place the repository address lives. Every notebook's Colab setup cell is generated
# from it (python -m qlora_helpers.notebook_setup); tests/test_notebooks.py checks they agree.
REPO_URL = "https://github.com/qlora-course-kit/qlora-course-kit"

__version__ = "0.1.0"
